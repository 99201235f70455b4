// Buffer registry of the context daemon (see buffer_store.h).
#include "buffer_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "cuda_driver.h"

namespace spotserve::daemon {

namespace {

Status err(const char* code, std::string msg) { return Status{code, std::move(msg)}; }

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

std::string random_epoch() {
  std::random_device rd;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%08x", static_cast<unsigned>(rd()));
  return buf;
}

}  // namespace

bool valid_instance_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
      return false;
  return true;
}

BufferStore::BufferStore(StoreOptions opts) : opts_(std::move(opts)), epoch_(random_epoch()) {}

BufferStore::~BufferStore() { close(); }

Status BufferStore::take_lock() {
  const std::string lock_path = path(prefix() + "lock");
  // Retry if the file we locked was unlinked by an exiting owner in between (then it is not
  // the lock anyone else will look at).
  for (int attempt = 0; attempt < 8; ++attempt) {
    int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return err("internal", errno_text("cannot open lock " + lock_path));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      int e = errno;
      ::close(fd);
      if (e == EWOULDBLOCK) {
        std::ifstream m(path(prefix() + "manifest"));
        std::string text((std::istreambuf_iterator<char>(m)), std::istreambuf_iterator<char>());
        return err("busy", "another daemon named '" + opts_.instance + "' is running (manifest: " + text + ")");
      }
      errno = e;
      return err("internal", errno_text("flock " + lock_path));
    }
    struct stat held, current;
    if (fstat(fd, &held) == 0 && stat(lock_path.c_str(), &current) == 0 && held.st_ino == current.st_ino &&
        held.st_dev == current.st_dev) {
      lock_fd_ = fd;
      return Status{};
    }
    ::close(fd);
  }
  return err("internal", "lock file " + lock_path + " keeps changing");
}

void BufferStore::remove_stale() {
  {
    std::ifstream m(path(prefix() + "manifest"));
    std::string text((std::istreambuf_iterator<char>(m)), std::istreambuf_iterator<char>());
    auto at = text.find("\"pid\":");
    if (at != std::string::npos) stale_owner_pid_ = std::strtol(text.c_str() + at + 6, nullptr, 10);
  }
  DIR* dir = opendir(opts_.shm_dir.c_str());
  if (!dir) return;
  const std::string pre = prefix();
  std::vector<std::string> victims;
  while (dirent* e = readdir(dir)) {
    std::string leaf = e->d_name;
    if (leaf.compare(0, pre.size(), pre) == 0 && leaf != pre + "lock" && leaf != pre + "manifest") victims.push_back(leaf);
  }
  closedir(dir);
  for (const auto& leaf : victims)
    if (::unlink(path(leaf).c_str()) == 0) ++stale_removed_;
  ::unlink(path(pre + "manifest").c_str());
}

Status BufferStore::write_manifest() {
  const std::string final_path = path(prefix() + "manifest");
  const std::string tmp = final_path + ".tmp";
  std::ostringstream os;
  os << "{\"pid\":" << getpid() << ",\"instance\":\"" << opts_.instance << "\",\"epoch\":\"" << epoch_
     << "\",\"device\":" << opts_.device << ",\"socket\":\"" << opts_.socket_path << "\"}\n";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << os.str();
    if (!f) return err("internal", "cannot write manifest " + tmp);
  }
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) return err("internal", errno_text("rename " + tmp));
  return Status{};
}

Status BufferStore::open() {
  if (!valid_instance_name(opts_.instance))
    return err("bad_request", "instance name must be 1-64 characters of [A-Za-z0-9_-]");
  if (opts_.device >= 0) {
    const auto& drv = cuda::driver();
    if (!drv.load_error.empty()) return err("internal", drv.load_error);
    int count = 0;
    drv.cuDeviceGetCount(&count);
    if (opts_.device >= count)
      return err("bad_request", "CUDA device " + std::to_string(opts_.device) + " does not exist (" +
                                    std::to_string(count) + " visible)");
  }
  Status s = take_lock();
  if (!s.ok()) return s;
  remove_stale();
  s = write_manifest();
  if (!s.ok()) return s;
  open_ = true;
  return Status{};
}

void BufferStore::close() {
  for (auto& kv : buffers_) destroy(&kv.second);
  buffers_.clear();
  bytes_used_ = 0;
  if (lock_fd_ >= 0) {
    ::unlink(path(prefix() + "manifest").c_str());
    // Unlink while still holding the lock; take_lock's inode check makes this race-free.
    ::unlink(path(prefix() + "lock").c_str());
    ::close(lock_fd_);
    lock_fd_ = -1;
  }
  open_ = false;
}

