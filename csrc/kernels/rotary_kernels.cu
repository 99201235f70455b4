// Rotary position embedding, GPT-NeoX "rotate half" form, in place on the first rotary_dim
// elements of every query and key head (partial rotary for GPT-NeoX's rotary_pct < 1).
// cos_sin_cache[pos] holds rotary_dim values: rotary_dim/2 cosines, then rotary_dim/2 sines.
#include <algorithm>

#include "kernels/vec.cuh"

namespace spotserve {
namespace kern {
namespace {

template <typename T, typename C>
__device__ __forceinline__ void rotate_pair(T* head, const C* cs, int half, int i) {
  const float c = to_float(cs[i]), s = to_float(cs[half + i]);
  const float x1 = to_float(head[i]), x2 = to_float(head[half + i]);
  head[i] = from_float<T>(x1 * c - x2 * s);
  head[half + i] = from_float<T>(x2 * c + x1 * s);
}

// One CTA per token; threads walk the (head, pair) grid of its query and key heads.
template <typename T, typename C>
__global__ void rotary_kernel(T* __restrict__ query, T* __restrict__ key, const int64_t* __restrict__ positions,
                              const C* __restrict__ cache, int num_heads, int kv_heads, int head_dim, int rotary_dim,
                              int64_t q_stride, int64_t k_stride) {
  const int tok = blockIdx.x;
  const int half = rotary_dim / 2;
  const C* cs = cache + positions[tok] * rotary_dim;
  T* q = query + tok * q_stride;
  T* k = key + tok * k_stride;
  const int nq = num_heads * half, nk = kv_heads * half;
  for (int idx = threadIdx.x; idx < nq + nk; idx += blockDim.x) {
    if (idx < nq) {
      rotate_pair(q + (idx / half) * head_dim, cs, half, idx % half);
    } else {
      const int j = idx - nq;
      rotate_pair(k + (j / half) * head_dim, cs, half, j % half);
    }
  }
}

}  // namespace

cudaError_t launch_rotary(DType dt, bool cache_is_float, void* query, void* key, const int64_t* positions,
                          const void* cos_sin_cache, int num_tokens, int num_heads, int kv_heads, int head_dim,
                          int rotary_dim, int64_t q_stride, int64_t k_stride, cudaStream_t stream) {
  if (num_tokens == 0 || rotary_dim == 0) return cudaSuccess;
  const int pairs = (num_heads + kv_heads) * (rotary_dim / 2);
  const int threads = std::min(512, std::max(32, (pairs + 31) / 32 * 32));
  return dispatch_dtype(dt, [&](auto zero) {
    using T = decltype(zero);
    if (cache_is_float)
      rotary_kernel<T, float><<<num_tokens, threads, 0, stream>>>(
          static_cast<T*>(query), static_cast<T*>(key), positions, static_cast<const float*>(cos_sin_cache),
          num_heads, kv_heads, head_dim, rotary_dim, q_stride, k_stride);
    else
      rotary_kernel<T, T><<<num_tokens, threads, 0, stream>>>(
          static_cast<T*>(query), static_cast<T*>(key), positions, static_cast<const T*>(cos_sin_cache),
          num_heads, kv_heads, head_dim, rotary_dim, q_stride, k_stride);
    return cudaGetLastError();
  });
}

}  // namespace kern
}  // namespace spotserve
