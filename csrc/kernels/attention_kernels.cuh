// Split-K ("flash-decoding") attention of one query token per sequence over the paged KV cache.
//
// Grid: (split, kv_head * head_tiles + tile, seq). A CTA of kAttnThreads threads streams one
// partition of the tokens of one sequence for one kv head, and serves the `G` query heads of
// that kv head's group that fall in its tile, so each K/V row is read from memory once for the
// whole group. Inside the CTA, groups of TPT threads own one token at a time: each thread holds
// NV 16-byte vectors of the token's K and V rows, so a group reads a row with coalesced 16-byte
// loads, and U tokens are loaded before any is used, to keep loads in flight (OPT's 128-dim
// heads: 128 tokens, 64 KB per CTA per loop trip, so a decode-sized partition is one trip).
// The sequence's block-table row is staged in shared memory while the query and context length
// load, so the K/V loads wait on one memory round trip, not one per loop trip. Each thread group
// keeps an online softmax (running max, sum, weighted V) in registers, updated once per trip for
// its U tokens; the groups are merged in shared memory at the end. With one split the CTA writes the normalised output; otherwise it
// either merges the partials of its thread-block cluster through distributed shared memory
// (Hopper; kCluster, up to 8 splits: no second kernel, no partials in device memory) or writes
// its partial (max, sum, unnormalised output) for reduce_splits_kernel to merge.
#pragma once
#include <cooperative_groups.h>

#include <cfloat>

#include "kernels/vec.cuh"

namespace spotserve {
namespace kern {

constexpr int kAttnThreads = 256;
constexpr int kAttnTableSlots = kAttnThreads;  // block-table entries staged in shared memory
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct AttnShape {
  static constexpr int kNVec = D / 8;  // 16-byte vectors per head row (16-bit dtypes)
  // Threads per token: the largest power of two <= 16 that divides the vectors of a row.
  static constexpr int kTPT = (kNVec % 16 == 0) ? 16 : (kNVec % 8 == 0) ? 8 : (kNVec % 4 == 0) ? 4
                            : (kNVec % 2 == 0) ? 2 : 1;
  static constexpr int kNV = kNVec / kTPT;        // vectors per thread
  static constexpr int kE = kNV * 8;              // elements per thread per head
  static constexpr int kGroups = kAttnThreads / kTPT;
  // Tokens loaded per group before use: ~128 tokens per CTA per trip, at most 16 vectors (64
  // registers) of K and V per thread, at least 2 for some overlap.
  static constexpr int kUWant = (128 / kGroups) < (8 / kNV) ? (128 / kGroups) : (8 / kNV);
  static constexpr int kU = kUWant > 2 ? kUWant : 2;
  static constexpr int kTokensPerIter = kGroups * kU;
  static constexpr int kMaxGroupTile = (32 / kE) >= 4 ? 4 : (32 / kE) >= 2 ? 2 : 1;
};

__device__ __forceinline__ uint4 load_nc(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Tokens [start, end) of `split` for a sequence of ctx cached tokens (start >= end: nothing).
__device__ __forceinline__ void split_range(const DecodeAttnParams& p, int ctx, int split, int& start, int& end) {
  if (p.dynamic) {
    const int part = (ctx + p.num_splits - 1) / p.num_splits;
    start = split * part;
    end = min(ctx, start + part);
  } else {  // the last split also takes whatever lies past the planned context
    start = split * p.partition;
    end = (split == p.num_splits - 1) ? ctx : min(ctx, start + p.partition);
  }
}

// Splits of a sequence of ctx tokens that hold any token (the others have nothing to merge).
__device__ __forceinline__ int live_splits(const DecodeAttnParams& p, int ctx) {
  if (ctx <= 0) return 0;
  const int part = p.dynamic ? (ctx + p.num_splits - 1) / p.num_splits : p.partition;
  return min(p.num_splits, (ctx + part - 1) / part);
}

template <typename T, int D, int G, bool kCluster>
__global__ void __launch_bounds__(kAttnThreads) paged_decode_attention_kernel(const DecodeAttnParams p) {
  using S = AttnShape<D>;
  constexpr int TPT = S::kTPT, NV = S::kNV, E = S::kE, NG = S::kGroups, U = S::kU;
  __shared__ float s_acc[NG][G][D];
  __shared__ float s_m[NG][G];
  __shared__ float s_l[NG][G];
  __shared__ int s_blocks[kAttnTableSlots];

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / p.head_tiles;
  const int tile = blockIdx.y % p.head_tiles;
  const int seq = blockIdx.z;
  const int tid = threadIdx.x, grp = tid / TPT, lane = tid % TPT;
  // Stage the block-table row before the context length is known (entries past the sequence are
  // loaded but never used): its load overlaps those of ctx and the query.
  const int32_t* __restrict__ bt = p.block_tables + static_cast<int64_t>(seq) * p.max_blocks_per_seq;
  const int staged = min(p.max_blocks_per_seq, kAttnTableSlots);
  if (tid < staged) s_blocks[tid] = bt[tid];
  const int ctx = p.context_lens[seq];
  int start, end;
  split_range(p, ctx, split, start, end);
  // Nothing here; the reduction reads only live splits (a cluster member must still take part).
  if (!kCluster && split > 0 && start >= ctx) return;
  const int group_size = p.num_heads / p.kv_heads;
  const int head0 = kvh * group_size + tile * G;
  const int nh = min(G, group_size - tile * G);

  const T* __restrict__ qbase = static_cast<const T*>(p.query) + seq * p.q_seq_stride;

  // Query slice of this thread, pre-scaled so that scores come out in log2 units.
  float q[G][E];
#pragma unroll
  for (int j = 0; j < G; ++j) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      float f[8];
      if (j < nh) {
        unpack<T>(load_nc(qbase + (head0 + j) * D + (lane + i * TPT) * 8), f);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) q[j][i * 8 + e] = f[e] * p.scale * kLog2e;
    }
  }

