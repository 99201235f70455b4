// pybind11 module spotserve._C: loading it registers the torch ops (torch_bindings.cpp);
// it also carries the non-tensor helpers.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace spotserve {
void register_cuda_ipc(py::module_& m);  // cuda_ipc.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "spotserve native extension: torch ops (torch.ops.spotserve.*) and helpers";
#ifdef SPOTSERVE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("abi_version") = 1;
  spotserve::register_cuda_ipc(m);
}
