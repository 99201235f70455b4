// CPU fused bias + activation and SwiGLU, float arithmetic, one rounding to the storage dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "ops.h"

namespace spotserve {
namespace {

float activate(int act, float v) {
  switch (act) {
    case 1: return v > 0.f ? v : 0.f;
    case 2: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case 3: return 0.5f * v * (1.f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case 4:
    case 5: return v / (1.f + std::exp(-v));
    default: return v;
  }
}

}  // namespace

void bias_act_cpu(at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                  const std::string& activation) {
  const int act = check_bias_act_args(out, x, bias, activation);
  const int64_t cols = out.size(-1), in_cols = x.size(-1), rows = cols ? out.numel() / cols : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* bp = bias ? bias->data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    // The biased input is rounded to T first, as an unfused bias add would leave it.
    auto in = [&](const T* row, int64_t c) {
      return bp ? static_cast<float>(static_cast<T>(static_cast<float>(row[c]) + static_cast<float>(bp[c])))
                : static_cast<float>(row[c]);
    };
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xp + r * in_cols;
        T* o = op + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
          const float v = activate(act, in(xr, c));
          o[c] = static_cast<T>(act == 5 ? v * in(xr, cols + c) : v);
        }
      }
    });
  });
}

}  // namespace spotserve
