// The few CUDA driver API entry points spotserve needs (allocate, export and import IPC
// handles), loaded at run time from libcuda.so.1.
//
// Why dlopen instead of linking cudart: the daemon and the _C helpers then build on machines
// without a CUDA toolkit (CPU CI) and run against whatever driver the GPU machine has, and the
// driver API's IPC handle is the same 64-byte blob torch and cudart use. Signatures follow the
// public cuda.h (the *_v2 symbols are the 64-bit-pointer ABI every current driver exports).
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

namespace spotserve::cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
struct CUipcMemHandle { char reserved[64]; };
constexpr unsigned kIpcLazyEnablePeerAccess = 0x1;

struct Driver {
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDeviceGetCount)(int*) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuCtxPushCurrent)(CUcontext) = nullptr;
  CUresult (*cuCtxPopCurrent)(CUcontext*) = nullptr;
  CUresult (*cuMemAlloc)(CUdeviceptr*, size_t) = nullptr;
  CUresult (*cuMemFree)(CUdeviceptr) = nullptr;
  CUresult (*cuMemsetD8)(CUdeviceptr, unsigned char, size_t) = nullptr;
  CUresult (*cuMemGetInfo)(size_t*, size_t*) = nullptr;
  CUresult (*cuIpcGetMemHandle)(CUipcMemHandle*, CUdeviceptr) = nullptr;
  CUresult (*cuIpcOpenMemHandle)(CUdeviceptr*, CUipcMemHandle, unsigned) = nullptr;
  CUresult (*cuIpcCloseMemHandle)(CUdeviceptr) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
  std::string load_error;  // empty when every symbol resolved and cuInit succeeded

  // Human-readable text for a driver error code.
  std::string describe(CUresult r) const {
    const char* s = nullptr;
    if (cuGetErrorString && cuGetErrorString(r, &s) == 0 && s) return s;
    return "CUDA driver error " + std::to_string(r);
  }
};

// The process-wide driver table, loaded on first use; check load_error before calling.
inline const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) { d.load_error = std::string("cannot load libcuda.so.1: ") + dlerror(); return; }
    auto sym = [&](auto** fn, const char* name) {
      *reinterpret_cast<void**>(fn) = dlsym(lib, name);
      if (!*fn && d.load_error.empty()) d.load_error = std::string("libcuda.so.1 lacks ") + name;
    };
    sym(&d.cuInit, "cuInit");
    sym(&d.cuDeviceGet, "cuDeviceGet");
    sym(&d.cuDeviceGetCount, "cuDeviceGetCount");
    sym(&d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    sym(&d.cuCtxPushCurrent, "cuCtxPushCurrent_v2");
    sym(&d.cuCtxPopCurrent, "cuCtxPopCurrent_v2");
    sym(&d.cuMemAlloc, "cuMemAlloc_v2");
    sym(&d.cuMemFree, "cuMemFree_v2");
    sym(&d.cuMemsetD8, "cuMemsetD8_v2");
    sym(&d.cuMemGetInfo, "cuMemGetInfo_v2");
    sym(&d.cuIpcGetMemHandle, "cuIpcGetMemHandle");
    sym(&d.cuIpcOpenMemHandle, "cuIpcOpenMemHandle_v2");
    sym(&d.cuIpcCloseMemHandle, "cuIpcCloseMemHandle");
    sym(&d.cuGetErrorString, "cuGetErrorString");
    if (d.load_error.empty()) {
      CUresult r = d.cuInit(0);
      if (r != 0) d.load_error = "cuInit failed: " + d.describe(r);
    }
  });
  return d;
}

// Makes the device's primary context current for one scope (the context torch also uses).
class ScopedContext {
 public:
  ScopedContext(const Driver& drv, int device, std::string* error) : drv_(drv) {
    CUdevice dev;
    CUcontext ctx;
    CUresult r = drv.cuDeviceGet(&dev, device);
    if (r == 0) r = drv.cuDevicePrimaryCtxRetain(&ctx, dev);  // retained for the process lifetime
    if (r == 0) r = drv.cuCtxPushCurrent(ctx);
    if (r != 0) { *error = "cannot use CUDA device " + std::to_string(device) + ": " + drv.describe(r); return; }
    pushed_ = true;
  }
  ~ScopedContext() {
    CUcontext ignored;
    if (pushed_) drv_.cuCtxPopCurrent(&ignored);
  }
  bool ok() const { return pushed_; }

 private:
  const Driver& drv_;
  bool pushed_ = false;
};

}  // namespace spotserve::cuda
