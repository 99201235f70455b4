// Declarations of spotserve's tensor ops. Schemas live in torch_bindings.cpp; each op has a CPU
// implementation (kernels/cpu) and, in CUDA builds, a CUDA one (kernels/*.cu) registered against
// the same schema, so torch.ops.spotserve.* dispatches on the tensors' device.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

namespace spotserve {

// dst.narrow(dim, dst_start, length) = src.narrow(dim, src_start, length).
// The re-slicing copy of migration: moves the part of a tp shard that overlaps another shard.
void reslice_copy_cpu(at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start,
                      int64_t dst_start, int64_t length);

// residual += x; x = rms_norm(residual) * weight  (rows over the last dim).
void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);

#ifdef SPOTSERVE_WITH_CUDA
void reslice_copy_cuda(at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start,
                       int64_t dst_start, int64_t length);
void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
#endif

// Shared argument checks (one message per mistake, raised as ValueError/RuntimeError in Python).
void check_reslice_args(const at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start,
                        int64_t dst_start, int64_t length);

}  // namespace spotserve
