// Argument checks shared by the CPU and CUDA implementations of each op (ValueError in Python).
#include "ops.h"

namespace spotserve {
namespace {

void check_same_device(const char* op, const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " is on ", b.device(), ", expected ", a.device());
}

void check_dtype(const char* op, const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), op, ": ", name, " has dtype ", b.scalar_type(), ", expected ",
                    a.scalar_type());
}

// [rows, heads, head_dim] with contiguous heads; rows may be strided (a slice of a fused qkv).
void check_head_rows(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must be [tokens, heads, head_dim], got ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(2) == 1 && (t.size(1) <= 1 || t.stride(1) == t.size(2)), op, ": ", name,
                    " must have contiguous heads (strides [*, head_dim, 1]), got strides ", t.strides());
}

}  // namespace

void check_add_norm_args(const char* op, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.sizes() == residual.sizes(), op, ": x ", x.sizes(), " and residual ", residual.sizes(),
                    " shapes differ");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dim");
  TORCH_CHECK_VALUE(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(), op,
                    ": x, residual and weight must be contiguous");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [", x.size(-1),
                    "], got ", weight.sizes());
  check_dtype(op, x, residual, "residual");
  check_dtype(op, x, weight, "weight");
  check_same_device(op, x, residual, "residual");
  check_same_device(op, x, weight, "weight");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->sizes() == weight.sizes() && bias->is_contiguous(), op, ": bias must be [", x.size(-1),
                      "] and contiguous, got ", bias->sizes());
    check_dtype(op, x, *bias, "bias");
    check_same_device(op, x, *bias, "bias");
  }
}

void check_decode_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, int64_t max_context_len) {
  const char* op = "paged_decode_attention";
  check_head_rows(op, query, "query");
  TORCH_CHECK_VALUE(out.sizes() == query.sizes() && out.is_contiguous(), op, ": out must be contiguous ",
                    query.sizes(), ", got ", out.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, op, ": k_cache must be [num_blocks, block_size, kv_heads, head_dim], got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": v_cache ", v_cache.sizes(), " differs from k_cache ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  TORCH_CHECK_VALUE(k_cache.size(3) == query.size(2), op, ": head_dim of k_cache (", k_cache.size(3),
                    ") differs from query (", query.size(2), ")");
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK_VALUE(kv_heads > 0 && query.size(1) % kv_heads == 0, op, ": ", query.size(1),
                    " query heads are not a multiple of ", kv_heads, " kv heads");
  check_dtype(op, query, out, "out");
  check_dtype(op, query, k_cache, "k_cache");
  check_dtype(op, query, v_cache, "v_cache");
  TORCH_CHECK_VALUE(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.is_contiguous(),
                    op, ": block_tables must be a contiguous int32 [num_seqs, max_blocks], got ",
                    block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK_VALUE(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 && context_lens.is_contiguous(),
                    op, ": context_lens must be a contiguous int32 [num_seqs], got ", context_lens.scalar_type(), " ",
                    context_lens.sizes());
  TORCH_CHECK_VALUE(block_tables.size(0) == query.size(0) && context_lens.size(0) == query.size(0), op,
                    ": block_tables and context_lens must have ", query.size(0), " rows (one per sequence)");
  const int64_t capacity = block_tables.size(1) * k_cache.size(1);
  TORCH_CHECK_VALUE(max_context_len >= 0 && max_context_len <= capacity, op, ": max_context_len ", max_context_len,
                    " outside [0, ", capacity, "] (block_tables width x block_size)");
  for (const at::Tensor* t : {&out, &k_cache, &v_cache, &block_tables, &context_lens})
    check_same_device(op, query, *t, "an argument");
}

void check_write_kv_cache_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const char* op = "write_kv_cache";
  check_head_rows(op, key, "key");
  check_head_rows(op, value, "value");
  TORCH_CHECK_VALUE(value.sizes() == key.sizes(), op, ": value ", value.sizes(), " differs from key ", key.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
                    ": k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  TORCH_CHECK_VALUE(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2), op, ": key rows [",
                    key.size(1), ", ", key.size(2), "] do not match the cache's [kv_heads, head_dim] [", k_cache.size(2),
                    ", ", k_cache.size(3), "]");
  TORCH_CHECK_VALUE(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                        slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
                    op, ": slot_mapping must be a contiguous int64 [", key.size(0), "], got ",
                    slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  check_dtype(op, k_cache, key, "key");
  check_dtype(op, k_cache, value, "value");
  check_dtype(op, k_cache, v_cache, "v_cache");
  for (const at::Tensor* t : {&value, &k_cache, &v_cache, &slot_mapping}) check_same_device(op, key, *t, "an argument");
}

void check_rotary_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& positions,
                       const at::Tensor& cos_sin_cache, int64_t rotary_dim) {
  const char* op = "rotary_embedding";
  check_head_rows(op, query, "query");
  check_head_rows(op, key, "key");
  TORCH_CHECK_VALUE(key.size(0) == query.size(0) && key.size(2) == query.size(2), op, ": key ", key.sizes(),
                    " does not match query ", query.sizes(), " in tokens or head_dim");
  TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= query.size(2), op, ": rotary_dim ",
                    rotary_dim, " must be even and in (0, head_dim=", query.size(2), "]");
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == query.size(0) &&
                        positions.is_contiguous(),
                    op, ": positions must be a contiguous int64 [", query.size(0), "], got ", positions.scalar_type(),
                    " ", positions.sizes());
  TORCH_CHECK_VALUE(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == rotary_dim && cos_sin_cache.is_contiguous(), op,
                    ": cos_sin_cache must be a contiguous [max_positions, ", rotary_dim, "], got ", cos_sin_cache.sizes());
  TORCH_CHECK_VALUE(cos_sin_cache.scalar_type() == at::kFloat || cos_sin_cache.scalar_type() == query.scalar_type(), op,
                    ": cos_sin_cache must be float32 or ", query.scalar_type(), ", got ", cos_sin_cache.scalar_type());
  check_dtype(op, query, key, "key");
  for (const at::Tensor* t : {&key, &positions, &cos_sin_cache}) check_same_device(op, query, *t, "an argument");
}

