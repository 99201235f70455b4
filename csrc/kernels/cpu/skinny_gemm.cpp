// skinny_gemm on the CPU (a library GEMM: the op exists for its CUDA kernel) and its argument checks.
#include <ATen/ATen.h>

#include "ops.h"

namespace spotserve {

void check_skinny_gemm_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t split_k) {
  const char* op = "skinny_gemm";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dim ([..., K]), got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), op, ": x has K = ", x.size(-1), " features, weight ",
                    weight.sizes(), " expects ", weight.size(1));
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
                    ", x has ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == weight.device(), op, ": weight is on ", weight.device(), ", x on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [",
                      weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias->scalar_type(),
                      ", x has ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), ", x on ", x.device());
  }
  TORCH_CHECK_VALUE(split_k >= 0 && split_k <= 8, op, ": split_k must be in [0, 8] (0 = auto), got ", split_k);
}

at::Tensor skinny_gemm_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t split_k) {
  check_skinny_gemm_args(x, weight, bias, split_k);
  return at::linear(x, weight, bias).contiguous();
}

}  // namespace spotserve
