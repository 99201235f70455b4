// Request validation for the daemon protocol (see protocol.h for the schema).
#include "protocol.h"

#include <cstring>

namespace spotserve::daemon {

namespace {

struct DtypeSize { const char* name; size_t size; };
constexpr DtypeSize kDtypes[] = {
    {"float32", 4}, {"float16", 2}, {"bfloat16", 2}, {"float64", 8}, {"float8_e4m3fn", 1},
    {"float8_e5m2", 1}, {"int8", 1}, {"uint8", 1}, {"int16", 2}, {"int32", 4}, {"int64", 8}, {"bool", 1},
};

bool constant_time_equal(const std::string& a, const std::string& b) {
  // Length leaks, content does not: the token length is not a secret.
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// Echoed user text stays printable ASCII so every reply is valid UTF-8 for the client.
std::string printable(const std::string& s, size_t max_len) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_len; ++i) out.push_back(s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?');
  return out;
}

bool fail(ParseError* err, const char* code, std::string msg) {
  err->code = code;
  err->message = std::move(msg);
  return false;
}

bool need_str(const Value& req, const char* key, std::string* out, ParseError* err) {
  const Value* v = req.get(key);
  if (!v) return fail(err, "bad_request", std::string("missing field '") + key + "'");
  if (v->type != Value::Type::Str) return fail(err, "bad_request", std::string("field '") + key + "' must be a string");
  *out = v->s;
  return true;
}

bool need_uint(const Value& req, const char* key, uint64_t* out, ParseError* err) {
  const Value* v = req.get(key);
  if (!v) return fail(err, "bad_request", std::string("missing field '") + key + "'");
  if (!v->is_uint()) return fail(err, "bad_request", std::string("field '") + key + "' must be a non-negative integer");
  *out = v->u;
  return true;
}

bool parse_op(const std::string& s, Op* op) {
  static const struct { const char* name; Op op; } kOps[] = {
      {"allocate", Op::Allocate}, {"lookup", Op::Lookup}, {"list", Op::List}, {"release", Op::Release},
      {"seal", Op::Seal}, {"stats", Op::Stats}, {"shutdown", Op::Shutdown},
  };
  for (const auto& o : kOps)
    if (s == o.name) { *op = o.op; return true; }
  return false;
}

bool check_keys(const Value& req, Op op, ParseError* err) {
  static const char* kCommon[] = {"v", "token", "op", "id"};
  for (const auto& kv : req.map) {
    bool known = false;
    for (const char* k : kCommon) known |= kv.first == k;
    if (op == Op::Allocate)
      known |= kv.first == "name" || kv.first == "nbytes" || kv.first == "dtype" || kv.first == "shape";
    if (op == Op::Lookup || op == Op::Release || op == Op::Seal) known |= kv.first == "name";
    if (!known) return fail(err, "bad_request", "unknown field '" + printable(kv.first, 64) + "' for this op");
  }
  return true;
}

}  // namespace

size_t dtype_itemsize(const std::string& dtype) {
  for (const auto& d : kDtypes)
    if (dtype == d.name) return d.size;
  return 0;
}

bool valid_buffer_name(const std::string& name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '/' || c == ':' || c == '-';
    if (!ok) return false;
  }
  return true;
}

bool parse_request(const uint8_t* data, size_t size, const std::string& token, Request* out, ParseError* err) {
  Value req;
  std::string why;
  if (!decode(data, size, &req, &why)) return fail(err, "bad_request", "undecodable msgpack: " + why);
  if (req.type != Value::Type::Map) return fail(err, "bad_request", "request must be a msgpack map");
  if (const Value* id = req.get("id")) {
    if (!id->is_uint()) return fail(err, "bad_request", "field 'id' must be a non-negative integer");
    out->has_id = err->has_id = true;
    out->id = err->id = id->u;
  }
  const Value* ver = req.get("v");
  if (!ver || ver->type != Value::Type::Int)
    return fail(err, "bad_request", "missing or non-integer field 'v' (protocol version)");
  if (ver->negative || ver->u != static_cast<uint64_t>(kProtocolVersion))
    return fail(err, "version", "unsupported protocol version; this daemon speaks v" + std::to_string(kProtocolVersion));
  const Value* tok = req.get("token");
  if (!tok || tok->type != Value::Type::Str || !constant_time_equal(tok->s, token))
    return fail(err, "unauthorized", "missing or wrong token");
  std::string op;
  if (!need_str(req, "op", &op, err)) return false;
  if (!parse_op(op, &out->op)) return fail(err, "unknown_op", "unknown op '" + printable(op, 64) + "'");
  if (!check_keys(req, out->op, err)) return false;

  if (out->op == Op::Allocate || out->op == Op::Lookup || out->op == Op::Release || out->op == Op::Seal) {
    if (!need_str(req, "name", &out->name, err)) return false;
    if (!valid_buffer_name(out->name))
      return fail(err, "bad_request", "field 'name' must be 1-256 characters of [A-Za-z0-9._/:-]");
  }
  if (out->op != Op::Allocate) return true;

  if (!need_uint(req, "nbytes", &out->nbytes, err)) return false;
  if (!need_str(req, "dtype", &out->dtype, err)) return false;
  size_t item = dtype_itemsize(out->dtype);
  if (item == 0) return fail(err, "bad_request", "unknown dtype '" + printable(out->dtype, 32) + "'");
  const Value* shape = req.get("shape");
  if (!shape || shape->type != Value::Type::Array) return fail(err, "bad_request", "field 'shape' must be an array");
  if (shape->arr.size() > kMaxRank) return fail(err, "bad_request", "shape has more than 8 dimensions");
  uint64_t numel = 1;
  for (const auto& d : shape->arr) {
    if (!d.is_uint()) return fail(err, "bad_request", "shape entries must be non-negative integers");
    if (d.u != 0 && numel > UINT64_MAX / d.u) return fail(err, "bad_request", "shape overflows 64 bits");
    numel *= d.u;
    out->shape.push_back(d.u);
  }
  if (numel > UINT64_MAX / item || numel * item != out->nbytes)
    return fail(err, "bad_request", "nbytes " + std::to_string(out->nbytes) + " != prod(shape) * itemsize(" +
                                        out->dtype + ")");
  if (out->nbytes == 0) return fail(err, "bad_request", "nbytes must be positive");
  return true;
}

Value make_ok(bool has_id, uint64_t id) {
  Value v = Value::object();
  v.set("v", Value::uint(kProtocolVersion));
  v.set("id", has_id ? Value::uint(id) : Value::nil());
  v.set("ok", Value::boolean(true));
  return v;
}

Value make_error(bool has_id, uint64_t id, const std::string& code, const std::string& message) {
  Value v = Value::object();
  v.set("v", Value::uint(kProtocolVersion));
  v.set("id", has_id ? Value::uint(id) : Value::nil());
  v.set("ok", Value::boolean(false));
  v.set("code", Value::str(code));
  v.set("error", Value::str(message));
  return v;
}

}  // namespace spotserve::daemon
