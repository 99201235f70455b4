// Raw-pointer launchers of spotserve's CUDA kernels. This header includes only the CUDA runtime,
// so the kernel translation units compile with nvcc alone (no ATen); the torch-facing wrappers in
// torch_cuda.cu check tensors, then call these on the current stream.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace spotserve {
namespace kern {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// ---- decode attention over the paged KV cache (layout: see csrc/ops.h) ----
struct DecodeAttnParams {
  void* out;                 // [num_seqs, num_heads, head_dim], contiguous
  const void* query;         // [num_seqs, num_heads, head_dim]; rows strided by q_seq_stride
  const void* k_cache;       // [num_blocks, block_size, kv_heads, head_dim], contiguous
  const void* v_cache;       // same shape as k_cache
  const int32_t* block_tables;  // [num_seqs, max_blocks_per_seq], contiguous
  const int32_t* context_lens;  // [num_seqs]
  float* part_acc;           // [num_seqs, num_heads, num_splits, head_dim] (num_splits > 1 only)
  float* part_ml;            // [num_seqs, num_heads, num_splits, 2]: running max (log2 units), sum
  int64_t q_seq_stride;      // elements between consecutive sequences' queries
  int num_seqs, num_heads, kv_heads, head_dim, block_size, max_blocks_per_seq;
  int num_splits, partition, head_tiles, group_tile;
  int cluster;               // > 1: the splits of a (seq, kv head) form one thread-block cluster
                             // and merge in distributed shared memory (no part_* buffers)
  int dynamic;               // 1: each sequence's context is cut into num_splits equal partitions
                             // on the device (from context_lens); 0: fixed `partition` tokens each
  float scale;
};

// Chooses the split-K plan for a launch: how many partitions of how many tokens each, so that
// the grid fills the device even at batch 1. partition_size > 0 forces that partition length;
// otherwise the number of splits comes from max_context_len and each sequence's actual context
// is divided evenly among them on the device (dynamic), so a launch planned for a context bucket
// (CUDA graphs) still gives every split an equal share of a shorter context.
// Fills num_splits, partition, head_tiles, group_tile, cluster, dynamic of `p` from its shape fields.
// Clusters are used on compute capability >= 9.0 for 2..8 splits unless the environment sets
// SPOTSERVE_ATTN_CLUSTER=0.
cudaError_t plan_decode_attention(DecodeAttnParams& p, int max_context_len, int partition_size);
bool decode_attention_supports(int head_dim);
cudaError_t launch_decode_attention(DType dt, const DecodeAttnParams& p, cudaStream_t stream);

// ---- KV cache write: k_cache/v_cache[slot // block_size, slot % block_size] = key/value[t] ----
cudaError_t launch_write_kv_cache(DType dt, const void* key, const void* value, void* k_cache, void* v_cache,
                                  const int64_t* slot_mapping, int num_tokens, int64_t key_stride,
                                  int64_t value_stride, int kv_heads, int head_dim, int block_size,
                                  cudaStream_t stream);

// ---- fused residual add + norm: residual += x; x = norm(residual) ----
// bias == nullptr and layer == false: RMSNorm; layer == true: LayerNorm with optional bias.
cudaError_t launch_add_norm(DType dt, bool layer, void* x, void* residual, const void* weight, const void* bias,
                            int64_t rows, int hidden, float eps, cudaStream_t stream);

// ---- rotary embedding (GPT-NeoX rotate-half), in place on the first rotary_dim of each head ----
cudaError_t launch_rotary(DType dt, bool cache_is_float, void* query, void* key, const int64_t* positions,
                          const void* cos_sin_cache, int num_tokens, int num_heads, int kv_heads, int head_dim,
                          int rotary_dim, int64_t q_stride, int64_t k_stride, cudaStream_t stream);

// ---- fused bias + activation ----
enum class Act : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kSwiGLU = 5 };
// out[r, c] = act(x[r, c] + bias[c]); for kSwiGLU, out[r, c] = silu(x[r, c] + b[c]) * (x[r, c + cols] + b[c + cols]).
// `cols` is out's row length; x's row length is cols (2 * cols for kSwiGLU); bias may be null.
cudaError_t launch_bias_act(DType dt, Act act, void* out, const void* x, const void* bias, int64_t rows,
                            int64_t cols, cudaStream_t stream);

// ---- skinny GEMM (decode batches): y[m, n] = x[m, :] . w[n, :] (+ bias[n]), fp16/bf16 ----
constexpr int kSkinnyMaxM = 8;
struct SkinnyGemmParams {
  void* y;            // [m, n], contiguous
  const void* x;      // [m, k], rows ldx elements apart, 16-byte aligned rows
  const void* w;      // [n, k], contiguous, 16-byte aligned
  const void* bias;   // [n] or nullptr
  int64_t ldx;
  int m, n, k;        // 1 <= m <= kSkinnyMaxM, k % 8 == 0
  int split;          // CTAs along k per row tile (a thread-block cluster when > 1); set by the planner
};
// Whether the tensor-core kernel runs here for this shape (compute capability >= 8.0, m in
// [1, kSkinnyMaxM], k a positive multiple of 8); otherwise callers use a library GEMM.
bool skinny_gemm_supported(int m, int64_t k);
// Fills p.split: `split` > 0 forces it (clamped to [1, 8] and to 1 without clusters, i.e. before
// compute capability 9.0); 0 picks it from the shape and the device.
cudaError_t plan_skinny_gemm(SkinnyGemmParams& p, int split);
cudaError_t launch_skinny_gemm(DType dt, const SkinnyGemmParams& p, cudaStream_t stream);

}  // namespace kern
}  // namespace spotserve
