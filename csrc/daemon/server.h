// The daemon's Unix-socket server: a single-threaded poll loop over non-blocking connections,
// each with its own input and output buffer, so a slow or hostile client cannot stall others.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "buffer_store.h"

namespace spotserve::daemon {

struct ServerOptions {
  std::string socket_path;
  std::string token;
  size_t max_clients = 256;
  size_t max_pending_output = 64u << 20;  // a client that stops reading is dropped past this
  bool verbose = false;
};

class Server {
 public:
  Server(ServerOptions opts, BufferStore* store);
  ~Server();

  // Binds the socket (mode 0600), replacing a stale socket file left by a dead daemon.
  Status listen();
  // Serves until a shutdown request or a byte on `wake_fd` (written by the signal handler).
  void run(int wake_fd);
  // One request payload in, one encoded reply payload out. Pure apart from the store; used by
  // the poll loop and by the fuzz harness.
  std::string handle_payload(const uint8_t* data, size_t size);
  bool shutdown_requested() const { return shutdown_; }

 private:
  struct Conn {
    int fd = -1;
    std::string in;
    std::string out;
    bool close_after_flush = false;
  };
  void accept_clients();
  bool read_client(Conn* c);   // false: drop the connection
  bool write_client(Conn* c);  // false: drop the connection
  void queue_reply(Conn* c, const std::string& payload);
  Value stats() const;

  ServerOptions opts_;
  BufferStore* store_;
  int listen_fd_ = -1;
  std::vector<Conn> conns_;
  bool shutdown_ = false;
  uint64_t requests_ = 0;
  uint64_t errors_ = 0;
  uint64_t clients_total_ = 0;
  std::chrono::steady_clock::time_point started_;
};

// One JSON-lines event on stderr: {"event": name, "pid": ..., <fields>}. Fields are preformatted
// JSON members (`"key":value`).
void log_event(const std::string& event, const std::string& fields = "");
std::string json_string(const std::string& s);

}  // namespace spotserve::daemon
