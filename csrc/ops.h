// Declarations of spotserve's tensor ops. Schemas live in torch_bindings.cpp; each op has a CPU
// implementation (kernels/cpu) and, in CUDA builds, a CUDA one (kernels/torch_cuda.cu, which
// calls the raw launchers of kernels/launch.h) registered against the same schema, so
// torch.ops.spotserve.* dispatches on the tensors' device.
//
// KV cache layout (one pair of tensors per layer, allocated once, static for CUDA graphs):
//   k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous, model dtype.
//   A token's K (or V) row for all kv heads is contiguous; its slot is
//   slot = block * block_size + offset, i.e. k_cache.view(-1, kv_heads, head_dim)[slot].
//   block_tables: int32 [num_seqs, max_blocks_per_seq]; block_tables[s][i] is the physical block
//   holding tokens [i * block_size, (i + 1) * block_size) of sequence s (entries past the
//   sequence's length are never read). context_lens: int32 [num_seqs], tokens in the cache for
//   each sequence, the current token included (write it with write_kv_cache first); 0 = padding
//   slot, whose output is zeros.
//   slot_mapping: int64 [num_tokens]; -1 skips the token (padding).
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace spotserve {

// dst.narrow(dim, dst_start, length) = src.narrow(dim, src_start, length).
// The re-slicing copy of migration: moves the part of a tp shard that overlaps another shard.
void reslice_copy_cpu(at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start,
                      int64_t dst_start, int64_t length);

// residual += x; x = rms_norm(residual) * weight  (rows over the last dim).
void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);

// residual += x; x = layer_norm(residual) * weight + bias  (rows over the last dim; bias optional).
void fused_add_layer_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, double eps);

// out[s, h] = softmax(scale * q[s, h] . K[s, kvh]) V[s, kvh] over the first context_lens[s]
// tokens of sequence s in the paged cache; kvh = h / (num_heads / kv_heads) (GQA).
// query: [num_seqs, num_heads, head_dim] (rows may be strided, heads contiguous); out: same shape,
// contiguous. max_context_len bounds context_lens from above and only shapes the launch (split-K
// partitions; a longer context is still computed right, more slowly); partition_size > 0 forces
// the split length in tokens (tests, benchmarks), 0 picks it from the shape.
void paged_decode_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& context_lens, int64_t max_context_len, double scale,
                                int64_t partition_size);

// k_cache.view(-1, kv_heads, head_dim)[slot_mapping[t]] = key[t] (and v likewise); slot < 0 skipped.
// key, value: [num_tokens, kv_heads, head_dim] (rows may be strided, heads contiguous).
void write_kv_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& slot_mapping);

// In place, per token t and head: the first rotary_dim elements x = [x1 | x2] become
// [x1 cos - x2 sin | x2 cos + x1 sin] with cos/sin = cos_sin_cache[positions[t]] split in halves.
// query: [num_tokens, num_heads, head_dim], key: [num_tokens, kv_heads, head_dim] (rows may be
// strided, heads contiguous); positions: int64 [num_tokens]; cos_sin_cache: [max_pos, rotary_dim],
// float32 or the query's dtype.
void rotary_embedding_cpu(at::Tensor& query, at::Tensor& key, const at::Tensor& positions,
                          const at::Tensor& cos_sin_cache, int64_t rotary_dim);

// out = act(x + bias) for activation in {none, relu, gelu, gelu_tanh, silu}; for "swiglu",
// x = [gate | up] along the last dim and out = silu(gate + b_gate) * (up + b_up). Contiguous.
void bias_act_cpu(at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                  const std::string& activation);

// y = x @ weight^T (+ bias): x [..., K], weight [N, K], bias [N] or None -> y [..., N], contiguous.
// For decode batches (x with at most 8 rows of K): on CUDA a memory-bound tensor-core kernel
// (fp16/bf16, compute capability >= 8.0, K % 8 == 0) that reads weight once, else a library GEMM;
// on the CPU always a library GEMM. split_k > 0 forces the CTAs per row tile along K (tests,
// benchmarks); 0 picks it from the shape.
at::Tensor skinny_gemm_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t split_k);

#ifdef SPOTSERVE_WITH_CUDA
at::Tensor skinny_gemm_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t split_k);
void reslice_copy_cuda(at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start,
                       int64_t dst_start, int64_t length);
void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void fused_add_layer_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, double eps);
void paged_decode_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, int64_t max_context_len, double scale,
                                 int64_t partition_size);
void write_kv_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping);
void rotary_embedding_cuda(at::Tensor& query, at::Tensor& key, const at::Tensor& positions,
                           const at::Tensor& cos_sin_cache, int64_t rotary_dim);
void bias_act_cuda(at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                   const std::string& activation);
#endif

// Shared argument checks (one message per mistake; ValueError in Python unless noted).
void check_reslice_args(const at::Tensor& dst, const at::Tensor& src, int64_t dim, int64_t src_start,
                        int64_t dst_start, int64_t length);  // RuntimeError, kept for compatibility
void check_add_norm_args(const char* op, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias);
void check_decode_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, int64_t max_context_len);
void check_write_kv_cache_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& slot_mapping);
void check_rotary_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& positions,
                       const at::Tensor& cos_sin_cache, int64_t rotary_dim);
void check_skinny_gemm_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t split_k);
// Returns the activation's code (kern::Act numbering: 0 none, 1 relu, 2 gelu, 3 gelu_tanh, 4 silu, 5 swiglu).
int check_bias_act_args(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                        const std::string& activation);

}  // namespace spotserve