  float m[G], l[G], acc[G][E];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[j][e] = 0.f;
  }

  const int64_t tok_stride = static_cast<int64_t>(p.kv_heads) * D;
  const T* __restrict__ kc = static_cast<const T*>(p.k_cache) + kvh * D;
  const T* __restrict__ vc = static_cast<const T*>(p.v_cache) + kvh * D;
  __syncthreads();  // s_blocks is staged

  // Every thread runs the same number of iterations, so the group shuffles never diverge.
  for (int it = start; it < end; it += S::kTokensPerIter) {
    uint4 kw[U][NV], vw[U][NV];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = it + u * NG + grp;
      valid[u] = t < end;
      if (valid[u]) {
        const int b = t / p.block_size;
        const int block = b < staged ? s_blocks[b] : bt[b];
        const int64_t row = (static_cast<int64_t>(block) * p.block_size + t % p.block_size) * tok_stride;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          kw[u][i] = load_nc(kc + row + (lane + i * TPT) * 8);
          vw[u][i] = load_nc(vc + row + (lane + i * TPT) * 8);
        }
      } else {
#pragma unroll
        for (int i = 0; i < NV; ++i) kw[u][i] = vw[u][i] = make_uint4(0, 0, 0, 0);
      }
    }
    // Scores of the U tokens (log2 units; -inf for a token past the partition).
    float sc[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[E];
#pragma unroll
      for (int i = 0; i < NV; ++i) unpack<T>(kw[u][i], kf + i * 8);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s = fmaf(q[j][e], kf[e], s);
#pragma unroll
        for (int off = TPT / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        sc[u][j] = valid[u] ? s : -INFINITY;
      }
    }
    // One rescale per trip: new running max over the trip's tokens, then their weights.
#pragma unroll
    for (int j = 0; j < G; ++j) {
      float m_new = m[j];
#pragma unroll
      for (int u = 0; u < U; ++u) m_new = fmaxf(m_new, sc[u][j]);
      const float corr = m_new == -INFINITY ? 1.f : exp2f(m[j] - m_new);  // 0 when m[j] was -inf
      l[j] *= corr;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[j][e] *= corr;
      m[j] = m_new;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!valid[u]) continue;  // no shuffles below: groups may diverge
      float vf[E];
#pragma unroll
      for (int i = 0; i < NV; ++i) unpack<T>(vw[u][i], vf + i * 8);
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float pr = exp2f(sc[u][j] - m[j]);
        l[j] += pr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[j][e] = fmaf(pr, vf[e], acc[j][e]);
      }
    }
  }

  // Merge the thread groups of the CTA.
