// Fused bias + activation (ReLU, GELU, tanh-GELU, SiLU) and SwiGLU: one pass over the matmul
// output instead of a bias add and an activation each reading and writing it.
#include <algorithm>

#include "kernels/vec.cuh"

namespace spotserve {
namespace kern {
namespace {

template <Act A>
__device__ __forceinline__ float activate(float v) {
  if constexpr (A == Act::kRelu) {
    return fmaxf(v, 0.f);
  } else if constexpr (A == Act::kGelu) {
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  } else if constexpr (A == Act::kGeluTanh) {
    return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  } else if constexpr (A == Act::kSilu || A == Act::kSwiGLU) {
    return v / (1.f + __expf(-v));
  } else {
    return v;
  }
}

// Grid-stride over output elements in groups of W (W = 16-byte vector or 1). For SwiGLU the input
// row is [gate | up] of 2 * cols.
template <typename T, Act A, int W>
__global__ void bias_act_kernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ bias, int64_t rows,
                                int64_t cols) {
  constexpr bool kGlu = A == Act::kSwiGLU;
  const int64_t groups_per_row = cols / W;
  const int64_t total = rows * groups_per_row;
  const int64_t in_cols = kGlu ? 2 * cols : cols;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = g / groups_per_row, c = (g % groups_per_row) * W;
    const T* xr = x + r * in_cols;
    float a[W], b[W], u[W], ub[W];
    if constexpr (W > 1) {
      unpack<T>(*reinterpret_cast<const uint4*>(xr + c), a);
      if (bias) unpack<T>(*reinterpret_cast<const uint4*>(bias + c), b);
      if constexpr (kGlu) {
        unpack<T>(*reinterpret_cast<const uint4*>(xr + cols + c), u);
        if (bias) unpack<T>(*reinterpret_cast<const uint4*>(bias + cols + c), ub);
      }
    } else {
      a[0] = to_float(xr[c]);
      if (bias) b[0] = to_float(bias[c]);
      if constexpr (kGlu) {
        u[0] = to_float(xr[cols + c]);
        if (bias) ub[0] = to_float(bias[cols + c]);
      }
    }
    float o[W];
#pragma unroll
    for (int e = 0; e < W; ++e) {
      // Round the biased input to the storage dtype, as the unfused bias add would.
      const float v = bias ? round_to<T>(a[e] + b[e]) : a[e];
      if constexpr (kGlu) {
        const float up = bias ? round_to<T>(u[e] + ub[e]) : u[e];
        o[e] = activate<A>(v) * up;
      } else {
        o[e] = activate<A>(v);
      }
    }
    if constexpr (W > 1) {
      *reinterpret_cast<uint4*>(out + r * cols + c) = pack<T>(o);
    } else {
      out[r * cols + c] = from_float<T>(o[0]);
    }
  }
}

int grid_for(int64_t work, int threads) {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 16L * sms)));
}

template <typename T, Act A>
cudaError_t launch_act(void* out, const void* x, const void* bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int V = Vec<T>::kSize;
  const bool vec = cols % V == 0 && aligned16(out) && aligned16(x) && (bias == nullptr || aligned16(bias));
  constexpr int threads = 256;
  T* o = static_cast<T*>(out);
  const T* xp = static_cast<const T*>(x);
  const T* bp = static_cast<const T*>(bias);
  if (vec)
    bias_act_kernel<T, A, V><<<grid_for(rows * cols / V, threads), threads, 0, stream>>>(o, xp, bp, rows, cols);
  else
    bias_act_kernel<T, A, 1><<<grid_for(rows * cols, threads), threads, 0, stream>>>(o, xp, bp, rows, cols);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_bias_act(DType dt, Act act, void* out, const void* x, const void* bias, int64_t rows, int64_t cols,
                            cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return dispatch_dtype(dt, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    switch (act) {
      case Act::kNone: return launch_act<T, Act::kNone>(out, x, bias, rows, cols, stream);
      case Act::kRelu: return launch_act<T, Act::kRelu>(out, x, bias, rows, cols, stream);
      case Act::kGelu: return launch_act<T, Act::kGelu>(out, x, bias, rows, cols, stream);
      case Act::kGeluTanh: return launch_act<T, Act::kGeluTanh>(out, x, bias, rows, cols, stream);
      case Act::kSilu: return launch_act<T, Act::kSilu>(out, x, bias, rows, cols, stream);
      case Act::kSwiGLU: return launch_act<T, Act::kSwiGLU>(out, x, bias, rows, cols, stream);
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace kern
}  // namespace spotserve
