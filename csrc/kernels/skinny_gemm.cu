// Skinny GEMM for decode batches: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 8, fp16/bf16.
//
// Memory-bound: W (N*K elements) is streamed from HBM exactly once for all M rows, so the kernel
// is built to keep enough 16-byte loads in flight to saturate HBM, not to compute fast.
//
// Tensor cores with the operands swapped: y^T[N, M] = W[N, K] x^T[K, M], one mma.m16n8k16 per
// (16 rows of W) x (16 of K) x (8 batch rows). The k order inside a 64-element chunk is free (a
// dot product does not care), so each thread loads whole 16-byte vectors of W and x with plain
// coalesced loads and feeds them to the mma as they are: W and x use the same permutation of k.
//
// Grid: (row tiles, split). A CTA of 8 warps owns RT 16-row tiles of W; its warps take
// interleaved 64-element chunks of its K range (a warp reads 128 contiguous bytes of each row per
// chunk, neighbouring warps the next 128), U chunks per loop trip with every load issued before
// the first mma. The warps' partial sums are added in shared memory (no second kernel). With
// split > 1, the `split` CTAs of a row tile divide K between them and form one thread-block
// cluster (Hopper) that adds their partials through distributed shared memory: more CTAs in
// flight for short or narrow matrices (tensor-parallel shards), still one launch.
#include <cooperative_groups.h>

#include <algorithm>

#include "kernels/vec.cuh"

namespace spotserve {
namespace kern {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 64;     // k elements per warp per chunk: 4 threads x 2 vectors x 8
constexpr int kMaxSplit = 8;   // the portable cluster size

// 16 bytes of W, read once: keep it out of L1 (x lives there) and ask L2 for whole 256-byte runs.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
#else
  v = __ldg(reinterpret_cast<const uint4*>(p));
#endif
  return v;
}

// c += a b for a 16x16 tile of W (row major), b a 16x8 tile of x^T (column major), f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the host launches this kernel only on compute capability >= 8.0
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// RT: 16-row tiles of W per CTA (more rows share each x load: x traffic / W traffic = M / (16 RT)).
// U: chunks per warp per loop trip, all loaded before use (RT * U * 64 bytes in flight per thread).
template <typename T, int RT, int U, bool kCluster>
__global__ void __launch_bounds__(kThreads, 1) skinny_gemm_kernel(const SkinnyGemmParams p) {
  constexpr int kRows = 16 * RT;
  __shared__ float s_red[kWarps][kRows * 8];  // per warp: [row][batch col] partial sums
  __shared__ float s_out[kRows * 8];          // the CTA's sum, read by the cluster

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;  // mma fragment coordinates: row group, thread in group
  const int n0 = blockIdx.x * kRows;
  const int chunks = (p.k + kChunk - 1) / kChunk;
  const int per_split = (chunks + p.split - 1) / p.split;
  const int c_begin = min(chunks, static_cast<int>(blockIdx.y) * per_split);
  const int c_end = min(chunks, c_begin + per_split);

  // This thread's W rows: n0 + 16 rt + g and n0 + 16 rt + g + 8, clamped into the matrix (the rows
  // past N are loaded from row N - 1 and never stored: no predicate on the hot loads).
  const T* __restrict__ wrow[RT][2];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = min(n0 + 16 * rt + 8 * h + g, p.n - 1);
      wrow[rt][h] = static_cast<const T*>(p.w) + static_cast<int64_t>(n) * p.k;
    }
  const bool has_x = g < p.m;  // column g of the mma's B operand is batch row g
  const T* __restrict__ xrow = static_cast<const T*>(p.x) + static_cast<int64_t>(has_x ? g : 0) * p.ldx;

  float acc[RT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[rt][i] = 0.f;

  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int c0 = c_begin + warp; c0 < c_end; c0 += kWarps * U) {
    uint4 wv[U][RT][2][2], xv[U][2];  // [chunk][tile][row half][vector]
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * kWarps;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // Vector j of this thread: k in [64 c + 32 j + 8 tig, +8); K % 8 == 0, so it is all in or all out.
        // Out-of-range vectors load from k = 0 (valid memory) and are zeroed after: the loads stay
        // unconditional, so all of them issue before the first mma.
        const int k_want = c * kChunk + 32 * j + 8 * tig;
        const bool ok = c < c_end && k_want < p.k;
        const int k = ok ? k_want : 0;
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 v = load_stream(wrow[rt][h] + k);
            wv[u][rt][h][j] = ok ? v : zero;
          }
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(xrow + k));
        xv[u][j] = (ok && has_x) ? v : zero;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // Words 2 half, 2 half + 1 of vector j hold the fragment's k pairs (2 tig, 2 tig + 1) and
          // (2 tig + 8, 2 tig + 9) of one mma step, for W (rows g, g + 8) and x alike.
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[u][j]);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            const uint32_t* lo = reinterpret_cast<const uint32_t*>(&wv[u][rt][0][j]);
            const uint32_t* hi = reinterpret_cast<const uint32_t*>(&wv[u][rt][1][j]);
            mma_16816<T>(acc[rt], lo[2 * half], hi[2 * half], lo[2 * half + 1], hi[2 * half + 1], xw[2 * half],
                         xw[2 * half + 1]);
          }
        }
  }

  // Accumulator i of this thread: row 16 rt + g (+ 8 for i >= 2), batch column 2 tig + (i & 1).
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int i = 0; i < 4; ++i) s_red[warp][(16 * rt + g + 8 * (i >> 1)) * 8 + 2 * tig + (i & 1)] = acc[rt][i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < kRows * 8; idx += kThreads) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += s_red[w][idx];
    s_out[idx] = s;
  }
  // Output idx = m * kRows + r (consecutive threads write consecutive n) of y[m, n0 + r].
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every member's s_out is complete
    const int members = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
    for (int idx = rank * kThreads + threadIdx.x; idx < kRows * p.m; idx += members * kThreads) {
      const int m = idx / kRows, r = idx % kRows, n = n0 + r;
      if (n < p.n) {
        float s = 0.f;
        for (int q = 0; q < members; ++q) s += *cluster.map_shared_rank(&s_out[r * 8 + m], q);
        if (bias != nullptr) s += to_float(bias[n]);
        y[static_cast<int64_t>(m) * p.n + n] = from_float<T>(s);
      }
    }
    cluster.sync();  // keep this CTA's shared memory alive until every member has read it
