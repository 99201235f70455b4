// spotserve-daemon: owns one GPU's (or CPU slot's) context buffers so engines can restart and
// re-attach without reloading. Usage:
//   spotserve-daemon --name NAME [--device cpu|cuda:N] [--socket PATH] [--capacity BYTES]
//                    [--token-file PATH] [--verbose]
// The shared token comes from --token-file or the SPOTSERVE_DAEMON_TOKEN environment variable
// (never the command line, which other users can read). Exit status: 0 after shutdown or
// SIGTERM/SIGINT, 2 on bad arguments, 3 when another daemon holds the name, 1 otherwise.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "buffer_store.h"
#include "server.h"

using namespace spotserve::daemon;

namespace {

int g_wake_pipe[2] = {-1, -1};

void on_signal(int) {
  char b = 1;
  ssize_t ignored = write(g_wake_pipe[1], &b, 1);
  (void)ignored;
}

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "spotserve-daemon: %s\n", msg.c_str());
  std::exit(2);
}

int parse_device(const std::string& s) {
  if (s == "cpu") return -1;
  std::string num = s.rfind("cuda:", 0) == 0 ? s.substr(5) : s;
  char* end = nullptr;
  long v = std::strtol(num.c_str(), &end, 10);
  if (num.empty() || *end || v < 0 || v > 1024) usage_error("--device must be cpu, cuda:N or N, got '" + s + "'");
  return static_cast<int>(v);
}

std::string default_socket(const std::string& name) {
  const char* dir = std::getenv("SPOTSERVE_RUN_DIR");
  if (!dir || !*dir) dir = std::getenv("XDG_RUNTIME_DIR");
  if (!dir || !*dir) dir = "/tmp";
  return std::string(dir) + "/spotserve-" + name + ".sock";
}

std::string read_token(const std::string& token_file) {
  std::string token;
  if (!token_file.empty()) {
    std::ifstream f(token_file);
    if (!f) usage_error("cannot read --token-file " + token_file);
    std::getline(f, token);
  } else if (const char* env = std::getenv("SPOTSERVE_DAEMON_TOKEN")) {
    token = env;
  }
  if (token.size() < 16) usage_error("a token of at least 16 characters is required (--token-file or SPOTSERVE_DAEMON_TOKEN)");
  return token;
}

}  // namespace

int main(int argc, char** argv) {
  StoreOptions store_opts;
  ServerOptions server_opts;
  std::string token_file;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--name") store_opts.instance = next();
    else if (a == "--device") store_opts.device = parse_device(next());
    else if (a == "--socket") server_opts.socket_path = next();
    else if (a == "--token-file") token_file = next();
    else if (a == "--capacity") {
      std::string v = next();
      char* end = nullptr;
      store_opts.capacity = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end || v[0] == '-') usage_error("--capacity must be a byte count, got '" + v + "'");
    } else if (a == "--verbose") server_opts.verbose = true;
    else if (a == "--version") { std::printf("spotserve-daemon protocol v%d\n", kProtocolVersion); return 0; }
    else usage_error("unknown argument '" + a + "'");
  }
  if (!valid_instance_name(store_opts.instance)) usage_error("--name must be 1-64 characters of [A-Za-z0-9_-]");
  if (server_opts.socket_path.empty()) server_opts.socket_path = default_socket(store_opts.instance);
  server_opts.token = read_token(token_file);
  store_opts.socket_path = server_opts.socket_path;

  if (pipe2(g_wake_pipe, O_CLOEXEC | O_NONBLOCK) != 0) { std::perror("pipe2"); return 1; }
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaction(sig, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  int rc = 0;
  {
    BufferStore store(store_opts);
    Status s = store.open();
    if (!s.ok()) {
      log_event("start_failed", "\"code\":" + json_string(s.code) + ",\"error\":" + json_string(s.message));
      return s.code == "busy" ? 3 : (s.code == "bad_request" ? 2 : 1);
    }
    if (store.stale_removed() > 0 || store.stale_owner_pid() > 0)
      log_event("stale_removed", "\"segments\":" + std::to_string(store.stale_removed()) +
                                     ",\"owner_pid\":" + std::to_string(store.stale_owner_pid()));
    Server server(server_opts, &store);
    s = server.listen();
    if (!s.ok()) {
      log_event("start_failed", "\"code\":" + json_string(s.code) + ",\"error\":" + json_string(s.message));
      return 1;
    }
    log_event("ready", "\"instance\":" + json_string(store_opts.instance) + ",\"device\":" +
                           std::to_string(store_opts.device) + ",\"epoch\":" + json_string(store.epoch()));
    server.run(g_wake_pipe[0]);
    log_event("shutdown", "\"buffers\":" + std::to_string(store.buffers().size()) +
                              ",\"bytes\":" + std::to_string(store.bytes_used()));
  }  // server closes the socket, store frees the segments and removes the manifest and lock
  return rc;
}
