// Poll loop and request dispatch of the context daemon (see server.h).
#include "server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace spotserve::daemon {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += c; }
    else if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) out += '?';
    else out += c;
  }
  return out + "\"";
}

void log_event(const std::string& event, const std::string& fields) {
  std::fprintf(stderr, "{\"event\":%s,\"pid\":%d%s%s}\n", json_string(event).c_str(), getpid(),
               fields.empty() ? "" : ",", fields.c_str());
  std::fflush(stderr);
}

Server::Server(ServerOptions opts, BufferStore* store)
    : opts_(std::move(opts)), store_(store), started_(std::chrono::steady_clock::now()) {}

Server::~Server() {
  for (auto& c : conns_) ::close(c.fd);
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    ::unlink(opts_.socket_path.c_str());
  }
}

Status Server::listen() {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (opts_.socket_path.empty() || opts_.socket_path.size() >= sizeof addr.sun_path)
    return Status{"bad_request", "socket path must be 1-" + std::to_string(sizeof addr.sun_path - 1) +
                                     " bytes, got " + std::to_string(opts_.socket_path.size())};
  std::memcpy(addr.sun_path, opts_.socket_path.c_str(), opts_.socket_path.size());
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status{"internal", std::string("socket: ") + std::strerror(errno)};
  // We hold the instance lock, so a socket file at our path belongs to a dead predecessor.
  ::unlink(opts_.socket_path.c_str());
  mode_t old = umask(0177);
  int rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  umask(old);
  if (rc != 0) return Status{"internal", "bind " + opts_.socket_path + ": " + std::strerror(errno)};
  if (::listen(listen_fd_, 64) != 0) return Status{"internal", std::string("listen: ") + std::strerror(errno)};
  return Status{};
}

void Server::accept_clients() {
  for (;;) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or a transient error: try again on the next poll
    if (conns_.size() >= opts_.max_clients) {
      ::close(fd);
      log_event("client_refused", "\"reason\":\"too many clients\"");
      continue;
    }
    ++clients_total_;
    Conn c;
    c.fd = fd;
    conns_.push_back(std::move(c));
  }
}

void Server::queue_reply(Conn* c, const std::string& payload) {
  uint32_t n = static_cast<uint32_t>(payload.size());
  char hdr[4] = {static_cast<char>(n >> 24), static_cast<char>(n >> 16), static_cast<char>(n >> 8), static_cast<char>(n)};
  c->out.append(hdr, 4);
  c->out.append(payload);
}

bool Server::read_client(Conn* c) {
  char buf[65536];
  bool eof = false;
  for (;;) {
    ssize_t n = ::recv(c->fd, buf, sizeof buf, 0);
    if (n == 0) { eof = true; break; }
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == EINTR) continue;
      return false;
    }
    c->in.append(buf, static_cast<size_t>(n));
    if (c->in.size() > 2 * (kMaxFrame + 4)) break;  // process before reading more
  }
  size_t pos = 0;
  while (!c->close_after_flush && c->in.size() - pos >= 4) {
    const auto* p = reinterpret_cast<const uint8_t*>(c->in.data() + pos);
    uint32_t len = (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
    if (len == 0 || len > kMaxFrame) {
      // The stream cannot be resynchronised after a bad length: answer, then hang up.
      ++errors_;
      std::string reply;
      encode(make_error(false, 0, "bad_frame",
                        "frame length " + std::to_string(len) + " outside 1.." + std::to_string(kMaxFrame)),
             &reply);
      queue_reply(c, reply);
      c->close_after_flush = true;
      break;
    }
    if (c->in.size() - pos - 4 < len) break;
    queue_reply(c, handle_payload(p + 4, len));
    pos += 4 + len;
    if (shutdown_) c->close_after_flush = true;
  }
  c->in.erase(0, pos);
  if (eof) c->close_after_flush = true;  // answer what was sent before the hang-up, then close
  return c->out.size() <= opts_.max_pending_output;
}

bool Server::write_client(Conn* c) {
  while (!c->out.empty()) {
    ssize_t n = ::send(c->fd, c->out.data(), c->out.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      if (errno == EINTR) continue;
      return false;
    }
    c->out.erase(0, static_cast<size_t>(n));
  }
  return !c->close_after_flush;
}

