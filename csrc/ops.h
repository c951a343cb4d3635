// Prototypes of every native op of moe_align. Schemas live in torch_bindings.cpp.
//
// CPU implementations are compiled always; CUDA implementations only when the
// extension is built with CUDA (MOE_ALIGN_WITH_CUDA). The CUDA kernels and
// their raw-pointer launchers live in .cu files that include only CUDA
// headers; the torch glue (argument checks, streams, allocation) lives in
// *_cuda.cpp files.
#pragma once

#include <torch/library.h>
#include <ATen/Tensor.h>

#include <optional>
#include <tuple>

namespace moe_align {

// ---- moe/ : fine-grained expert routing ------------------------------------

// topk_ids: int32 [T, K], contiguous, values in [0, num_experts).
// Returns (sorted_token_ids int32 [max_padded], expert_ids int32 [ceil(max_padded / block_size)],
//          num_tokens_post_padded int32 [1]), where
//   max_padded = T*K + min(num_experts, T*K) * (block_size - 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size);

#ifdef MOE_ALIGN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size);

// logits: bf16/fp16/fp32 [T, E]; correction_bias: fp32 [E] or none.
// Returns (topk_weights fp32 [T, top_k], topk_ids int32 [T, top_k]).
std::tuple<at::Tensor, at::Tensor> fused_gate_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias,
    int64_t top_k, int64_t n_group, int64_t topk_group, bool use_sigmoid,
    bool group_by_top2_sum, bool renormalize, double routed_scaling_factor);
#endif

// ---- mla/ : Multi-head Latent Attention ------------------------------------

#ifdef MOE_ALIGN_WITH_CUDA
// kv_cache: [num_blocks, block_size, D_lat + D_rope], unit last stride, written in place;
// latent [N, D_lat] and k_rope [N, D_rope] in the cache's dtype, unit last stride;
// slot_mapping: int64 [N], contiguous. Row t goes to cache row
// [slot / block_size, slot % block_size] for slot = slot_mapping[t] >= 0.
void mla_cache_write_cuda(at::Tensor& kv_cache, const at::Tensor& latent, const at::Tensor& k_rope,
                          const at::Tensor& slot_mapping);
#endif

// ---- end mla/ ----

// ---- grpo/ : fused GRPO loss -------------------------------------------------

#ifdef MOE_ALIGN_WITH_CUDA
// logp, old_logp, mask (and ref_logp, sampler_logp, entropy when given): fp32 [B, T],
// contiguous; advantages: fp32 [B]. Returns fp32 [B, 9] per-sequence sums (see grpo/grpo_loss.cuh).
at::Tensor fused_grpo_fwd_cuda(const at::Tensor& logp, const at::Tensor& old_logp,
                               const std::optional<at::Tensor>& ref_logp,
                               const std::optional<at::Tensor>& sampler_logp,
                               const at::Tensor& advantages, const at::Tensor& mask,
                               const std::optional<at::Tensor>& entropy, double eps_low,
                               double eps_high, double beta, double tis_cap, bool unbiased_kl);
// grad_loss_sum: fp32 [B]. Returns fp32 [B, T]: d(sum_b grad_loss_sum[b] loss_sum[b]) / d logp.
at::Tensor fused_grpo_bwd_cuda(const at::Tensor& grad_loss_sum, const at::Tensor& logp,
                               const at::Tensor& old_logp,
                               const std::optional<at::Tensor>& ref_logp,
                               const std::optional<at::Tensor>& sampler_logp,
                               const at::Tensor& advantages, const at::Tensor& mask,
                               double eps_low, double eps_high, double beta, double tis_cap,
                               bool unbiased_kl);
#endif

// ---- end grpo/ ----

}  // namespace moe_align
