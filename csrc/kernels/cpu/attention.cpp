// CPU decode attention over the paged KV cache and the KV cache write (layout: csrc/ops.h).
// Float accumulation, one (sequence, head) per task; also checks what the CUDA path cannot
// without a host sync (block ids, slots and lengths in range).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"

namespace spotserve {

void paged_decode_attention_cpu(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& context_lens, int64_t max_context_len, double scale,
                                int64_t /*partition_size: a launch parameter of the CUDA kernel*/) {
  check_decode_attention_args(out, query, k_cache, v_cache, block_tables, context_lens, max_context_len);
  const int64_t seqs = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1), group = heads / kv_heads;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK_VALUE(cl[s] >= 0 && cl[s] <= max_blocks * block_size, "paged_decode_attention: context_lens[", s,
                      "] = ", cl[s], " outside [0, ", max_blocks * block_size, "]");
    for (int64_t b = 0; b < (cl[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK_VALUE(bt[s * max_blocks + b] >= 0 && bt[s * max_blocks + b] < num_blocks,
                        "paged_decode_attention: block_tables[", s, "][", b, "] = ", bt[s * max_blocks + b],
                        " outside [0, ", num_blocks, ")");
  }
  const int64_t q_stride = query.stride(0), tok_stride = kv_heads * dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_decode_attention_cpu", [&] {
    const scalar_t* qp = query.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, seqs * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> score, acc(dim);
      for (int64_t sh = begin; sh < end; ++sh) {
        const int64_t s = sh / heads, h = sh % heads, kvh = h / group;
        const int64_t ctx = cl[s];
        const scalar_t* q = qp + s * q_stride + h * dim;
        score.assign(ctx, 0.f);
        float mx = -std::numeric_limits<float>::infinity();
        auto row = [&](int64_t t) { return (bt[s * max_blocks + t / block_size] * block_size + t % block_size) * tok_stride + kvh * dim; };
        for (int64_t t = 0; t < ctx; ++t) {
          const scalar_t* k = kp + row(t);
          float dot = 0.f;
          for (int64_t d = 0; d < dim; ++d) dot += static_cast<float>(q[d]) * static_cast<float>(k[d]);
          score[t] = dot * static_cast<float>(scale);
          mx = std::max(mx, score[t]);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        float sum = 0.f;
        for (int64_t t = 0; t < ctx; ++t) {
          const float p = std::exp(score[t] - mx);
          sum += p;
          const scalar_t* v = vp + row(t);
          for (int64_t d = 0; d < dim; ++d) acc[d] += p * static_cast<float>(v[d]);
        }
        scalar_t* o = op + sh * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(ctx > 0 ? acc[d] / sum : 0.f);
      }
    });
  });
}

void write_kv_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& slot_mapping) {
  check_write_kv_cache_args(key, value, k_cache, v_cache, slot_mapping);
  const int64_t tokens = key.size(0), row = key.size(1) * key.size(2);
  const int64_t slots = k_cache.size(0) * k_cache.size(1), elem = key.element_size();
  const int64_t* sm = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK_VALUE(sm[t] < slots, "write_kv_cache: slot_mapping[", t, "] = ", sm[t], " outside the cache's ", slots,
                      " slots");
  const char* kp = static_cast<const char*>(key.data_ptr());
  const char* vp = static_cast<const char*>(value.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    if (sm[t] < 0) continue;  // padding token
    std::memcpy(kc + sm[t] * row * elem, kp + t * key.stride(0) * elem, row * elem);
    std::memcpy(vc + sm[t] * row * elem, vp + t * value.stride(0) * elem, row * elem);
  }
}

}  // namespace spotserve
