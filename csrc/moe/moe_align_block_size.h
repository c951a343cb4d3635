// Host-side checks shared by the CPU and CUDA moe_align_block_size (each checks the device and
// its own range of expert counts first).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace moe_align {

// Checks topk_ids (int32, 2-D, contiguous) and block_size, and returns the layout's size,
//   max_padded = T*K + min(num_experts, T*K) * (block_size - 1),
// which, like every id in it, must fit in int32.
inline int64_t moe_align_max_padded(const at::Tensor& topk_ids, int64_t num_experts,
                                    int64_t block_size) {
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt,
              "moe_align_block_size: topk_ids must be int32, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_ids.dim() == 2, "moe_align_block_size: topk_ids must be 2-D, got ",
              topk_ids.dim(), " dims");
  TORCH_CHECK(topk_ids.is_contiguous(), "moe_align_block_size: topk_ids must be contiguous");
  TORCH_CHECK(block_size >= 1 && block_size <= std::numeric_limits<int32_t>::max(),
              "moe_align_block_size: block_size must be in [1, 2**31), got ", block_size);
  const int64_t numel = topk_ids.numel();
  TORCH_CHECK(numel < std::numeric_limits<int32_t>::max(),
              "moe_align_block_size: too many routed pairs (", numel, ")");
  const int64_t max_padded = numel + std::min(num_experts, numel) * (block_size - 1);
  TORCH_CHECK(max_padded < std::numeric_limits<int32_t>::max(),
              "moe_align_block_size: the layout needs ", max_padded,
              " slots; int32 ids hold < 2**31");
  return max_padded;
}

}  // namespace moe_align
