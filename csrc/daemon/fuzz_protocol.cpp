// Fuzz target for the daemon's request path: msgpack decoding, request validation and dispatch
// against a real CPU store (capacity-capped). Properties checked on every input:
//   - nothing crashes or reads out of bounds (run under ASan/UBSan);
//   - every reply decodes as a map with a boolean 'ok', and failures carry 'code' and 'error';
//   - anything the decoder accepts re-encodes to bytes that decode to the same encoding.
// With Clang this is a libFuzzer target. Otherwise SPOTSERVE_FUZZ_STANDALONE builds a driver:
//   spotserve-daemon-fuzz [iterations] [seed]
// that mutates valid requests and random bytes with a seeded generator.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>

#include "buffer_store.h"
#include "msgpack_lite.h"
#include "protocol.h"
#include "server.h"

using namespace spotserve::daemon;

namespace {

const char kToken[] = "fuzz-token-0123456789";

Server& server() {
  static std::unique_ptr<BufferStore> store;
  static std::unique_ptr<Server> srv;
  if (!srv) {
    StoreOptions so;
    so.instance = "fuzz" + std::to_string(getpid());
    so.capacity = 1 << 20;
    store = std::make_unique<BufferStore>(so);
    Status s = store->open();
    if (!s.ok()) { std::fprintf(stderr, "store: %s\n", s.message.c_str()); std::abort(); }
    ServerOptions o;
    o.token = kToken;
    srv = std::make_unique<Server>(o, store.get());
    std::atexit([] { srv.reset(); store.reset(); });
  }
  return *srv;
}

void check(bool cond, const char* what) {
  if (!cond) { std::fprintf(stderr, "fuzz property violated: %s\n", what); std::abort(); }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Value v;
  std::string why;
  if (decode(data, size, &v, &why)) {
    std::string once, twice;
    encode(v, &once);
    Value again;
    check(decode(reinterpret_cast<const uint8_t*>(once.data()), once.size(), &again, &why), "re-decode");
    encode(again, &twice);
    check(once == twice, "stable re-encoding");
  }
  std::string reply = server().handle_payload(data, size);
  Value r;
  check(decode(reinterpret_cast<const uint8_t*>(reply.data()), reply.size(), &r, &why), "reply decodes");
  const Value* ok = r.get("ok");
  check(ok && ok->type == Value::Type::Bool, "reply has boolean ok");
  if (!ok->b) check(r.get("code") && r.get("error"), "error reply has code and error");
  return 0;
}

#ifdef SPOTSERVE_FUZZ_STANDALONE
namespace {

std::string request(const std::string& op, bool with_alloc_args) {
  Value m = Value::object();
  m.set("v", Value::uint(kProtocolVersion));
  m.set("token", Value::str(kToken));
  m.set("op", Value::str(op));
  m.set("id", Value::uint(7));
  if (op != "list" && op != "stats") m.set("name", Value::str("w/layers.0.q"));
  if (with_alloc_args) {
    m.set("nbytes", Value::uint(64));
    m.set("dtype", Value::str("float16"));
    m.set("shape", Value::array({Value::uint(4), Value::uint(8)}));
  }
  std::string out;
  encode(m, &out);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  long iterations = argc > 1 ? std::atol(argv[1]) : 200000;
  unsigned seed = argc > 2 ? static_cast<unsigned>(std::atol(argv[2])) : 1;
  std::mt19937 rng(seed);
  const std::string seeds[] = {request("allocate", true), request("lookup", false), request("seal", false),
                               request("list", false), request("stats", false), request("release", false)};
  for (long i = 0; i < iterations; ++i) {
    std::string in;
    if (rng() % 4 == 0) {
      in.resize(rng() % 64);
      for (auto& c : in) c = static_cast<char>(rng());
    } else {
      in = seeds[rng() % 6];
      int edits = 1 + rng() % 4;
      for (int e = 0; e < edits && !in.empty(); ++e) {
        size_t at = rng() % in.size();
        switch (rng() % 5) {
          case 0: in[at] = static_cast<char>(in[at] ^ (1 << (rng() % 8))); break;
          case 1: in[at] = static_cast<char>(rng()); break;
          case 2: in.resize(at); break;
          case 3: in.insert(at, 1, static_cast<char>(rng())); break;
          case 4: in[at] = static_cast<char>(0xc0 | (rng() % 0x40)); break;  // type tags
        }
      }
    }
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(in.data()), in.size());
  }
  std::printf("fuzzed %ld inputs (seed %u) without a property violation\n", iterations, seed);
  return 0;
}
#endif
