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

}  // namespace moe_align