#pragma unroll
  for (int j = 0; j < G; ++j) {
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int e = 0; e < 8; ++e) s_acc[grp][j][(lane + i * TPT) * 8 + e] = acc[j][i * 8 + e];
    if (lane == 0) {
      s_m[grp][j] = m[j];
      s_l[grp][j] = l[j];
    }
  }
  __syncthreads();
  T* __restrict__ out = static_cast<T*>(p.out);
  __shared__ float c_acc[kCluster ? G : 1][kCluster ? D : 1];
  __shared__ float c_m[G], c_l[G];
  for (int idx = tid; idx < nh * D; idx += kAttnThreads) {
    const int j = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll 4
    for (int g = 0; g < NG; ++g) mx = fmaxf(mx, s_m[g][j]);
    float sum = 0.f, a = 0.f;
    if (mx != -INFINITY) {
#pragma unroll 4
      for (int g = 0; g < NG; ++g) {
        const float w = exp2f(s_m[g][j] - mx);
        sum = fmaf(s_l[g][j], w, sum);
        a = fmaf(s_acc[g][j][d], w, a);
      }
    }
    const int64_t sh = static_cast<int64_t>(seq) * p.num_heads + head0 + j;
    if constexpr (kCluster) {
      c_acc[j][d] = a;
      if (d == 0) {
        c_m[j] = mx;
        c_l[j] = sum;
      }
    } else if (p.num_splits == 1) {
      out[sh * D + d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
    } else {
      const int64_t ps = sh * p.num_splits + split;
      p.part_acc[ps * D + d] = a;
      if (d == 0) {
        p.part_ml[ps * 2] = mx;
        p.part_ml[ps * 2 + 1] = sum;
      }
    }
  }
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The cluster is the splits of one (sequence, kv head, tile); each member finalises a slice
    // of the outputs from every member's shared memory.
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    const int members = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
    for (int idx = rank * kAttnThreads + tid; idx < nh * D; idx += members * kAttnThreads) {
      const int j = idx / D, d = idx % D;
      float mx = -INFINITY;
      for (int r = 0; r < members; ++r) mx = fmaxf(mx, *cluster.map_shared_rank(&c_m[j], r));
      float sum = 0.f, a = 0.f;
      if (mx != -INFINITY) {
        for (int r = 0; r < members; ++r) {
          const float w = exp2f(*cluster.map_shared_rank(&c_m[j], r) - mx);
          sum = fmaf(*cluster.map_shared_rank(&c_l[j], r), w, sum);
          a = fmaf(*cluster.map_shared_rank(&c_acc[j][d], r), w, a);
        }
      }
      out[(static_cast<int64_t>(seq) * p.num_heads + head0 + j) * D + d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
    }
    cluster.sync();  // keep this CTA's shared memory alive until every member has read it
#else
    __trap();  // the planner uses clusters only on compute capability >= 9.0
#endif
  }
}

// Merges the live splits of each (sequence, head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
template <typename T>
__global__ void reduce_splits_kernel(const DecodeAttnParams p) {
  const int head = blockIdx.x, seq = blockIdx.y;
  const int live = live_splits(p, p.context_lens[seq]);
  const int64_t sh = static_cast<int64_t>(seq) * p.num_heads + head;
  const float* ml = p.part_ml + sh * p.num_splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < live; ++s) mx = fmaxf(mx, ml[2 * s]);
  float sum = 0.f;
  if (mx != -INFINITY)
    for (int s = 0; s < live; ++s) sum = fmaf(ml[2 * s + 1], exp2f(ml[2 * s] - mx), sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* out = static_cast<T*>(p.out) + sh * p.head_dim;
  const float* acc = p.part_acc + sh * p.num_splits * p.head_dim;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float a = 0.f;
    if (mx != -INFINITY)
      for (int s = 0; s < live; ++s) a = fmaf(acc[s * p.head_dim + d], exp2f(ml[2 * s] - mx), a);
    out[d] = from_float<T>(a * inv);
  }
}

// Launches for one storage type; defined in attention_<dtype>.cu, one translation unit per dtype
// so the template instances compile in parallel.
template <typename T>
cudaError_t launch_decode_attention_typed(const DecodeAttnParams& p, cudaStream_t stream);

template <typename T, int D, int G>
cudaError_t launch_attn_instance(const DecodeAttnParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_splits, p.kv_heads * p.head_tiles, p.num_seqs);
  if (p.cluster > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(kAttnThreads);
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = p.cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, paged_decode_attention_kernel<T, D, G, true>, p);
  }
  paged_decode_attention_kernel<T, D, G, false><<<grid, kAttnThreads, 0, stream>>>(p);
  if (p.num_splits > 1) reduce_splits_kernel<T><<<dim3(p.num_heads, p.num_seqs), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_attn_dim(const DecodeAttnParams& p, cudaStream_t stream) {
  switch (p.group_tile) {
    case 1: return launch_attn_instance<T, D, 1>(p, stream);
    case 2:
      if constexpr (AttnShape<D>::kMaxGroupTile >= 2) return launch_attn_instance<T, D, 2>(p, stream);
      break;
    case 4:
      if constexpr (AttnShape<D>::kMaxGroupTile >= 4) return launch_attn_instance<T, D, 4>(p, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

#define SPOTSERVE_ATTN_DIMS(X) X(8) X(16) X(32) X(64) X(80) X(96) X(128) X(256)

template <typename T>
cudaError_t launch_decode_attention_typed(const DecodeAttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
#define SPOTSERVE_ATTN_CASE(d) \
  case d: return launch_attn_dim<T, d>(p, stream);
    SPOTSERVE_ATTN_DIMS(SPOTSERVE_ATTN_CASE)
#undef SPOTSERVE_ATTN_CASE
  }
  return cudaErrorInvalidValue;
}

}  // namespace kern
}  // namespace spotserve
