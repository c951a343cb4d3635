// Every native op of moe_align: its schema, and its CPU and CUDA kernels.
// Fake (meta) implementations and autograd formulas are registered from Python
// (moe_align/ops), next to each op's PyTorch path.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(moe_align, m) {
  // Expert-sorted layout of routed (token, k) pairs, each expert's slots padded to a multiple
  // of block_size. See moe_align/ops/moe_align_block_size.py for the full contract.
  m.def(
      "moe_align_block_size(Tensor topk_ids, int num_experts, int block_size)"
      " -> (Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_padded)");
  // Fused DeepSeek gate: scores, group-limited choice, top-k, weights. CUDA only; the
  // PyTorch path serves the CPU. See moe_align/ops/gate.py.
  m.def(
      "fused_gate(Tensor logits, Tensor? correction_bias, int top_k, int n_group,"
      " int topk_group, bool use_sigmoid, bool group_by_top2_sum, bool renormalize,"
      " float routed_scaling_factor) -> (Tensor topk_weights, Tensor topk_ids)");
  // ---- mla/ ----
  // MLA paged latent-cache append, CUDA only (Triton and PyTorch paths elsewhere). Row t of
  // latent / k_rope goes to cache slot slot_mapping[t]; negative slots are skipped. See
  // moe_align/ops/mla.py (mla_cache_append).
  m.def(
      "mla_cache_write(Tensor(a!) kv_cache, Tensor latent, Tensor k_rope, Tensor slot_mapping)"
      " -> ()");
  // ---- end mla/ ----
  // ---- grpo/ ----
  // Fused GRPO loss, CUDA only (the PyTorch path serves the CPU): per-sequence sums of the
  // per-token loss and metrics, and the per-token gradient of the loss sums. See
  // moe_align/ops/grpo.py (grpo_sequence_stats).
  m.def(
      "fused_grpo_fwd(Tensor logp, Tensor old_logp, Tensor? ref_logp, Tensor? sampler_logp,"
      " Tensor advantages, Tensor mask, Tensor? entropy, float eps_low, float eps_high,"
      " float beta, float tis_cap, bool unbiased_kl) -> Tensor stats");
  m.def(
      "fused_grpo_bwd(Tensor grad_loss_sum, Tensor logp, Tensor old_logp, Tensor? ref_logp,"
      " Tensor? sampler_logp, Tensor advantages, Tensor mask, float eps_low, float eps_high,"
      " float beta, float tis_cap, bool unbiased_kl) -> Tensor grad_logp");
  // ---- end grpo/ ----
}

TORCH_LIBRARY_IMPL(moe_align, CPU, m) {
  m.impl("moe_align_block_size", &moe_align::moe_align_block_size_cpu);
}

#ifdef MOE_ALIGN_WITH_CUDA
TORCH_LIBRARY_IMPL(moe_align, CUDA, m) {
  m.impl("moe_align_block_size", &moe_align::moe_align_block_size_cuda);
  m.impl("fused_gate", &moe_align::fused_gate_cuda);
  // ---- mla/ ----
  m.impl("mla_cache_write", &moe_align::mla_cache_write_cuda);
  // ---- end mla/ ----
  // ---- grpo/ ----
  m.impl("fused_grpo_fwd", &moe_align::fused_grpo_fwd_cuda);
  m.impl("fused_grpo_bwd", &moe_align::fused_grpo_bwd_cuda);
  // ---- end grpo/ ----
}
#endif

// `import moe_align._C` loads this library, which registers the ops above; the module
// itself defines nothing (pytorch/extension-cpp's pattern).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
