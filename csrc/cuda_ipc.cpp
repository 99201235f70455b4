// spotserve._C.cuda_ipc_tensor: opens a context daemon's CUDA IPC handle and wraps the memory as
// a torch tensor without copying. Uses the driver API through daemon/cuda_driver.h (dlopen), so
// this file builds without CUDA headers and CPU builds only fail when it is called.
//
// The driver refuses to open the same handle twice in one context, and several tensors may view
// one buffer, so mappings are cached per handle and reference-counted by the tensors' deleters.
#include <torch/extension.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "daemon/cuda_driver.h"

namespace py = pybind11;

namespace spotserve {
namespace {

struct Mapping {
  cuda::CUdeviceptr ptr = 0;
  int device = 0;
  int refs = 0;
};

std::mutex g_mu;
std::map<std::string, Mapping> g_mappings;

at::ScalarType scalar_type(const std::string& dtype) {
  static const std::map<std::string, at::ScalarType> kTypes = {
      {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"float64", at::kDouble},
      {"float8_e4m3fn", at::kFloat8_e4m3fn}, {"float8_e5m2", at::kFloat8_e5m2}, {"int8", at::kChar},
      {"uint8", at::kByte}, {"int16", at::kShort}, {"int32", at::kInt}, {"int64", at::kLong}, {"bool", at::kBool},
  };
  auto it = kTypes.find(dtype);
  TORCH_CHECK_VALUE(it != kTypes.end(), "unsupported dtype '", dtype, "'");
  return it->second;
}

void release_mapping(const std::string& key) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_mappings.find(key);
  if (it == g_mappings.end() || --it->second.refs > 0) return;
  const auto& drv = cuda::driver();
  std::string why;
  cuda::ScopedContext ctx(drv, it->second.device, &why);
  if (ctx.ok()) drv.cuIpcCloseMemHandle(it->second.ptr);
  g_mappings.erase(it);
}

at::Tensor cuda_ipc_tensor(py::bytes handle, int64_t device, int64_t offset, int64_t nbytes, const std::string& dtype,
                           std::vector<int64_t> shape) {
  std::string key = handle;
  TORCH_CHECK_VALUE(key.size() == sizeof(cuda::CUipcMemHandle), "CUDA IPC handle must be 64 bytes, got ",
                    key.size());
  TORCH_CHECK_VALUE(device >= 0 && offset >= 0 && nbytes > 0, "bad device/offset/nbytes");
  at::ScalarType st = scalar_type(dtype);
  int64_t numel = 1;
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, "negative dimension in shape");
    numel *= d;
  }
  TORCH_CHECK_VALUE(numel * static_cast<int64_t>(c10::elementSize(st)) == nbytes, "shape and dtype do not make ",
                    nbytes, " bytes");
  const auto& drv = cuda::driver();
  TORCH_CHECK(drv.load_error.empty(), drv.load_error);

  cuda::CUdeviceptr base = 0;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_mappings.find(key);
    if (it == g_mappings.end()) {
      std::string why;
      cuda::ScopedContext ctx(drv, static_cast<int>(device), &why);
      TORCH_CHECK(ctx.ok(), why);
      cuda::CUipcMemHandle h;
      std::memcpy(h.reserved, key.data(), sizeof h.reserved);
      cuda::CUdeviceptr ptr = 0;
      cuda::CUresult r = drv.cuIpcOpenMemHandle(&ptr, h, cuda::kIpcLazyEnablePeerAccess);
      TORCH_CHECK(r == 0, "cuIpcOpenMemHandle: ", drv.describe(r));
      it = g_mappings.emplace(key, Mapping{ptr, static_cast<int>(device), 0}).first;
    }
    ++it->second.refs;
    base = it->second.ptr;
  }
  auto options = at::TensorOptions().dtype(st).device(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
  try {
    return at::from_blob(reinterpret_cast<void*>(base + static_cast<uint64_t>(offset)), shape,
                         [key](void*) { release_mapping(key); }, options);
  } catch (...) {
    release_mapping(key);
    throw;
  }
}

size_t open_mappings() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_mappings.size();
}

}  // namespace

void register_cuda_ipc(py::module_& m) {
  m.def("cuda_ipc_tensor", &cuda_ipc_tensor, py::arg("handle"), py::arg("device"), py::arg("offset"),
        py::arg("nbytes"), py::arg("dtype"), py::arg("shape"),
        "Tensor over a context daemon's CUDA buffer (CUDA IPC handle, no copy). Raises ValueError for a "
        "malformed handle/shape and RuntimeError when the driver cannot open it.");
  m.def("cuda_ipc_open_mappings", &open_mappings, "Number of CUDA IPC mappings this process holds open.");
}

}  // namespace spotserve
