// Launchers of the fused GRPO loss kernels: raw pointers, sizes and a stream, no torch types, so
// grpo_loss.cu includes only CUDA headers. The torch glue is grpo_loss_cuda.cpp; the op and its
// PyTorch path are moe_align/ops/grpo.py (grpo_sequence_stats).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_align {

// Columns of the per-sequence statistics, in order (moe_align/ops/grpo.py: STATS).
enum GrpoStat : int {
  kGrpoLossSum = 0,  // sum_t m l_t, l_t = policy term (x truncated IS weight) + beta * kl_t
  kGrpoTokens,       // sum_t m
  kGrpoKlSum,        // sum_t m kl_t, kl_t = k3 (x r when unbiased_kl)
  kGrpoClipLow,      // #{t : m != 0, r < 1 - eps_low, A < 0}
  kGrpoClipHigh,     // #{t : m != 0, r > 1 + eps_high, A > 0}
  kGrpoRatioSum,     // sum_t m r
  kGrpoRatioMin,     // min over m != 0 of r (+inf if none)
  kGrpoRatioMax,     // max over m != 0 of r (-inf if none)
  kGrpoEntropySum,   // sum_t m entropy (0 without entropy)
  kGrpoNumStats
};

// All tensors fp32 and contiguous: logp, old_logp, mask [batch, seq_len]; ref_logp,
// sampler_logp, entropy [batch, seq_len] or nullptr; advantages [batch].
// stats: fp32 [batch, kGrpoNumStats]. Tokens with mask == 0 are skipped (their values may be
// anything). One block per sequence, fixed reduction order: deterministic. unbiased_kl weights
// each token's k3 by its ratio r (DeepSeek-V3.2's unbiased KL estimate).
void launch_grpo_fwd(const float* logp, const float* old_logp, const float* ref_logp,
                     const float* sampler_logp, const float* advantages, const float* mask,
                     const float* entropy, int64_t batch, int64_t seq_len, float eps_low,
                     float eps_high, float beta, float tis_cap, bool unbiased_kl, float* stats,
                     cudaStream_t stream);

// grad_logp[b, t] = grad_loss_sum[b] * m * d l_t / d logp (0 where m == 0); pointers as above,
// grad_loss_sum fp32 [batch], grad_logp fp32 [batch, seq_len].
void launch_grpo_bwd(const float* grad_loss_sum, const float* logp, const float* old_logp,
                     const float* ref_logp, const float* sampler_logp, const float* advantages,
                     const float* mask, int64_t batch, int64_t seq_len, float eps_low,
                     float eps_high, float beta, float tis_cap, bool unbiased_kl,
                     float* grad_logp, cudaStream_t stream);

}  // namespace moe_align
