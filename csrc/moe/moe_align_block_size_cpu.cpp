// C++ CPU kernel of moe_align_block_size: a counting sort by expert, stable in the flat
// (token, k) index, so the layout is deterministic. See moe_align/ops/moe_align_block_size.py.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "ops.h"

namespace moe_align {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  TORCH_CHECK(topk_ids.device().is_cpu(), "topk_ids must be a CPU tensor");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt, "topk_ids must be int32");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.is_contiguous(), "topk_ids must be contiguous [T, K]");
  TORCH_CHECK(num_experts > 0 && block_size > 0, "num_experts and block_size must be positive");

  const int64_t numel = topk_ids.numel();
  const int64_t max_padded = numel + std::min(num_experts, numel) * (block_size - 1);
  const int64_t num_blocks = (max_padded + block_size - 1) / block_size;
  auto opts = topk_ids.options();
  at::Tensor sorted_ids = at::full({max_padded}, static_cast<int32_t>(numel), opts);
  at::Tensor expert_ids = at::full({num_blocks}, -1, opts);
  at::Tensor total = at::empty({1}, opts);

  const int32_t* ids = topk_ids.data_ptr<int32_t>();
  std::vector<int64_t> cursor(num_experts + 1, 0);
  for (int64_t i = 0; i < numel; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < num_experts, "topk_ids[", i, "] = ", ids[i], " is out of range");
    ++cursor[ids[i] + 1];
  }
  // cursor[e] = first slot of expert e, each expert's run rounded up to a whole block.
  int32_t* block_expert = expert_ids.data_ptr<int32_t>();
  int64_t slot = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t count = cursor[e + 1];
    cursor[e] = slot;
    const int64_t padded = (count + block_size - 1) / block_size * block_size;
    std::fill(block_expert + slot / block_size, block_expert + (slot + padded) / block_size,
              static_cast<int32_t>(e));
    slot += padded;
  }
  int32_t* out = sorted_ids.data_ptr<int32_t>();
  for (int64_t i = 0; i < numel; ++i) out[cursor[ids[i]]++] = static_cast<int32_t>(i);
  total.data_ptr<int32_t>()[0] = static_cast<int32_t>(slot);
  return {sorted_ids, expert_ids, total};
}

}  // namespace moe_align
