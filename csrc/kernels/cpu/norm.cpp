// CPU fused residual add + RMSNorm / LayerNorm, accumulating in float whatever the storage dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "ops.h"

namespace spotserve {
namespace {

template <typename scalar_t, bool kLayer>
void add_norm_rows(scalar_t* xp, scalar_t* rp, const scalar_t* wp, const scalar_t* bp, int64_t rows, int64_t hidden,
                   float eps) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* xr = xp + r * hidden;
      scalar_t* rr = rp + r * hidden;
      float sum = 0.f;
      for (int64_t i = 0; i < hidden; ++i) {
        // Round the sum to the storage dtype first, as the unfused reference does.
        scalar_t s = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
        rr[i] = s;
        const float v = static_cast<float>(s);
        sum += kLayer ? v : v * v;
      }
      float mean = 0.f, inv;
      if constexpr (kLayer) {
        mean = sum / static_cast<float>(hidden);
        float sq = 0.f;
        for (int64_t i = 0; i < hidden; ++i) {
          const float d = static_cast<float>(rr[i]) - mean;
          sq += d * d;
        }
        inv = 1.f / std::sqrt(sq / static_cast<float>(hidden) + eps);
      } else {
        inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      }
      for (int64_t i = 0; i < hidden; ++i) {
        const float s = static_cast<float>(rr[i]), w = static_cast<float>(wp[i]);
        if constexpr (kLayer) {
          const float b = bp ? static_cast<float>(bp[i]) : 0.f;
          xr[i] = static_cast<scalar_t>((s - mean) * inv * w + b);
        } else {
          // Normalise in float, round to the storage dtype, then scale: the order Hugging Face uses.
          const scalar_t h = static_cast<scalar_t>(s * inv);
          xr[i] = static_cast<scalar_t>(static_cast<float>(h) * w);
        }
      }
    }
  });
}

template <bool kLayer>
void add_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              double eps) {
  const int64_t hidden = x.size(-1), rows = x.numel() / std::max<int64_t>(hidden, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_norm_cpu", [&] {
    add_norm_rows<scalar_t, kLayer>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                                    weight.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr, rows,
                                    hidden, static_cast<float>(eps));
  });
}

}  // namespace

void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_add_norm_args("fused_add_rms_norm", x, residual, weight, std::nullopt);
  add_norm<false>(x, residual, weight, std::nullopt, eps);
}

void fused_add_layer_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  check_add_norm_args("fused_add_layer_norm", x, residual, weight, bias);
  add_norm<true>(x, residual, weight, bias, eps);
}

}  // namespace spotserve
