// CUDA implementations of the torch ops: argument checks (shared with CPU), then the raw
// launchers of launch.h on the current stream. Thin on purpose: no device code here, no host
// sync (every launch is CUDA-graph capturable), scratch from torch's caching allocator.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

#include "kernels/launch.h"
#include "ops.h"

namespace spotserve {
namespace {

kern::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return kern::DType::kFloat;
    case at::kHalf: return kern::DType::kHalf;
    case at::kBFloat16: return kern::DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
  return kern::DType::kFloat;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_add_norm_args("fused_add_rms_norm", x, residual, weight, std::nullopt);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  check_launch(kern::launch_add_norm(dtype_of(x, "fused_add_rms_norm"), false, x.data_ptr(), residual.data_ptr(),
                                     weight.data_ptr(), nullptr, hidden ? x.numel() / hidden : 0,
                                     static_cast<int>(hidden), static_cast<float>(eps),
                                     c10::cuda::getCurrentCUDAStream()),
               "fused_add_rms_norm");
}

void fused_add_layer_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
  check_add_norm_args("fused_add_layer_norm", x, residual, weight, bias);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  check_launch(kern::launch_add_norm(dtype_of(x, "fused_add_layer_norm"), true, x.data_ptr(), residual.data_ptr(),
                                     weight.data_ptr(), bias ? bias->data_ptr() : nullptr,
                                     hidden ? x.numel() / hidden : 0, static_cast<int>(hidden),
                                     static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               "fused_add_layer_norm");
}

void paged_decode_attention_cuda(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, int64_t max_context_len, double scale,
                                 int64_t partition_size) {
  const char* op = "paged_decode_attention";
  check_decode_attention_args(out, query, k_cache, v_cache, block_tables, context_lens, max_context_len);
  TORCH_CHECK_VALUE(query.scalar_type() == at::kHalf || query.scalar_type() == at::kBFloat16, op,
                    ": CUDA supports float16 and bfloat16, got ", query.scalar_type());
  TORCH_CHECK_VALUE(kern::decode_attention_supports(static_cast<int>(query.size(2))), op, ": head_dim ",
                    query.size(2), " not compiled for CUDA (8, 16, 32, 64, 80, 96, 128, 256)");
  TORCH_CHECK_VALUE(query.stride(0) % 8 == 0 && aligned(query.data_ptr()) && aligned(k_cache.data_ptr()) &&
                        aligned(v_cache.data_ptr()),
                    op, ": query rows and the caches must be 16-byte aligned");
  TORCH_CHECK_VALUE(partition_size >= 0, op, ": partition_size must be >= 0, got ", partition_size);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  kern::DecodeAttnParams p{};
  p.out = out.data_ptr();
  p.query = query.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.context_lens = context_lens.data_ptr<int32_t>();
  p.q_seq_stride = query.stride(0);
  p.num_seqs = static_cast<int>(query.size(0));
  p.num_heads = static_cast<int>(query.size(1));
  p.head_dim = static_cast<int>(query.size(2));
  p.kv_heads = static_cast<int>(k_cache.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.max_blocks_per_seq = static_cast<int>(block_tables.size(1));
  p.scale = static_cast<float>(scale);
  check_launch(kern::plan_decode_attention(p, static_cast<int>(max_context_len), static_cast<int>(partition_size)), op);
  at::Tensor part_acc, part_ml;
  if (p.num_splits > 1 && p.cluster == 0) {  // partials for the second (merge) kernel
    const auto f32 = query.options().dtype(at::kFloat);
    part_acc = at::empty({p.num_seqs, p.num_heads, p.num_splits, p.head_dim}, f32);
    part_ml = at::empty({p.num_seqs, p.num_heads, p.num_splits, 2}, f32);
    p.part_acc = part_acc.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
  }
  check_launch(kern::launch_decode_attention(dtype_of(query, op), p, c10::cuda::getCurrentCUDAStream()), op);
}

void write_kv_cache_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping) {
  check_write_kv_cache_args(key, value, k_cache, v_cache, slot_mapping);
  const c10::cuda::OptionalCUDAGuard guard(key.device());
  check_launch(kern::launch_write_kv_cache(dtype_of(key, "write_kv_cache"), key.data_ptr(), value.data_ptr(),
                                           k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr<int64_t>(),
                                           static_cast<int>(key.size(0)), key.stride(0), value.stride(0),
                                           static_cast<int>(key.size(1)), static_cast<int>(key.size(2)),
                                           static_cast<int>(k_cache.size(1)), c10::cuda::getCurrentCUDAStream()),
               "write_kv_cache");
}

void rotary_embedding_cuda(at::Tensor& query, at::Tensor& key, const at::Tensor& positions,
                           const at::Tensor& cos_sin_cache, int64_t rotary_dim) {
  check_rotary_args(query, key, positions, cos_sin_cache, rotary_dim);
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  check_launch(kern::launch_rotary(dtype_of(query, "rotary_embedding"), cos_sin_cache.scalar_type() == at::kFloat,
                                   query.data_ptr(), key.data_ptr(), positions.data_ptr<int64_t>(),
                                   cos_sin_cache.data_ptr(), static_cast<int>(query.size(0)),
                                   static_cast<int>(query.size(1)), static_cast<int>(key.size(1)),
                                   static_cast<int>(query.size(2)), static_cast<int>(rotary_dim), query.stride(0),
                                   key.stride(0), c10::cuda::getCurrentCUDAStream()),
               "rotary_embedding");
}

void bias_act_cuda(at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                   const std::string& activation) {
  const int act = check_bias_act_args(out, x, bias, activation);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t cols = out.size(-1);
  check_launch(kern::launch_bias_act(dtype_of(x, "bias_act"), static_cast<kern::Act>(act), out.data_ptr(),
                                     x.data_ptr(), bias ? bias->data_ptr() : nullptr, cols ? out.numel() / cols : 0,
                                     cols, c10::cuda::getCurrentCUDAStream()),
               "bias_act");
}

at::Tensor skinny_gemm_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t split_k) {
  const char* op = "skinny_gemm";
  check_skinny_gemm_args(x, weight, bias, split_k);
  const int64_t k = x.size(-1), n = weight.size(0);
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  const bool fast = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) && m >= 1 &&
                    m <= kern::kSkinnyMaxM && n >= 1 && n <= INT32_MAX && weight.is_contiguous() &&
                    aligned(weight.data_ptr()) && (!bias.has_value() || bias->is_contiguous()) &&
                    kern::skinny_gemm_supported(static_cast<int>(m), k);
  if (!fast) return at::linear(x, weight, bias).contiguous();  // any other shape: the library GEMM
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor x2 = x.reshape({m, k});
  if (x2.stride(1) != 1 || (m > 1 && x2.stride(0) % 8 != 0) || !aligned(x2.data_ptr()))
    x2 = x2.clone(at::MemoryFormat::Contiguous);  // a fresh allocation: 16-byte aligned rows
  at::Tensor y = at::empty({m, n}, x.options());
  kern::SkinnyGemmParams p{};
  p.y = y.data_ptr();
  p.x = x2.data_ptr();
  p.w = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.ldx = x2.stride(0);
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  check_launch(kern::plan_skinny_gemm(p, static_cast<int>(split_k)), op);
  check_launch(kern::launch_skinny_gemm(dtype_of(x, op), p, c10::cuda::getCurrentCUDAStream()), op);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n;
  return y.view(sizes);
}

}  // namespace spotserve
