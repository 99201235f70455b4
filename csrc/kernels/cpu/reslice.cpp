// CPU re-slicing copy: a strided block copy, one memcpy per outer row.
#include <ATen/Parallel.h>
#include <cstring>

#include "ops.h"

namespace spotserve {

void check_reslice_args(const at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start,
                        int64_t dst_start, int64_t length) {
  TORCH_CHECK(dst.dim() == src.dim(), "reslice_copy: dst has ", dst.dim(), " dims, src has ", src.dim());
  TORCH_CHECK(dim >= 0 && dim < src.dim(), "reslice_copy: dim ", dim, " out of range for ", src.dim(), "-d tensors");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "reslice_copy: dtype mismatch ", dst.scalar_type(), " vs ",
              src.scalar_type());
  TORCH_CHECK(dst.device() == src.device(), "reslice_copy: device mismatch");
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "reslice_copy: tensors must be contiguous");
  for (int64_t d = 0; d < src.dim(); ++d) {
    if (d != dim)
      TORCH_CHECK(dst.size(d) == src.size(d), "reslice_copy: size mismatch at dim ", d, ": ", dst.size(d), " vs ",
                  src.size(d));
  }
  TORCH_CHECK(length >= 0 && src_start >= 0 && src_start + length <= src.size(dim),
              "reslice_copy: source range [", src_start, ", ", src_start + length, ") outside size ", src.size(dim));
  TORCH_CHECK(dst_start >= 0 && dst_start + length <= dst.size(dim), "reslice_copy: destination range [", dst_start,
              ", ", dst_start + length, ") outside size ", dst.size(dim));
}

void reslice_copy_cpu(at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start, int64_t dst_start,
                      int64_t length) {
  check_reslice_args(dst, src, dim, src_start, dst_start, length);
  if (length == 0 || src.numel() == 0) return;
  const int64_t elem = src.element_size();
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= src.size(d);
  for (int64_t d = dim + 1; d < src.dim(); ++d) inner *= src.size(d);
  const int64_t row = length * inner * elem;
  const int64_t src_pitch = src.size(dim) * inner * elem, dst_pitch = dst.size(dim) * inner * elem;
  const char* s = static_cast<const char*>(src.data_ptr()) + src_start * inner * elem;
  char* d = static_cast<char*>(dst.data_ptr()) + dst_start * inner * elem;
  // Rows are independent; a grain keeps small copies on one thread.
  at::parallel_for(0, outer, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) std::memcpy(d + r * dst_pitch, s + r * src_pitch, row);
                   });
}

}  // namespace spotserve
