// Launchers of the MoE routing kernels: raw pointers, sizes and a stream, no torch types, so
// the .cu files that define them include only CUDA headers. The torch glue (argument checks,
// allocation, streams) is moe_routing_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_align {

// ---- moe_align_block_size ---------------------------------------------------------------------

// Most experts the kernel takes (per-warp histograms live in shared memory).
constexpr int kMoeAlignMaxExperts = 1024;

// int32 elements of device workspace that launch_moe_align_block_size needs for `numel` routed
// pairs and `num_experts` experts; 0 means no workspace (pass nullptr).
int64_t moe_align_block_size_workspace_size(int64_t numel, int num_experts);

// topk_ids: int32 [numel], contiguous, values in [0, num_experts).
// sorted_token_ids: int32 [max_padded], expert_ids: int32 [ceil(max_padded / block_size)],
// num_tokens_post_padded: int32 [1], where
//   max_padded = numel + min(num_experts, numel) * (block_size - 1) < 2**31.
// workspace: int32 [moe_align_block_size_workspace_size(numel, num_experts)] (any contents).
// Deterministic; no host synchronisation (CUDA-graph capturable).
void launch_moe_align_block_size(const int32_t* topk_ids, int64_t numel, int num_experts,
                                 int block_size, int32_t* sorted_token_ids, int32_t* expert_ids,
                                 int32_t* num_tokens_post_padded, int32_t* workspace,
                                 cudaStream_t stream);

// ---- fused_gate ------------------------------------------------------------------------------

// Limits of the fused gate kernel; outside them the Python wrapper runs the PyTorch path.
constexpr int kFusedGateMaxExperts = 512;
constexpr int kFusedGateMaxGroups = 32;
constexpr int kFusedGateMaxTopK = 32;

enum class GateDType { kFloat32, kFloat16, kBFloat16 };

// logits: [num_tokens, num_experts] of `dtype`, row i at logits + i * row_stride (elements),
// unit stride along experts. correction_bias: fp32 [num_experts] or nullptr.
// topk_weights: fp32 [num_tokens, top_k], topk_ids: int32 [num_tokens, top_k], contiguous.
// Needs 1 <= num_experts <= kFusedGateMaxExperts, 1 <= n_group <= kFusedGateMaxGroups dividing
// num_experts, 1 <= topk_group <= n_group, 1 <= top_k <= min(kFusedGateMaxTopK,
// topk_group * num_experts / n_group), and 2 experts per group for group_by_top2_sum.
void launch_fused_gate(const void* logits, GateDType dtype, int64_t row_stride,
                       const float* correction_bias, int64_t num_tokens, int num_experts,
                       int top_k, int n_group, int topk_group, bool use_sigmoid,
                       bool group_by_top2_sum, bool renormalize, float routed_scaling_factor,
                       float* topk_weights, int32_t* topk_ids, cudaStream_t stream);

}  // namespace moe_align
