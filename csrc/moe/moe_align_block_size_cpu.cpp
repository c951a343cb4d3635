// moe_align_block_size on the CPU: a stable counting sort of routed (token, k) pairs by expert.
//
// The ids are cut into chunks (one per thread for large inputs). Pass 1 counts each chunk's ids
// per expert; a scan over (expert, chunk) gives every chunk its first slot in each expert's run;
// pass 2 scatters each chunk in order. Within an expert, slots therefore follow the flat index
// whatever the number of chunks: the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "moe/moe_align_block_size.h"
#include "ops.h"

namespace moe_align {
namespace {

// Below this many pairs per chunk, threads cost more than they save: both passes are a few
// cycles per pair, so a second thread saves at most ~100 us at 2**18 pairs, while waking it can
// cost as much, and twice the whole run when the other core is busy (T=16384 x top-8 = 2**17
// pairs: 230 us on one thread of the 2-core CI machine, no faster on two, 440 us when contended).
constexpr int64_t kMinChunkElems = 1 << 18;

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cpu(
    const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  TORCH_CHECK(topk_ids.device().is_cpu(), "moe_align_block_size: topk_ids must be a CPU tensor");
  TORCH_CHECK(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(),
              "moe_align_block_size: num_experts must be in [1, 2**31), got ", num_experts);
  const int64_t max_padded = moe_align_max_padded(topk_ids, num_experts, block_size);
  const int64_t numel = topk_ids.numel();
  const int64_t num_blocks = (max_padded + block_size - 1) / block_size;

  const auto options = topk_ids.options();
  at::Tensor sorted_token_ids = at::empty({max_padded}, options);
  at::Tensor expert_ids = at::empty({num_blocks}, options);
  at::Tensor num_tokens_post_padded = at::empty({1}, options);

  const int32_t* ids = topk_ids.data_ptr<int32_t>();
  int32_t* sorted = sorted_token_ids.data_ptr<int32_t>();
  int32_t* block_expert = expert_ids.data_ptr<int32_t>();
  const int32_t num_e = static_cast<int32_t>(num_experts);
  const int32_t block = static_cast<int32_t>(block_size);
  const int32_t sentinel = static_cast<int32_t>(numel);

  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), numel / kMinChunkElems));
  const int64_t chunk_elems = (numel + num_chunks - 1) / num_chunks;
  auto chunk_begin = [&](int64_t c) { return std::min(numel, c * chunk_elems); };

  // Pass 1: next[c * E + e] = ids of expert e in chunk c. It also checks the ids' range (the
  // Python wrapper leaves that to this pass on the CPU): the first bad index found is reported.
  std::vector<int32_t> next(static_cast<size_t>(num_chunks * num_experts), 0);
  std::atomic<int64_t> bad_index{-1};
  auto count_chunks = [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      int32_t* hist = next.data() + c * num_experts;
      const int64_t end = chunk_begin(c + 1);
      for (int64_t i = chunk_begin(c); i < end; ++i) {
        const int32_t e = ids[i];
        if (static_cast<uint32_t>(e) >= static_cast<uint32_t>(num_e)) {
          bad_index = i;
          return;
        }
        ++hist[e];
      }
    }
  };
  if (num_chunks == 1) {
    count_chunks(0, 1);
  } else {
    at::parallel_for(0, num_chunks, 1, count_chunks);
  }
  const int64_t bad = bad_index.load();
  const int64_t top_k = topk_ids.size(1);  // the message is built only on failure (then top_k > 0)
  TORCH_CHECK_VALUE(bad < 0, "moe_align_block_size: topk_ids[", bad / top_k, ", ", bad % top_k,
                    "] = ", ids[bad], " is outside [0, num_experts=", num_experts, ")");

  // Expert e owns slots [slot, slot + padded count); next[c * E + e] becomes the first slot
  // of chunk c's ids of expert e. Blocks of the expert and its padding are written here.
  int32_t slot = 0;
  for (int32_t e = 0; e < num_e; ++e) {
    const int32_t first = slot;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int32_t count = next[c * num_experts + e];
      next[c * num_experts + e] = slot;
      slot += count;
    }
    const int32_t last = first + (slot - first + block - 1) / block * block;
    std::fill(sorted + slot, sorted + last, sentinel);
    std::fill(block_expert + first / block, block_expert + last / block, e);
    slot = last;
  }
  const int32_t total = slot;
  std::fill(sorted + total, sorted + max_padded, sentinel);
  std::fill(block_expert + total / block, block_expert + num_blocks, -1);
  num_tokens_post_padded.data_ptr<int32_t>()[0] = total;

  // Pass 2: each chunk writes its ids in order.
  auto scatter_chunks = [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      int32_t* cursor = next.data() + c * num_experts;
      const int64_t end = chunk_begin(c + 1);
      for (int64_t i = chunk_begin(c); i < end; ++i) {
        sorted[cursor[ids[i]]++] = static_cast<int32_t>(i);
      }
    }
  };
  if (num_chunks == 1) {
    scatter_chunks(0, 1);
  } else {
    at::parallel_for(0, num_chunks, 1, scatter_chunks);
  }
  return {sorted_token_ids, expert_ids, num_tokens_post_padded};
}

}  // namespace moe_align
