// A strict subset of MessagePack for the daemon protocol: nil, bool, int, float, str, bin,
// array and map (string keys only). Written here because the daemon must build on machines with
// no network and no msgpack-c; the Python side uses the `msgpack` package, which emits this subset.
// The decoder is the fuzzed attack surface: every length is checked against the bytes left before
// anything is allocated, nesting and element counts are bounded, and trailing bytes are rejected.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace spotserve::daemon {

struct Value {
  enum class Type { Nil, Bool, Int, Float, Str, Bin, Array, Map };
  Type type = Type::Nil;
  bool b = false;
  // Integers keep their sign separately so uint64 values above INT64_MAX survive.
  bool negative = false;
  uint64_t u = 0;  // magnitude for Int (two's complement value when negative, see as_int)
  double f = 0.0;
  std::string s;  // Str and Bin payload
  std::vector<Value> arr;
  std::vector<std::pair<std::string, Value>> map;

  static Value nil() { return Value{}; }
  static Value boolean(bool v);
  static Value uint(uint64_t v);
  static Value integer(int64_t v);
  static Value real(double v);
  static Value str(std::string v);
  static Value bin(std::string v);
  static Value array(std::vector<Value> v);
  static Value object() { Value v; v.type = Type::Map; return v; }

  // Map helpers (linear scan: request maps have a handful of keys).
  const Value* get(const std::string& key) const;
  Value& set(const std::string& key, Value v);
  bool is_uint() const { return type == Type::Int && !negative; }
  int64_t as_int() const { return static_cast<int64_t>(u); }
};

struct DecodeLimits {
  size_t max_depth = 8;
  size_t max_elements = 65536;  // total array/map entries in one message
};

// Decodes exactly one value spanning all of [data, data+size). On failure returns false and
// writes a one-line reason to *error; never throws, never reads out of bounds.
bool decode(const uint8_t* data, size_t size, Value* out, std::string* error,
            const DecodeLimits& limits = DecodeLimits{});

// Appends the encoding of `v` to *out.
void encode(const Value& v, std::string* out);

}  // namespace spotserve::daemon
