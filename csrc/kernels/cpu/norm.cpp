// CPU fused residual add + RMSNorm, accumulating in float whatever the storage dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "ops.h"

namespace spotserve {

void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "fused_add_rms_norm: x and residual shapes differ");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "fused_add_rms_norm: tensors must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "fused_add_rms_norm: weight must be [hidden]");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "fused_add_rms_norm: dtypes must match");
  const int64_t hidden = x.size(-1), rows = x.numel() / std::max<int64_t>(hidden, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_add_rms_norm_cpu", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* xr = xp + r * hidden;
        scalar_t* rr = rp + r * hidden;
        float sumsq = 0.f;
        for (int64_t i = 0; i < hidden; ++i) {
          // Round the sum to the storage dtype first, as the unfused reference does.
          scalar_t s = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          rr[i] = s;
          float v = static_cast<float>(s);
          sumsq += v * v;
        }
        const float inv = 1.f / std::sqrt(sumsq / static_cast<float>(hidden) + static_cast<float>(eps));
        // Normalise in float, round to the storage dtype, then scale: the order Hugging Face uses.
        for (int64_t i = 0; i < hidden; ++i) {
          scalar_t h = static_cast<scalar_t>(static_cast<float>(rr[i]) * inv);
          xr[i] = static_cast<scalar_t>(static_cast<float>(h) * static_cast<float>(wp[i]));
        }
      }
    });
  });
}

}  // namespace spotserve
