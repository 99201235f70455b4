// The daemon's wire protocol, version 1.
//
// Frame: 4-byte big-endian payload length, then a msgpack map. Request keys:
//   v (int, = kProtocolVersion), token (str), op (str), id (optional uint, echoed),
//   plus the op's arguments:
//     allocate: name (str), nbytes (uint), dtype (str), shape (array of uint)
//     lookup | release | seal: name (str)
//     list | stats | shutdown: none
// Reply: {v, id, ok: true, ...} or {v, id, ok: false, code: str, error: str}.
// parse_request() turns one payload into a validated Request or an error; it is pure (no I/O)
// so it can be fuzzed on its own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "msgpack_lite.h"

namespace spotserve::daemon {

constexpr int kProtocolVersion = 1;
constexpr uint32_t kMaxFrame = 1u << 20;  // requests are small; anything bigger is malformed
constexpr size_t kMaxNameLength = 256;
constexpr size_t kMaxRank = 8;

enum class Op { Allocate, Lookup, List, Release, Seal, Stats, Shutdown };

struct Request {
  Op op = Op::Stats;
  bool has_id = false;
  uint64_t id = 0;
  std::string name;
  uint64_t nbytes = 0;
  std::string dtype;
  std::vector<uint64_t> shape;
};

struct ParseError {
  std::string code;     // bad_request | unauthorized | version | unknown_op
  std::string message;
  bool has_id = false;  // the id, when it could be read, so the reply still matches the request
  uint64_t id = 0;
};

// Bytes per element of a dtype name (torch spelling without "torch."), 0 if unknown.
size_t dtype_itemsize(const std::string& dtype);

// Whether a buffer name is acceptable: 1..kMaxNameLength chars of [A-Za-z0-9._/:-].
bool valid_buffer_name(const std::string& name);

// Decodes and validates one payload. `token` is the shared secret; compared in constant time.
bool parse_request(const uint8_t* data, size_t size, const std::string& token, Request* out, ParseError* err);

// Reply skeletons: ok carries the caller's fields; error carries code and message.
Value make_ok(bool has_id, uint64_t id);
Value make_error(bool has_id, uint64_t id, const std::string& code, const std::string& message);

}  // namespace spotserve::daemon
