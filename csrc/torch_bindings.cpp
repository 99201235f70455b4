// The one place that declares spotserve's op schemas. Implementations register per device.
#include "ops.h"

TORCH_LIBRARY(spotserve, m) {
  m.def("reslice_copy(Tensor(a!) dst, Tensor src, int dim, int src_start, int dst_start, int length) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(spotserve, CPU, m) {
  m.impl("reslice_copy", &spotserve::reslice_copy_cpu);
  m.impl("fused_add_rms_norm", &spotserve::fused_add_rms_norm_cpu);
}

#ifdef SPOTSERVE_WITH_CUDA
TORCH_LIBRARY_IMPL(spotserve, CUDA, m) {
  m.impl("reslice_copy", &spotserve::reslice_copy_cuda);
  m.impl("fused_add_rms_norm", &spotserve::fused_add_rms_norm_cuda);
}
#endif