void Server::run(int wake_fd) {
  log_event("listening", "\"socket\":" + json_string(opts_.socket_path));
  while (!shutdown_) {
    std::vector<pollfd> fds;
    fds.push_back({listen_fd_, POLLIN, 0});
    fds.push_back({wake_fd, POLLIN, 0});
    for (const auto& c : conns_) fds.push_back({c.fd, static_cast<short>(POLLIN | (c.out.empty() ? 0 : POLLOUT)), 0});
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      log_event("poll_failed", "\"error\":" + json_string(std::strerror(errno)));
      break;
    }
    if (fds[1].revents) {
      log_event("signal");
      break;
    }
    std::vector<Conn> alive;
    for (size_t i = 0; i < conns_.size(); ++i) {
      Conn& c = conns_[i];
      short ev = fds[i + 2].revents;
      bool keep = true;
      if (ev & (POLLIN | POLLHUP | POLLERR)) keep = read_client(&c);
      if (keep && (!c.out.empty() || c.close_after_flush)) keep = write_client(&c);
      if (keep) alive.push_back(std::move(c));
      else ::close(c.fd);
    }
    conns_ = std::move(alive);
    if (fds[0].revents & POLLIN) accept_clients();
  }
  // Best effort: let the shutdown reply reach its client before the socket goes away.
  for (auto& c : conns_) {
    int flags = fcntl(c.fd, F_GETFL);
    fcntl(c.fd, F_SETFL, flags & ~O_NONBLOCK);
    c.close_after_flush = false;
    write_client(&c);
  }
}

Value Server::stats() const {
  Value v = Value::object();
  const auto& o = store_->options();
  v.set("pid", Value::integer(getpid()));
  v.set("instance", Value::str(o.instance));
  v.set("epoch", Value::str(store_->epoch()));
  v.set("device", Value::integer(o.device));
  v.set("protocol", Value::uint(kProtocolVersion));
  v.set("buffers", Value::uint(store_->buffers().size()));
  v.set("bytes_used", Value::uint(store_->bytes_used()));
  v.set("capacity", Value::uint(o.capacity));
  v.set("requests", Value::uint(requests_));
  v.set("errors", Value::uint(errors_));
  v.set("clients", Value::uint(conns_.size()));
  v.set("clients_total", Value::uint(clients_total_));
  v.set("stale_removed", Value::uint(static_cast<uint64_t>(store_->stale_removed())));
  v.set("stale_owner_pid", Value::integer(store_->stale_owner_pid()));
  auto up = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  v.set("uptime_s", Value::real(up));
  return v;
}

std::string Server::handle_payload(const uint8_t* data, size_t size) {
  ++requests_;
  Request req;
  ParseError perr;
  Value reply;
  if (!parse_request(data, size, opts_.token, &req, &perr)) {
    reply = make_error(perr.has_id, perr.id, perr.code, perr.message);
  } else {
    Status s;
    reply = make_ok(req.has_id, req.id);
    switch (req.op) {
      case Op::Allocate: {
        const Buffer* b = nullptr;
        bool created = false;
        s = store_->allocate(req, &b, &created);
        if (s.ok()) {
          reply.set("buffer", store_->describe(*b));
          reply.set("created", Value::boolean(created));
        }
        break;
      }
      case Op::Lookup: {
        const Buffer* b = store_->find(req.name);
        if (b) reply.set("buffer", store_->describe(*b));
        else s = Status{"not_found", "no buffer named '" + req.name + "'"};
        break;
      }
      case Op::Seal: {
        const Buffer* b = nullptr;
        s = store_->seal(req.name, &b);
        if (s.ok()) reply.set("buffer", store_->describe(*b));
        break;
      }
      case Op::Release: {
        bool released = false;
        s = store_->release(req.name, &released);
        reply.set("released", Value::boolean(released));
        break;
      }
      case Op::List: {
        std::vector<Value> all;
        for (const auto& kv : store_->buffers()) all.push_back(store_->describe(kv.second));
        reply.set("buffers", Value::array(std::move(all)));
        break;
      }
      case Op::Stats: reply.set("stats", stats()); break;
      case Op::Shutdown: shutdown_ = true; break;
    }
    if (!s.ok()) reply = make_error(req.has_id, req.id, s.code, s.message);
  }
  const Value* ok = reply.get("ok");
  if (!ok || !ok->b) {
    ++errors_;
    if (opts_.verbose) log_event("request_error", "\"code\":" + json_string(reply.get("code")->s));
  }
  std::string out;
  encode(reply, &out);
  return out;
}

}  // namespace spotserve::daemon
