// The daemon's named buffers and the host-wide bookkeeping that makes them safe to share:
// POSIX shm segments (CPU) or cuMemAlloc allocations exported as IPC handles (GPU), an exclusive
// per-instance lock, a manifest naming the owner pid, and removal of a dead daemon's segments.
//
// Every host-global name derives from the instance name: /dev/shm/spotserve.<instance>.lock,
// .../spotserve.<instance>.manifest and segments spotserve.<instance>.<epoch>.<n>. Two daemons
// with different instance names never touch each other's files; two with the same name are
// refused by the lock (flock is released by the kernel even on SIGKILL, so a held lock means a
// live owner and a free lock means anything left under the prefix is stale).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "msgpack_lite.h"
#include "protocol.h"

namespace spotserve::daemon {

struct StoreOptions {
  std::string instance;     // [A-Za-z0-9_-]{1,64}
  int device = -1;          // -1: CPU (shm); >= 0: CUDA device ordinal
  uint64_t capacity = 0;    // bytes; 0 = no limit beyond the memory itself
  std::string socket_path;  // recorded in the manifest for operators
  std::string shm_dir = "/dev/shm";
};

struct Status {
  std::string code;  // empty: success; else a protocol error code
  std::string message;
  bool ok() const { return code.empty(); }
};

struct Buffer {
  std::string name;
  uint64_t nbytes = 0;
  std::string dtype;
  std::vector<uint64_t> shape;
  bool sealed = false;
  std::string segment;  // CPU: shm name without the leading '/'
  int fd = -1;          // CPU: kept open so the segment lives while the daemon does
  uint64_t dptr = 0;    // GPU: device pointer
  std::string ipc_handle;  // GPU: 64-byte CUDA IPC handle
};

bool valid_instance_name(const std::string& name);

class BufferStore {
 public:
  explicit BufferStore(StoreOptions opts);
  ~BufferStore();
  BufferStore(const BufferStore&) = delete;
  BufferStore& operator=(const BufferStore&) = delete;

  // Takes the instance lock, removes a dead predecessor's segments, writes the manifest.
  Status open();
  // Frees every buffer and removes the manifest and lock. Idempotent.
  void close();

  // Creates `req.name`, or returns the existing buffer when dtype and shape match (*created=false).
  Status allocate(const Request& req, const Buffer** out, bool* created);
  const Buffer* find(const std::string& name) const;
  Status seal(const std::string& name, const Buffer** out);
  // *released is false when no such buffer existed (release is idempotent).
  Status release(const std::string& name, bool* released);

  const std::map<std::string, Buffer>& buffers() const { return buffers_; }
  uint64_t bytes_used() const { return bytes_used_; }
  const std::string& epoch() const { return epoch_; }
  const StoreOptions& options() const { return opts_; }
  int stale_removed() const { return stale_removed_; }
  long stale_owner_pid() const { return stale_owner_pid_; }

  // The wire description of a buffer: everything a client needs to map it.
  Value describe(const Buffer& b) const;

 private:
  std::string prefix() const { return "spotserve." + opts_.instance + "."; }
  std::string path(const std::string& leaf) const { return opts_.shm_dir + "/" + leaf; }
  Status take_lock();
  void remove_stale();
  Status write_manifest();
  Status create_cpu(Buffer* b);
  Status create_gpu(Buffer* b);
  void destroy(Buffer* b);

  StoreOptions opts_;
  std::map<std::string, Buffer> buffers_;
  uint64_t bytes_used_ = 0;
  uint64_t next_segment_ = 0;
  std::string epoch_;
  int lock_fd_ = -1;
  bool open_ = false;
  int stale_removed_ = 0;
  long stale_owner_pid_ = 0;
};

}  // namespace spotserve::daemon
