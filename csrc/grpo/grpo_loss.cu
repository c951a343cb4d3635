// Fused GRPO loss (DeepSeek-V2 eq. 32-33): per-token clipped surrogate, truncated importance
// weight and k3 KL (optionally weighted by the ratio: the unbiased estimate), summed per sequence
// with the metrics a trainer logs (forward), and the per-token gradient of those sums (backward).
// The aggregation over sequences (eq. 32's means, TRL's bnpo / dapo / dr_grpo) is a few scalar
// operations on the [batch] sums, in Python.
//
// Forward: one block per sequence; each thread strides over the tokens, then a warp-shuffle and
// shared-memory reduction (fixed order) folds the kGrpoNumStats partial values.
// Backward: elementwise over [batch, seq_len].
#include <cuda_runtime.h>

#include <cstdint>

#include "grpo_loss.cuh"

namespace moe_align {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kFwdThreads = 256;
constexpr int kFwdWarps = kFwdThreads / kWarpSize;
constexpr int kBwdThreads = 256;

struct TokenTerms {
  float ratio;
  float loss;  // policy term (x IS weight) + beta * kl
  float kl;    // k3, times the ratio when unbiased_kl
};

__device__ __forceinline__ TokenTerms token_terms(float lp, float old, const float* ref,
                                                  const float* sampler, int64_t i, float adv,
                                                  float eps_low, float eps_high, float beta,
                                                  float tis_cap, bool unbiased_kl) {
  TokenTerms out;
  out.ratio = expf(lp - old);
  const float clipped = fminf(fmaxf(out.ratio, 1.0f - eps_low), 1.0f + eps_high);
  out.loss = -fminf(out.ratio * adv, clipped * adv);
  if (sampler != nullptr) out.loss *= fminf(expf(old - sampler[i]), tis_cap);
  out.kl = 0.0f;
  if (ref != nullptr) {
    const float d = ref[i] - lp;
    out.kl = expf(d) - d - 1.0f;
    if (unbiased_kl) out.kl *= out.ratio;
    if (beta != 0.0f) out.loss += beta * out.kl;
  }
  return out;
}

__device__ __forceinline__ float combine(float a, float b, int stat) {
  if (stat == kGrpoRatioMin) return fminf(a, b);
  if (stat == kGrpoRatioMax) return fmaxf(a, b);
  return a + b;
}

__global__ void __launch_bounds__(kFwdThreads)
    grpo_fwd_kernel(const float* __restrict__ logp, const float* __restrict__ old_logp,
                    const float* __restrict__ ref_logp, const float* __restrict__ sampler_logp,
                    const float* __restrict__ advantages, const float* __restrict__ mask,
                    const float* __restrict__ entropy, int64_t seq_len, float eps_low,
                    float eps_high, float beta, float tis_cap, bool unbiased_kl,
                    float* __restrict__ stats) {
  const int64_t b = blockIdx.x;
  const int64_t row = b * seq_len;
  const float adv = advantages[b];
  float acc[kGrpoNumStats];
#pragma unroll
  for (int s = 0; s < kGrpoNumStats; ++s) acc[s] = 0.0f;
  acc[kGrpoRatioMin] = INFINITY;
  acc[kGrpoRatioMax] = -INFINITY;

  for (int64_t t = threadIdx.x; t < seq_len; t += kFwdThreads) {
    const int64_t i = row + t;
    const float m = mask[i];
    if (m == 0.0f) continue;
    const TokenTerms x = token_terms(logp[i], old_logp[i], ref_logp, sampler_logp, i, adv,
                                     eps_low, eps_high, beta, tis_cap, unbiased_kl);
    acc[kGrpoLossSum] += x.loss * m;
    acc[kGrpoTokens] += m;
    acc[kGrpoKlSum] += x.kl * m;
    acc[kGrpoClipLow] += (x.ratio < 1.0f - eps_low && adv < 0.0f) ? m : 0.0f;
    acc[kGrpoClipHigh] += (x.ratio > 1.0f + eps_high && adv > 0.0f) ? m : 0.0f;
    acc[kGrpoRatioSum] += x.ratio * m;
    acc[kGrpoRatioMin] = fminf(acc[kGrpoRatioMin], x.ratio);
    acc[kGrpoRatioMax] = fmaxf(acc[kGrpoRatioMax], x.ratio);
    if (entropy != nullptr) acc[kGrpoEntropySum] += entropy[i] * m;
  }

  // Warp, then block reduction: the same tree for every launch of the same seq_len.
  __shared__ float partial[kFwdWarps][kGrpoNumStats];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int s = 0; s < kGrpoNumStats; ++s) {
    float v = acc[s];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
      v = combine(v, __shfl_xor_sync(kFullMask, v, offset), s);
    }
    if (lane == 0) partial[warp][s] = v;
  }
  __syncthreads();
  if (threadIdx.x < kGrpoNumStats) {
    const int s = threadIdx.x;
    float v = partial[0][s];
    for (int w = 1; w < kFwdWarps; ++w) v = combine(v, partial[w][s], s);
    stats[b * kGrpoNumStats + s] = v;
  }
}

