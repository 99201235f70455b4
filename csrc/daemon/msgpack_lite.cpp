// MessagePack subset codec (see msgpack_lite.h for why it exists and what it accepts).
#include "msgpack_lite.h"

#include <cstring>

namespace spotserve::daemon {

Value Value::boolean(bool v) { Value x; x.type = Type::Bool; x.b = v; return x; }
Value Value::uint(uint64_t v) { Value x; x.type = Type::Int; x.u = v; return x; }
Value Value::integer(int64_t v) {
  Value x; x.type = Type::Int; x.negative = v < 0; x.u = static_cast<uint64_t>(v); return x;
}
Value Value::real(double v) { Value x; x.type = Type::Float; x.f = v; return x; }
Value Value::str(std::string v) { Value x; x.type = Type::Str; x.s = std::move(v); return x; }
Value Value::bin(std::string v) { Value x; x.type = Type::Bin; x.s = std::move(v); return x; }
Value Value::array(std::vector<Value> v) { Value x; x.type = Type::Array; x.arr = std::move(v); return x; }

const Value* Value::get(const std::string& key) const {
  if (type != Type::Map) return nullptr;
  for (const auto& kv : map)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

Value& Value::set(const std::string& key, Value v) {
  type = Type::Map;
  for (auto& kv : map)
    if (kv.first == key) { kv.second = std::move(v); return kv.second; }
  map.emplace_back(key, std::move(v));
  return map.back().second;
}

namespace {

class Reader {
 public:
  Reader(const uint8_t* p, size_t n, const DecodeLimits& lim) : p_(p), n_(n), lim_(lim) {}

  bool value(Value* out, size_t depth) {
    if (depth > lim_.max_depth) return fail("nesting deeper than " + std::to_string(lim_.max_depth));
    uint8_t tag;
    if (!byte(&tag)) return false;
    if (tag <= 0x7f) { *out = Value::uint(tag); return true; }
    if (tag >= 0xe0) { *out = Value::integer(static_cast<int8_t>(tag)); return true; }
    if ((tag & 0xf0) == 0x80) return map(tag & 0x0f, out, depth);
    if ((tag & 0xf0) == 0x90) return array(tag & 0x0f, out, depth);
    if ((tag & 0xe0) == 0xa0) return bytes(tag & 0x1f, Value::Type::Str, out);
    uint64_t n;
    switch (tag) {
      case 0xc0: *out = Value::nil(); return true;
      case 0xc2: *out = Value::boolean(false); return true;
      case 0xc3: *out = Value::boolean(true); return true;
      case 0xc4: return be(1, &n) && bytes(n, Value::Type::Bin, out);
      case 0xc5: return be(2, &n) && bytes(n, Value::Type::Bin, out);
      case 0xc6: return be(4, &n) && bytes(n, Value::Type::Bin, out);
      case 0xca: {
        uint64_t bits;
        if (!be(4, &bits)) return false;
        float f; uint32_t b32 = static_cast<uint32_t>(bits); std::memcpy(&f, &b32, 4);
        *out = Value::real(f); return true;
      }
      case 0xcb: {
        uint64_t bits;
        if (!be(8, &bits)) return false;
        double d; std::memcpy(&d, &bits, 8);
        *out = Value::real(d); return true;
      }
      case 0xcc: if (!be(1, &n)) return false; *out = Value::uint(n); return true;
      case 0xcd: if (!be(2, &n)) return false; *out = Value::uint(n); return true;
      case 0xce: if (!be(4, &n)) return false; *out = Value::uint(n); return true;
      case 0xcf: if (!be(8, &n)) return false; *out = Value::uint(n); return true;
      case 0xd0: if (!be(1, &n)) return false; *out = Value::integer(static_cast<int8_t>(n)); return true;
      case 0xd1: if (!be(2, &n)) return false; *out = Value::integer(static_cast<int16_t>(n)); return true;
      case 0xd2: if (!be(4, &n)) return false; *out = Value::integer(static_cast<int32_t>(n)); return true;
      case 0xd3: if (!be(8, &n)) return false; *out = Value::integer(static_cast<int64_t>(n)); return true;
      case 0xd9: return be(1, &n) && bytes(n, Value::Type::Str, out);
      case 0xda: return be(2, &n) && bytes(n, Value::Type::Str, out);
      case 0xdb: return be(4, &n) && bytes(n, Value::Type::Str, out);
      case 0xdc: return be(2, &n) && array(n, out, depth);
      case 0xdd: return be(4, &n) && array(n, out, depth);
      case 0xde: return be(2, &n) && map(n, out, depth);
      case 0xdf: return be(4, &n) && map(n, out, depth);
      default: {
        char buf[64];
        std::snprintf(buf, sizeof buf, "unsupported msgpack type 0x%02x at offset %zu", tag, pos_ - 1);
        return fail(buf);
      }
    }
  }

  bool at_end() const { return pos_ == n_; }
  size_t pos() const { return pos_; }
  const std::string& error() const { return err_; }

 private:
  bool fail(std::string msg) { if (err_.empty()) err_ = std::move(msg); return false; }

  bool byte(uint8_t* b) {
    if (pos_ >= n_) return fail("truncated message");
    *b = p_[pos_++];
    return true;
  }

  bool be(int width, uint64_t* out) {
    if (n_ - pos_ < static_cast<size_t>(width)) return fail("truncated message");
    uint64_t v = 0;
    for (int i = 0; i < width; ++i) v = (v << 8) | p_[pos_ + i];
    pos_ += width;
    *out = v;
    return true;
  }

  bool bytes(uint64_t len, Value::Type type, Value* out) {
    if (len > n_ - pos_) return fail("string or bin length " + std::to_string(len) + " exceeds message");
    out->type = type;
    out->s.assign(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return true;
  }

  bool count(uint64_t n) {
    // Each element takes at least one byte, so a count above the bytes left is a lie.
    if (n > n_ - pos_) return fail("container length " + std::to_string(n) + " exceeds message");
    elements_ += n;
    if (elements_ > lim_.max_elements) return fail("too many elements in message");
    return true;
  }

  bool array(uint64_t n, Value* out, size_t depth) {
    if (!count(n)) return false;
    out->type = Value::Type::Array;
    out->arr.resize(n);
    for (uint64_t i = 0; i < n; ++i)
      if (!value(&out->arr[i], depth + 1)) return false;
    return true;
  }

  bool map(uint64_t n, Value* out, size_t depth) {
    if (!count(n)) return false;
    out->type = Value::Type::Map;
    out->map.reserve(n);
    for (uint64_t i = 0; i < n; ++i) {
      Value key;
      if (!value(&key, depth + 1)) return false;
      if (key.type != Value::Type::Str) return fail("map key is not a string");
      for (const auto& kv : out->map)
        if (kv.first == key.s) return fail("duplicate map key '" + key.s + "'");
      Value v;
      if (!value(&v, depth + 1)) return false;
      out->map.emplace_back(std::move(key.s), std::move(v));
    }
    return true;
  }

  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  size_t elements_ = 0;
  DecodeLimits lim_;
  std::string err_;
};

void put_be(uint64_t v, int width, std::string* out) {
  for (int i = width - 1; i >= 0; --i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void put_header(uint8_t fix, uint8_t fix_max, uint8_t t8, uint8_t t16, uint8_t t32, size_t n, std::string* out) {
  if (n <= fix_max && fix) { out->push_back(static_cast<char>(fix | n)); return; }
  if (n <= 0xff && t8) { out->push_back(static_cast<char>(t8)); put_be(n, 1, out); return; }
  if (n <= 0xffff) { out->push_back(static_cast<char>(t16)); put_be(n, 2, out); return; }
  out->push_back(static_cast<char>(t32));
  put_be(n, 4, out);
}

}  // namespace

bool decode(const uint8_t* data, size_t size, Value* out, std::string* error, const DecodeLimits& limits) {
  Reader r(data, size, limits);
  Value v;
  if (!r.value(&v, 0)) { *error = r.error(); return false; }
  if (!r.at_end()) {
    *error = "trailing bytes after message (" + std::to_string(size - r.pos()) + ")";
    return false;
  }
  *out = std::move(v);
  return true;
}

void encode(const Value& v, std::string* out) {
  switch (v.type) {
    case Value::Type::Nil: out->push_back(static_cast<char>(0xc0)); return;
    case Value::Type::Bool: out->push_back(static_cast<char>(v.b ? 0xc3 : 0xc2)); return;
    case Value::Type::Int:
      if (v.negative) {
        out->push_back(static_cast<char>(0xd3));
        put_be(v.u, 8, out);
      } else if (v.u <= 0x7f) {
        out->push_back(static_cast<char>(v.u));
      } else {
        out->push_back(static_cast<char>(0xcf));
        put_be(v.u, 8, out);
      }
      return;
    case Value::Type::Float: {
      uint64_t bits; std::memcpy(&bits, &v.f, 8);
      out->push_back(static_cast<char>(0xcb));
      put_be(bits, 8, out);
      return;
    }
    case Value::Type::Str: put_header(0xa0, 31, 0xd9, 0xda, 0xdb, v.s.size(), out); out->append(v.s); return;
    case Value::Type::Bin: put_header(0, 0, 0xc4, 0xc5, 0xc6, v.s.size(), out); out->append(v.s); return;
    case Value::Type::Array:
      put_header(0x90, 15, 0, 0xdc, 0xdd, v.arr.size(), out);
      for (const auto& x : v.arr) encode(x, out);
      return;
    case Value::Type::Map:
      put_header(0x80, 15, 0, 0xde, 0xdf, v.map.size(), out);
      for (const auto& kv : v.map) { encode(Value::str(kv.first), out); encode(kv.second, out); }
      return;
  }
}

}  // namespace spotserve::daemon
