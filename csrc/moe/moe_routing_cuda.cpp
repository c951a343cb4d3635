// Torch glue of the CUDA MoE routing kernels: argument checks, device guard, current stream,
// output and workspace allocation. The kernels and their launchers are in the .cu files.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "moe/moe_align_block_size.h"
#include "moe/moe_kernels.cuh"
#include "ops.h"

namespace moe_align {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  TORCH_CHECK(topk_ids.is_cuda(), "moe_align_block_size: topk_ids must be a CUDA tensor");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMoeAlignMaxExperts,
              "moe_align_block_size: the CUDA kernel takes 1 to ", kMoeAlignMaxExperts,
              " experts, got ", num_experts);
  const int64_t max_padded = moe_align_max_padded(topk_ids, num_experts, block_size);
  const int64_t numel = topk_ids.numel();
  const int64_t num_blocks = (max_padded + block_size - 1) / block_size;

  const c10::cuda::CUDAGuard device_guard(topk_ids.device());
  const auto options = topk_ids.options();
  at::Tensor sorted_token_ids = at::empty({max_padded}, options);
  at::Tensor expert_ids = at::empty({num_blocks}, options);
  at::Tensor num_tokens_post_padded = at::empty({1}, options);
  const int64_t workspace_size =
      moe_align_block_size_workspace_size(numel, static_cast<int>(num_experts));
  at::Tensor workspace = at::empty({workspace_size}, options);

  launch_moe_align_block_size(
      topk_ids.data_ptr<int32_t>(), numel, static_cast<int>(num_experts),
      static_cast<int>(block_size), sorted_token_ids.data_ptr<int32_t>(),
      expert_ids.data_ptr<int32_t>(), num_tokens_post_padded.data_ptr<int32_t>(),
      workspace.numel() ? workspace.data_ptr<int32_t>() : nullptr,
      at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted_token_ids, expert_ids, num_tokens_post_padded};
}

std::tuple<at::Tensor, at::Tensor> fused_gate_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& correction_bias, int64_t top_k,
    int64_t n_group, int64_t topk_group, bool use_sigmoid, bool group_by_top2_sum,
    bool renormalize, double routed_scaling_factor) {
  TORCH_CHECK(logits.is_cuda(), "fused_gate: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "fused_gate: logits must be 2-D [tokens, experts], got ",
              logits.dim(), " dims");
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fused_gate: logits must be fp32, fp16 or bf16, got ", dtype);
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(logits.stride(1) == 1 || num_experts <= 1,
              "fused_gate: logits rows must be contiguous (stride 1 along experts)");
  TORCH_CHECK(num_tokens <= std::numeric_limits<int32_t>::max(), "fused_gate: too many tokens (",
              num_tokens, ")");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kFusedGateMaxExperts,
              "fused_gate: the CUDA kernel takes 1 to ", kFusedGateMaxExperts, " experts, got ",
              num_experts);
  TORCH_CHECK(n_group >= 1 && n_group <= kFusedGateMaxGroups && num_experts % n_group == 0,
              "fused_gate: n_group must divide the ", num_experts, " experts and be at most ",
              kFusedGateMaxGroups, ", got ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "fused_gate: topk_group must be in [1, ",
              n_group, "], got ", topk_group);
  const int64_t reachable = topk_group * (num_experts / n_group);
  TORCH_CHECK(top_k >= 1 && top_k <= std::min<int64_t>(reachable, kFusedGateMaxTopK),
              "fused_gate: top_k must be in [1, min(", reachable, ", ", kFusedGateMaxTopK,
              ")], got ", top_k);
  TORCH_CHECK(!group_by_top2_sum || n_group == 1 || num_experts / n_group >= 2,
              "fused_gate: group_by_top2_sum needs at least 2 experts per group");
  const float* bias = nullptr;
  if (correction_bias.has_value()) {
    const at::Tensor& b = *correction_bias;
    TORCH_CHECK(b.device() == logits.device(), "fused_gate: correction_bias is on ", b.device(),
                ", logits on ", logits.device());
    TORCH_CHECK(b.scalar_type() == at::kFloat, "fused_gate: correction_bias must be fp32, got ",
                b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == num_experts && b.is_contiguous(),
                "fused_gate: correction_bias must be a contiguous [", num_experts, "] tensor");
    bias = b.data_ptr<float>();
  }

  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor topk_weights = at::empty({num_tokens, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor topk_ids = at::empty({num_tokens, top_k}, logits.options().dtype(at::kInt));
  if (num_tokens == 0) return {topk_weights, topk_ids};

  const GateDType gate_dtype = dtype == at::kFloat  ? GateDType::kFloat32
                               : dtype == at::kHalf ? GateDType::kFloat16
                                                    : GateDType::kBFloat16;
  launch_fused_gate(logits.data_ptr(), gate_dtype, logits.stride(0), bias, num_tokens,
                    static_cast<int>(num_experts), static_cast<int>(top_k),
                    static_cast<int>(n_group), static_cast<int>(topk_group), use_sigmoid,
                    group_by_top2_sum, renormalize, static_cast<float>(routed_scaling_factor),
                    topk_weights.data_ptr<float>(), topk_ids.data_ptr<int32_t>(),
                    at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {topk_weights, topk_ids};
}

}  // namespace moe_align
