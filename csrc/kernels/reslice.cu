// CUDA re-slicing copy: one cudaMemcpy2DAsync on the current stream (graph-capturable, no sync).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "ops.h"

namespace spotserve {

void reslice_copy_cuda(at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start, int64_t dst_start,
                       int64_t length) {
  check_reslice_args(dst, src, dim, src_start, dst_start, length);
  if (length == 0 || src.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard guard(dst.device());
  const int64_t elem = src.element_size();
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= src.size(d);
  for (int64_t d = dim + 1; d < src.dim(); ++d) inner *= src.size(d);
  const size_t row = length * inner * elem;
  const size_t src_pitch = src.size(dim) * inner * elem, dst_pitch = dst.size(dim) * inner * elem;
  const char* s = static_cast<const char*>(src.data_ptr()) + src_start * inner * elem;
  char* d = static_cast<char*>(dst.data_ptr()) + dst_start * inner * elem;
  C10_CUDA_CHECK(cudaMemcpy2DAsync(d, dst_pitch, s, src_pitch, row, outer, cudaMemcpyDeviceToDevice,
                                   at::cuda::getCurrentCUDAStream()));
}

}  // namespace spotserve