#else
    __trap();  // the host uses clusters only on compute capability >= 9.0
#endif
  } else {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kRows * p.m; idx += kThreads) {
      const int m = idx / kRows, r = idx % kRows, n = n0 + r;
      if (n < p.n) {
        float s = s_out[r * 8 + m];
        if (bias != nullptr) s += to_float(bias[n]);
        y[static_cast<int64_t>(m) * p.n + n] = from_float<T>(s);
      }
    }
  }
}

struct GemmDevice {
  int sms = 0;
  int major = 0;
};

// Multiprocessors and compute capability of the current device, cached per device (no sync).
GemmDevice gemm_device() {
  static GemmDevice cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return {};
  if (dev >= 64) {
    GemmDevice d;
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    return d;
  }
  GemmDevice& d = cache[dev];
  if (d.sms == 0) {
    int sms = 0, major = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    d.major = major;
    d.sms = sms;
  }
  return d;
}

int rows_per_tile(int m) { return m > 4 ? 2 : 1; }  // RT: x traffic stays <= 1/4 of W traffic

template <typename T, int RT, int U>
cudaError_t launch_typed(const SkinnyGemmParams& p, cudaStream_t stream) {
  const dim3 grid((p.n + 16 * RT - 1) / (16 * RT), p.split);
  if (p.split > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = p.split;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, skinny_gemm_kernel<T, RT, U, true>, p);
  }
  skinny_gemm_kernel<T, RT, U, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool skinny_gemm_supported(int m, int64_t k) {
  const GemmDevice d = gemm_device();
  return d.major >= 8 && m >= 1 && m <= kSkinnyMaxM && k >= 8 && k % 8 == 0 && k <= (int64_t{1} << 30);
}

cudaError_t plan_skinny_gemm(SkinnyGemmParams& p, int split) {
  if (p.m < 1 || p.m > kSkinnyMaxM || p.n < 1 || p.k < 8 || p.k % 8) return cudaErrorInvalidValue;
  const GemmDevice d = gemm_device();
  const bool clusters = d.major >= 9;
  const int chunks = (p.k + kChunk - 1) / kChunk;
  const int tiles = (p.n + 16 * rows_per_tile(p.m) - 1) / (16 * rows_per_tile(p.m));
  if (split > 0) {
    p.split = clusters ? std::min({split, kMaxSplit, chunks}) : 1;
    return cudaSuccess;
  }
  // One CTA of 8 warps keeps enough loads in flight per SM: on the H100, split 1 beat split 2 and 4
  // for every OPT-6.7B shape at M = 1 and 8, including 4096x4096 with 256 row tiles (13.9 vs 16.9 us
  // at M = 1; benchmarks/results/bench_kernels_h100_gemm.log). Split K (in a cluster) only when the
  // row tiles cannot cover half the SMs, and never below one chunk per warp.
  int s = 1;
  while (clusters && s < kMaxSplit && static_cast<long>(tiles) * s * 2 < d.sms && chunks >= 2 * s * kWarps) s *= 2;
  p.split = s;
  return cudaSuccess;
}

cudaError_t launch_skinny_gemm(DType dt, const SkinnyGemmParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (p.split < 1 || p.split > kMaxSplit) return cudaErrorInvalidValue;
  const bool wide = rows_per_tile(p.m) == 2;
  switch (dt) {
    case DType::kHalf: return wide ? launch_typed<__half, 2, 1>(p, stream) : launch_typed<__half, 1, 2>(p, stream);
    case DType::kBFloat16:
      return wide ? launch_typed<__nv_bfloat16, 2, 1>(p, stream) : launch_typed<__nv_bfloat16, 1, 2>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kern
}  // namespace spotserve
