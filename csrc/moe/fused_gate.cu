// Fused DeepSeek gate: scores, group-limited expert choice, top-k and routing weights, one warp
// per token.
//
// Lane l holds experts l, l + 32, ... (coalesced loads) in registers. Softmax and the
// renormalisation use warp-shuffle reductions. Selection compares 64-bit keys
// (order-preserving bits of the score << 32 | ~expert): the warp maximum of the keys is the best
// score with ties going to the lower expert, as torch.topk on the reference path does. Group
// scores come from a per-warp row of shared memory, lane g reading group g.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moe_kernels.cuh"

namespace moe_align {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kTokensPerBlock = 4;  // one warp per token
constexpr int kThreads = kTokensPerBlock * kWarpSize;
static_assert(kFusedGateMaxTopK <= kWarpSize, "lane k holds the k-th choice");
static_assert(kFusedGateMaxGroups <= kWarpSize, "lane g scores group g");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Unsigned bits in the order of the floats; 0 is kept for "not selectable" and NaN maps to 1,
// below -inf. -0.0 and +0.0 share one key.
__device__ __forceinline__ uint32_t order_key(float x) {
  if (isnan(x)) return 1u;
  if (x == 0.0f) x = 0.0f;
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Larger for a larger key, then for a lower index. A key of 0 packs to 0.
__device__ __forceinline__ uint64_t pack(uint32_t key, int index) {
  return key == 0u ? 0ull : (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~index);
}

__device__ __forceinline__ int unpack_index(uint64_t packed) {
  return static_cast<int>(~static_cast<uint32_t>(packed));
}

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const uint64_t other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// kRegs = ceil(num_experts / 32) rounded up to a power of two: lane l holds expert r * 32 + l.
template <typename scalar_t, int kRegs>
__global__ void __launch_bounds__(kThreads)
    fused_gate_kernel(const scalar_t* __restrict__ logits, int64_t row_stride,
                      const float* __restrict__ correction_bias, int64_t num_tokens,
                      int num_experts, int top_k, int n_group, int topk_group, bool use_sigmoid,
                      bool group_by_top2_sum, bool renormalize, float routed_scaling_factor,
                      float* __restrict__ topk_weights, int32_t* __restrict__ topk_ids) {
  extern __shared__ float group_rows[];  // [kTokensPerBlock, num_experts] when n_group > 1
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + warp;
  if (token >= num_tokens) return;  // whole warp; the kernel has no block barrier
  const scalar_t* row = logits + token * row_stride;

  // Scores s.
  float score[kRegs];
#pragma unroll
  for (int r = 0; r < kRegs; ++r) {
    const int e = r * kWarpSize + lane;
    score[r] = e < num_experts ? to_float(row[e]) : -INFINITY;
  }
  if (use_sigmoid) {
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const int e = r * kWarpSize + lane;
      score[r] = e < num_experts ? 1.0f / (1.0f + expf(-score[r])) : 0.0f;
    }
  } else {
    float row_max = -INFINITY;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) row_max = fmaxf(row_max, score[r]);
    row_max = warp_max(row_max);
    float sum = 0.0f;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const int e = r * kWarpSize + lane;
      score[r] = e < num_experts ? expf(score[r] - row_max) : 0.0f;
      sum += score[r];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int r = 0; r < kRegs; ++r) score[r] /= sum;
  }

  // Selection scores c = s + bias.
  float choice[kRegs];
#pragma unroll
  for (int r = 0; r < kRegs; ++r) {
    const int e = r * kWarpSize + lane;
    choice[r] = score[r];
    if (correction_bias != nullptr && e < num_experts) choice[r] += correction_bias[e];
  }

  // Group-limited choice: experts outside the topk_group best groups get c = -inf.
  if (n_group > 1) {
    float* my_row = group_rows + warp * num_experts;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const int e = r * kWarpSize + lane;
      if (e < num_experts) my_row[e] = choice[r];
    }
    __syncwarp();
    const int group_size = num_experts / n_group;
    uint64_t group_key = 0;
    if (lane < n_group) {
      float best = -INFINITY, second = -INFINITY;
      for (int i = 0; i < group_size; ++i) {
        const float v = my_row[lane * group_size + i];
        if (v > best) {
          second = best;
          best = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_key = pack(order_key(group_by_top2_sum ? best + second : best), lane);
    }
    uint32_t kept = 0;
    for (int k = 0; k < topk_group; ++k) {
      const int g = unpack_index(warp_max(group_key));
      kept |= 1u << g;
      if (lane == g) group_key = 0;
    }
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const int e = r * kWarpSize + lane;
      if (e < num_experts && !((kept >> (e / group_size)) & 1u)) choice[r] = -INFINITY;
    }
  }

  // Top-k by c, best first; lane k keeps the k-th choice.
  uint32_t key[kRegs];