__global__ void __launch_bounds__(kBwdThreads)
    grpo_bwd_kernel(const float* __restrict__ grad_loss_sum, const float* __restrict__ logp,
                    const float* __restrict__ old_logp, const float* __restrict__ ref_logp,
                    const float* __restrict__ sampler_logp, const float* __restrict__ advantages,
                    const float* __restrict__ mask, int64_t numel, int64_t seq_len,
                    float eps_low, float eps_high, float beta, float tis_cap, bool unbiased_kl,
                    float* __restrict__ grad_logp) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBwdThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x; i < numel;
       i += stride) {
    const float m = mask[i];
    if (m == 0.0f) {
      grad_logp[i] = 0.0f;
      continue;
    }
    const int64_t b = i / seq_len;
    const float adv = advantages[b];
    const float lp = logp[i];
    const float old = old_logp[i];
    const float ratio = expf(lp - old);
    // d(-min(r A, clip(r) A)) / d logp: -A r, or 0 where the min takes the active clip.
    const bool clipped = (adv > 0.0f && ratio > 1.0f + eps_high) ||
                         (adv < 0.0f && ratio < 1.0f - eps_low);
    float g = clipped ? 0.0f : -adv * ratio;
    if (sampler_logp != nullptr) g *= fminf(expf(old - sampler_logp[i]), tis_cap);
    // d k3 / d logp = 1 - pi_ref / pi; d (r k3) / d logp = r (k3 + 1 - pi_ref / pi)
    // = r (logp - ref)
    if (ref_logp != nullptr && beta != 0.0f) {
      g += beta * (unbiased_kl ? ratio * (lp - ref_logp[i]) : 1.0f - expf(ref_logp[i] - lp));
    }
    grad_logp[i] = g * m * grad_loss_sum[b];
  }
}

}  // namespace

void launch_grpo_fwd(const float* logp, const float* old_logp, const float* ref_logp,
                     const float* sampler_logp, const float* advantages, const float* mask,
                     const float* entropy, int64_t batch, int64_t seq_len, float eps_low,
                     float eps_high, float beta, float tis_cap, bool unbiased_kl, float* stats,
                     cudaStream_t stream) {
  if (batch == 0) return;
  grpo_fwd_kernel<<<static_cast<unsigned>(batch), kFwdThreads, 0, stream>>>(
      logp, old_logp, ref_logp, sampler_logp, advantages, mask, entropy, seq_len, eps_low,
      eps_high, beta, tis_cap, unbiased_kl, stats);
}

void launch_grpo_bwd(const float* grad_loss_sum, const float* logp, const float* old_logp,
                     const float* ref_logp, const float* sampler_logp, const float* advantages,
                     const float* mask, int64_t batch, int64_t seq_len, float eps_low,
                     float eps_high, float beta, float tis_cap, bool unbiased_kl,
                     float* grad_logp, cudaStream_t stream) {
  const int64_t numel = batch * seq_len;
  if (numel == 0) return;
  const int64_t blocks = (numel + kBwdThreads - 1) / kBwdThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  grpo_bwd_kernel<<<grid, kBwdThreads, 0, stream>>>(grad_loss_sum, logp, old_logp, ref_logp,
                                                     sampler_logp, advantages, mask, numel,
                                                     seq_len, eps_low, eps_high, beta, tis_cap,
                                                     unbiased_kl, grad_logp);
}

}  // namespace moe_align