int check_bias_act_args(const at::Tensor& out, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                        const std::string& activation) {
  const char* op = "bias_act";
  int act = -1;
  if (activation == "none") act = 0;
  else if (activation == "relu") act = 1;
  else if (activation == "gelu") act = 2;
  else if (activation == "gelu_tanh" || activation == "gelu_fast" || activation == "gelu_new") act = 3;
  else if (activation == "silu") act = 4;
  else if (activation == "swiglu") act = 5;
  TORCH_CHECK_VALUE(act >= 0, op, ": unknown activation '", activation,
                    "' (expected none, relu, gelu, gelu_tanh/gelu_fast/gelu_new, silu or swiglu)");
  TORCH_CHECK_VALUE(x.dim() >= 1 && out.dim() == x.dim(), op, ": out and x must have the same number of dims");
  TORCH_CHECK_VALUE(x.is_contiguous() && out.is_contiguous(), op, ": out and x must be contiguous");
  const int64_t in_cols = x.size(-1), cols = act == 5 ? in_cols / 2 : in_cols;
  TORCH_CHECK_VALUE(act != 5 || in_cols % 2 == 0, op, ": swiglu needs an even last dim, got ", in_cols);
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    TORCH_CHECK_VALUE(out.size(d) == x.size(d), op, ": out ", out.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK_VALUE(out.size(-1) == cols, op, ": out's last dim must be ", cols, ", got ", out.size(-1));
  check_dtype(op, x, out, "out");
  check_same_device(op, x, out, "out");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == in_cols && bias->is_contiguous(), op, ": bias must be [",
                      in_cols, "], got ", bias->sizes());
    check_dtype(op, x, *bias, "bias");
    check_same_device(op, x, *bias, "bias");
  }
  return act;
}

}  // namespace spotserve