#pragma unroll
  for (int r = 0; r < kRegs; ++r) {
    key[r] = r * kWarpSize + lane < num_experts ? order_key(choice[r]) : 0u;
  }
  uint32_t taken = 0;  // bit r: register r was chosen (a bit mask keeps key[] in registers)
  float my_weight = 0.0f;
  int my_id = 0;
  for (int k = 0; k < top_k; ++k) {
    uint64_t mine = 0;
    float mine_score = 0.0f;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const uint64_t candidate = (taken >> r) & 1u ? 0ull : pack(key[r], r * kWarpSize + lane);
      if (candidate > mine) {
        mine = candidate;
        mine_score = score[r];
      }
    }
    const int expert = unpack_index(warp_max(mine));
    const int owner = expert % kWarpSize;
    const float weight = __shfl_sync(kFullMask, mine_score, owner);
    if (lane == owner) taken |= 1u << (expert / kWarpSize);
    if (lane == k) {
      my_weight = weight;
      my_id = expert;
    }
  }

  // Weights: w = s[ids] (/ (sum + 1e-20)) * routed_scaling_factor.
  if (renormalize) {
    const float sum = warp_sum(lane < top_k ? my_weight : 0.0f);
    my_weight /= sum + 1e-20f;
  }
  if (lane < top_k) {
    topk_weights[token * top_k + lane] = my_weight * routed_scaling_factor;
    topk_ids[token * top_k + lane] = my_id;
  }
}

template <typename scalar_t, int kRegs>
void launch_typed(const void* logits, int64_t row_stride, const float* correction_bias,
                  int64_t num_tokens, int num_experts, int top_k, int n_group, int topk_group,
                  bool use_sigmoid, bool group_by_top2_sum, bool renormalize,
                  float routed_scaling_factor, float* topk_weights, int32_t* topk_ids,
                  cudaStream_t stream) {
  const int64_t blocks = (num_tokens + kTokensPerBlock - 1) / kTokensPerBlock;
  const size_t smem = n_group > 1 ? kTokensPerBlock * num_experts * sizeof(float) : 0;
  fused_gate_kernel<scalar_t, kRegs><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      static_cast<const scalar_t*>(logits), row_stride, correction_bias, num_tokens, num_experts,
      top_k, n_group, topk_group, use_sigmoid, group_by_top2_sum, renormalize,
      routed_scaling_factor, topk_weights, topk_ids);
}

template <typename scalar_t>
void launch_for_experts(const void* logits, int64_t row_stride, const float* correction_bias,
                        int64_t num_tokens, int num_experts, int top_k, int n_group,
                        int topk_group, bool use_sigmoid, bool group_by_top2_sum, bool renormalize,
                        float routed_scaling_factor, float* topk_weights, int32_t* topk_ids,
                        cudaStream_t stream) {
  static_assert(kFusedGateMaxExperts == 16 * kWarpSize, "the dispatch below stops at 16 registers");
  const int regs = (num_experts + kWarpSize - 1) / kWarpSize;
  auto launch = regs <= 1   ? &launch_typed<scalar_t, 1>
                : regs <= 2 ? &launch_typed<scalar_t, 2>
                : regs <= 4 ? &launch_typed<scalar_t, 4>
                : regs <= 8 ? &launch_typed<scalar_t, 8>
                            : &launch_typed<scalar_t, 16>;
  launch(logits, row_stride, correction_bias, num_tokens, num_experts, top_k, n_group, topk_group,
         use_sigmoid, group_by_top2_sum, renormalize, routed_scaling_factor, topk_weights,
         topk_ids, stream);
}

}  // namespace

void launch_fused_gate(const void* logits, GateDType dtype, int64_t row_stride,
                       const float* correction_bias, int64_t num_tokens, int num_experts,
                       int top_k, int n_group, int topk_group, bool use_sigmoid,
                       bool group_by_top2_sum, bool renormalize, float routed_scaling_factor,
                       float* topk_weights, int32_t* topk_ids, cudaStream_t stream) {
  if (num_tokens == 0) return;
  auto launch = dtype == GateDType::kFloat32   ? &launch_for_experts<float>
                : dtype == GateDType::kFloat16 ? &launch_for_experts<__half>
                                               : &launch_for_experts<__nv_bfloat16>;
  launch(logits, row_stride, correction_bias, num_tokens, num_experts, top_k, n_group, topk_group,
         use_sigmoid, group_by_top2_sum, renormalize, routed_scaling_factor, topk_weights,
         topk_ids, stream);
}

}  // namespace moe_align
