// Writes the new tokens' K and V rows into their cache slots (slot = block * block_size + offset).
#include "kernels/vec.cuh"

namespace spotserve {
namespace kern {
namespace {

// One CTA per token; a negative slot marks a padding token (CUDA-graph batch padding) and is skipped.
template <typename T, bool kVector>
__global__ void write_kv_cache_kernel(const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ k_cache,
                                      T* __restrict__ v_cache, const int64_t* __restrict__ slots, int64_t key_stride,
                                      int64_t value_stride, int row) {
  const int64_t slot = slots[blockIdx.x];
  if (slot < 0) return;
  const T* k = key + blockIdx.x * key_stride;
  const T* v = value + blockIdx.x * value_stride;
  T* kd = k_cache + slot * row;
  T* vd = v_cache + slot * row;
  if constexpr (kVector) {
    constexpr int V = Vec<T>::kSize;
    for (int i = threadIdx.x; i < row / V; i += blockDim.x) {
      reinterpret_cast<uint4*>(kd)[i] = reinterpret_cast<const uint4*>(k)[i];
      reinterpret_cast<uint4*>(vd)[i] = reinterpret_cast<const uint4*>(v)[i];
    }
  } else {
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
      kd[i] = k[i];
      vd[i] = v[i];
    }
  }
}

}  // namespace

cudaError_t launch_write_kv_cache(DType dt, const void* key, const void* value, void* k_cache, void* v_cache,
                                  const int64_t* slot_mapping, int num_tokens, int64_t key_stride,
                                  int64_t value_stride, int kv_heads, int head_dim, int /*block_size*/,
                                  cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int row = kv_heads * head_dim;
  return dispatch_dtype(dt, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = Vec<T>::kSize;
    const bool vec = row % V == 0 && key_stride % V == 0 && value_stride % V == 0 && aligned16(key) &&
                     aligned16(value) && aligned16(k_cache) && aligned16(v_cache);
    const int threads = std::min(256, std::max(32, ((vec ? row / V : row) + 31) / 32 * 32));
    if (vec)
      write_kv_cache_kernel<T, true><<<num_tokens, threads, 0, stream>>>(
          static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(k_cache),
          static_cast<T*>(v_cache), slot_mapping, key_stride, value_stride, row);
    else
      write_kv_cache_kernel<T, false><<<num_tokens, threads, 0, stream>>>(
          static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(k_cache),
          static_cast<T*>(v_cache), slot_mapping, key_stride, value_stride, row);
    return cudaGetLastError();
  });
}

}  // namespace kern
}  // namespace spotserve