Status BufferStore::create_cpu(Buffer* b) {
  b->segment = prefix() + epoch_ + "." + std::to_string(next_segment_++);
  const std::string shm_name = "/" + b->segment;
  int fd = shm_open(shm_name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return err("internal", errno_text("shm_open " + shm_name));
  // Reserve the pages now: a sparse segment could SIGBUS the engine later when tmpfs fills up.
  int rc = posix_fallocate(fd, 0, static_cast<off_t>(b->nbytes));
  if (rc == EOPNOTSUPP || rc == EINVAL) rc = ftruncate(fd, static_cast<off_t>(b->nbytes)) == 0 ? 0 : errno;
  if (rc != 0) {
    ::close(fd);
    shm_unlink(shm_name.c_str());
    return err(rc == ENOSPC ? "no_memory" : "internal",
               "cannot size shm segment to " + std::to_string(b->nbytes) + " bytes: " + std::strerror(rc));
  }
  b->fd = fd;
  return Status{};
}

Status BufferStore::create_gpu(Buffer* b) {
  const auto& drv = cuda::driver();
  std::string why;
  cuda::ScopedContext ctx(drv, opts_.device, &why);
  if (!ctx.ok()) return err("internal", why);
  cuda::CUdeviceptr ptr = 0;
  cuda::CUresult r = drv.cuMemAlloc(&ptr, b->nbytes);
  if (r != 0) return err("no_memory", "cuMemAlloc of " + std::to_string(b->nbytes) + " bytes: " + drv.describe(r));
  // Zero like a fresh shm segment, so both backends hand out the same initial contents.
  r = drv.cuMemsetD8(ptr, 0, b->nbytes);
  cuda::CUipcMemHandle handle;
  if (r == 0) r = drv.cuIpcGetMemHandle(&handle, ptr);
  if (r != 0) {
    drv.cuMemFree(ptr);
    return err("internal", "exporting CUDA IPC handle: " + drv.describe(r));
  }
  b->dptr = ptr;
  b->ipc_handle.assign(handle.reserved, sizeof handle.reserved);
  return Status{};
}

void BufferStore::destroy(Buffer* b) {
  if (b->fd >= 0) {
    ::close(b->fd);
    shm_unlink(("/" + b->segment).c_str());
    b->fd = -1;
  }
  if (b->dptr) {
    const auto& drv = cuda::driver();
    std::string why;
    cuda::ScopedContext ctx(drv, opts_.device, &why);
    if (ctx.ok()) drv.cuMemFree(b->dptr);
    b->dptr = 0;
  }
}

Status BufferStore::allocate(const Request& req, const Buffer** out, bool* created) {
  if (!open_) return err("internal", "store is closed");
  auto it = buffers_.find(req.name);
  if (it != buffers_.end()) {
    const Buffer& b = it->second;
    if (b.dtype != req.dtype || b.shape != req.shape)
      return err("exists", "buffer '" + req.name + "' exists with a different dtype or shape");
    *out = &b;
    *created = false;
    return Status{};
  }
  if (opts_.capacity && req.nbytes > opts_.capacity - bytes_used_)
    return err("no_memory", "allocating " + std::to_string(req.nbytes) + " bytes would exceed capacity " +
                                std::to_string(opts_.capacity) + " (" + std::to_string(bytes_used_) + " used)");
  Buffer b;
  b.name = req.name;
  b.nbytes = req.nbytes;
  b.dtype = req.dtype;
  b.shape = req.shape;
  Status s = opts_.device < 0 ? create_cpu(&b) : create_gpu(&b);
  if (!s.ok()) return s;
  bytes_used_ += b.nbytes;
  auto ins = buffers_.emplace(b.name, std::move(b));
  *out = &ins.first->second;
  *created = true;
  return Status{};
}

const Buffer* BufferStore::find(const std::string& name) const {
  auto it = buffers_.find(name);
  return it == buffers_.end() ? nullptr : &it->second;
}

Status BufferStore::seal(const std::string& name, const Buffer** out) {
  auto it = buffers_.find(name);
  if (it == buffers_.end()) return err("not_found", "no buffer named '" + name + "'");
  it->second.sealed = true;
  *out = &it->second;
  return Status{};
}

Status BufferStore::release(const std::string& name, bool* released) {
  auto it = buffers_.find(name);
  *released = it != buffers_.end();
  if (!*released) return Status{};
  bytes_used_ -= it->second.nbytes;
  destroy(&it->second);
  buffers_.erase(it);
  return Status{};
}

Value BufferStore::describe(const Buffer& b) const {
  Value v = Value::object();
  v.set("name", Value::str(b.name));
  v.set("nbytes", Value::uint(b.nbytes));
  v.set("dtype", Value::str(b.dtype));
  std::vector<Value> shape;
  for (uint64_t d : b.shape) shape.push_back(Value::uint(d));
  v.set("shape", Value::array(std::move(shape)));
  v.set("sealed", Value::boolean(b.sealed));
  v.set("epoch", Value::str(epoch_));
  if (opts_.device < 0) {
    v.set("kind", Value::str("shm"));
    v.set("handle", Value::str("/" + b.segment));
    v.set("device", Value::integer(-1));
  } else {
    v.set("kind", Value::str("cuda_ipc"));
    v.set("handle", Value::bin(b.ipc_handle));
    v.set("device", Value::integer(opts_.device));
  }
  v.set("offset", Value::uint(0));
  return v;
}

}  // namespace spotserve::daemon
