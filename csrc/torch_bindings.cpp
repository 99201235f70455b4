// The one place that declares spotserve's op schemas. Implementations register per device.
#include "ops.h"

TORCH_LIBRARY(spotserve, m) {
  m.def("reslice_copy(Tensor(a!) dst, Tensor src, int dim, int src_start, int dst_start, int length) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("fused_add_layer_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, Tensor? bias, float eps) -> ()");
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, int max_context_len, float scale, int partition_size=0) -> ()");
  m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos_sin_cache, int rotary_dim) -> ()");
  m.def("bias_act(Tensor(a!) out, Tensor x, Tensor? bias, str activation) -> ()");
  m.def("skinny_gemm(Tensor x, Tensor weight, Tensor? bias=None, int split_k=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(spotserve, CPU, m) {
  m.impl("reslice_copy", &spotserve::reslice_copy_cpu);
  m.impl("fused_add_rms_norm", &spotserve::fused_add_rms_norm_cpu);
  m.impl("fused_add_layer_norm", &spotserve::fused_add_layer_norm_cpu);
  m.impl("paged_decode_attention", &spotserve::paged_decode_attention_cpu);
  m.impl("write_kv_cache", &spotserve::write_kv_cache_cpu);
  m.impl("rotary_embedding", &spotserve::rotary_embedding_cpu);
  m.impl("bias_act", &spotserve::bias_act_cpu);
  m.impl("skinny_gemm", &spotserve::skinny_gemm_cpu);
}

#ifdef SPOTSERVE_WITH_CUDA
TORCH_LIBRARY_IMPL(spotserve, CUDA, m) {
  m.impl("reslice_copy", &spotserve::reslice_copy_cuda);
  m.impl("fused_add_rms_norm", &spotserve::fused_add_rms_norm_cuda);
  m.impl("fused_add_layer_norm", &spotserve::fused_add_layer_norm_cuda);
  m.impl("paged_decode_attention", &spotserve::paged_decode_attention_cuda);
  m.impl("write_kv_cache", &spotserve::write_kv_cache_cuda);
  m.impl("rotary_embedding", &spotserve::rotary_embedding_cuda);
  m.impl("bias_act", &spotserve::bias_act_cuda);
  m.impl("skinny_gemm", &spotserve::skinny_gemm_cuda);
}
#endif
