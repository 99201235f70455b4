// Fused residual add + RMSNorm / LayerNorm. One CTA per row. The vector path keeps the row in
// registers (16-byte loads, each element read once and written once: x and residual in, both
// out); the scalar path serves rows whose length or alignment rules vectors out.
#include <algorithm>

#include "kernels/vec.cuh"

namespace spotserve {
namespace kern {
namespace {

// Final value of one element, given the rounded sum s, as the unfused op sequence computes it:
// RMSNorm (Hugging Face order): round(s * inv) * w; LayerNorm: (s - mean) * rstd * w + b, in float.
template <typename T, bool kLayer>
__device__ __forceinline__ float norm_out(float s, float mean, float inv, float w, float b) {
  if constexpr (kLayer) {
    return (s - mean) * inv * w + b;
  } else {
    return round_to<T>(s * inv) * w;
  }
}

template <typename T, bool kLayer, int NV>
__global__ void add_norm_vec_kernel(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight,
                                    const T* __restrict__ bias, int hidden, float eps) {
  constexpr int V = Vec<T>::kSize;
  __shared__ float scratch[33];
  const int nvec = hidden / V;
  uint4* xr = reinterpret_cast<uint4*>(x + static_cast<int64_t>(blockIdx.x) * hidden);
  uint4* rr = reinterpret_cast<uint4*>(residual + static_cast<int64_t>(blockIdx.x) * hidden);
  float s[NV][V];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < nvec) {
      float a[V], b[V];
      unpack<T>(xr[v], a);
      unpack<T>(rr[v], b);
#pragma unroll
      for (int e = 0; e < V; ++e) s[i][e] = round_to<T>(a[e] + b[e]);
      rr[v] = pack<T>(s[i]);
#pragma unroll
      for (int e = 0; e < V; ++e) sum += kLayer ? s[i][e] : s[i][e] * s[i][e];
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) s[i][e] = 0.f;
    }
  }
  float mean = 0.f, inv;
  sum = block_sum(sum, scratch);
  if constexpr (kLayer) {
    mean = sum / hidden;
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (threadIdx.x + i * blockDim.x < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) sq += (s[i][e] - mean) * (s[i][e] - mean);
      }
    }
    inv = rsqrtf(block_sum(sq, scratch) / hidden + eps);
  } else {
    inv = rsqrtf(sum / hidden + eps);
  }
  const uint4* wr = reinterpret_cast<const uint4*>(weight);
  const uint4* br = reinterpret_cast<const uint4*>(bias);
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < nvec) {
      float w[V], b[V], o[V];
      unpack<T>(wr[v], w);
      if (kLayer && bias != nullptr) {
        unpack<T>(br[v], b);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) b[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = norm_out<T, kLayer>(s[i][e], mean, inv, w[e], b[e]);
      xr[v] = pack<T>(o);
    }
  }
}

// Any hidden size and alignment: three passes over the row in global memory.
template <typename T, bool kLayer>
__global__ void add_norm_scalar_kernel(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight,
                                       const T* __restrict__ bias, int hidden, float eps) {
  __shared__ float scratch[33];
  T* xr = x + static_cast<int64_t>(blockIdx.x) * hidden;
  T* rr = residual + static_cast<int64_t>(blockIdx.x) * hidden;
  float sum = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const T s = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
    rr[i] = s;
    const float f = to_float(s);
    sum += kLayer ? f : f * f;
  }
  sum = block_sum(sum, scratch);
  float mean = 0.f, inv;
  if constexpr (kLayer) {
    mean = sum / hidden;
    float sq = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
      const float d = to_float(rr[i]) - mean;
      sq += d * d;
    }
    inv = rsqrtf(block_sum(sq, scratch) / hidden + eps);
  } else {
    inv = rsqrtf(sum / hidden + eps);
  }
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float b = (kLayer && bias != nullptr) ? to_float(bias[i]) : 0.f;
    xr[i] = from_float<T>(norm_out<T, kLayer>(to_float(rr[i]), mean, inv, to_float(weight[i]), b));
  }
}

template <typename T, bool kLayer>
cudaError_t launch_typed(void* x, void* residual, const void* weight, const void* bias, int64_t rows, int hidden,
                         float eps, cudaStream_t stream) {
  constexpr int V = Vec<T>::kSize;
  T* xp = static_cast<T*>(x);
  T* rp = static_cast<T*>(residual);
  const T* wp = static_cast<const T*>(weight);
  const T* bp = static_cast<const T*>(bias);
  const int nvec = hidden / V;
  const bool vec = hidden % V == 0 && aligned16(x) && aligned16(residual) && aligned16(weight) &&
                   (bias == nullptr || aligned16(bias));
  // Fewest vectors per thread with at most 512 threads a row: more threads, shorter latency.
  auto threads_for = [&](int nv) { return std::max(32, ((nvec + nv - 1) / nv + 31) / 32 * 32); };
  if (vec && nvec <= 512) {
    add_norm_vec_kernel<T, kLayer, 1><<<rows, threads_for(1), 0, stream>>>(xp, rp, wp, bp, hidden, eps);
  } else if (vec && nvec <= 1024) {
    add_norm_vec_kernel<T, kLayer, 2><<<rows, threads_for(2), 0, stream>>>(xp, rp, wp, bp, hidden, eps);
  } else if (vec && nvec <= 2048) {
    add_norm_vec_kernel<T, kLayer, 4><<<rows, threads_for(4), 0, stream>>>(xp, rp, wp, bp, hidden, eps);
  } else {
    const int threads = std::min(1024, std::max(32, (hidden + 31) / 32 * 32));
    add_norm_scalar_kernel<T, kLayer><<<rows, threads, 0, stream>>>(xp, rp, wp, bp, hidden, eps);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_add_norm(DType dt, bool layer, void* x, void* residual, const void* weight, const void* bias,
                            int64_t rows, int hidden, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto zero) {
    using T = decltype(zero);
    return layer ? launch_typed<T, true>(x, residual, weight, bias, rows, hidden, eps, stream)
                 : launch_typed<T, false>(x, residual, weight, bias, rows, hidden, eps, stream);
  });
}

}  // namespace kern
}  // namespace spotserve
