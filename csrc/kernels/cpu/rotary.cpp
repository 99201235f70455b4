// CPU rotary position embedding (GPT-NeoX rotate-half, partial rotary_dim), in place.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "ops.h"

namespace spotserve {
namespace {

template <typename T, typename C>
void rotate_rows(T* base, int64_t stride, int64_t heads, int64_t dim, const C* cs, int64_t half, int64_t t) {
  for (int64_t h = 0; h < heads; ++h) {
    T* x = base + t * stride + h * dim;
    for (int64_t i = 0; i < half; ++i) {
      const float c = static_cast<float>(cs[i]), s = static_cast<float>(cs[half + i]);
      const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
      x[i] = static_cast<T>(x1 * c - x2 * s);
      x[half + i] = static_cast<T>(x2 * c + x1 * s);
    }
  }
}

}  // namespace

void rotary_embedding_cpu(at::Tensor& query, at::Tensor& key, const at::Tensor& positions,
                          const at::Tensor& cos_sin_cache, int64_t rotary_dim) {
  check_rotary_args(query, key, positions, cos_sin_cache, rotary_dim);
  const int64_t tokens = query.size(0), dim = query.size(2), half = rotary_dim / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK_VALUE(pos[t] >= 0 && pos[t] < cos_sin_cache.size(0), "rotary_embedding: positions[", t, "] = ", pos[t],
                      " outside the cache's ", cos_sin_cache.size(0), " positions");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "rotary_embedding_cpu", [&] {
    using T = scalar_t;
    T* qp = query.data_ptr<T>();
    T* kp = key.data_ptr<T>();
    auto run = [&](auto* cache) {
      at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const auto* cs = cache + pos[t] * rotary_dim;
          rotate_rows(qp, query.stride(0), query.size(1), dim, cs, half, t);
          rotate_rows(kp, key.stride(0), key.size(1), dim, cs, half, t);
        }
      });
    };
    if (cos_sin_cache.scalar_type() == at::kFloat) run(cos_sin_cache.data_ptr<float>());
    else run(cos_sin_cache.data_ptr<T>());
  });
}

}  // namespace spotserve
