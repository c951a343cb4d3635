// moe_align_block_size on CUDA: a deterministic counting sort of routed (token, k) pairs by
// expert, each expert's run padded to a multiple of block_size.
//
// Determinism: no slot is ever taken from an atomic cursor. The input is cut into tiles of
// kTile ids; in a tile, warp w owns a contiguous span and walks it in steps of 32 ids, so
// (tile, warp, step, lane) is the order of the flat index. A slot is
//   start of the expert + ids of the expert in earlier chunks (scan over chunks)
//   + in earlier tiles of this chunk + in earlier warps of this tile (scan over warps)
//   + in earlier steps of this warp + in lower lanes of this step (__match_any_sync + popc).
// Shared-memory atomics only add up counts, where order does not matter.
//
// Small inputs run in one block (one launch). Larger ones run three kernels over chunks of
// whole tiles: count per (expert, chunk); one block scans the counts and lays out experts,
// expert_ids and padding; then every chunk scatters its ids.
#include <cuda_runtime.h>

#include <cstdint>

#include "moe_kernels.cuh"

namespace moe_align {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kThreads = 256;  // threads of the kernels that walk tiles
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kItems = 8;  // ids per thread per tile
constexpr int kWarpSpan = kItems * kWarpSize;
constexpr int kTile = kThreads * kItems;
constexpr int kScanThreads = 1024;
constexpr int kMaxChunks = 512;  // bounds the (expert, chunk) scan, which one block does
constexpr int64_t kSingleBlockMaxNumel = 2 * kTile;  // up to here one launch beats three

// The one-block kernel keeps 3 + kWarps ints per expert in (non opt-in) shared memory.
static_assert((3 + kWarps) * kMoeAlignMaxExperts * 4 + 33 * 4 <= 48 * 1024, "shared memory");

// The ids of one tile as its threads hold them: in step j, lane l of warp w holds flat index
// tile + w * kWarpSpan + j * 32 + l.
struct TileIds {
  int expert[kItems];      // -1 past the end of the range
  unsigned peers[kItems];  // lanes of the same step holding the same expert
};

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarpSize; }
__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarpSize; }

__device__ __forceinline__ int64_t flat_index(int64_t tile, int step) {
  return tile + warp_id() * kWarpSpan + step * kWarpSize + lane_id();
}

__device__ __forceinline__ void load_tile(const int32_t* __restrict__ topk_ids, int64_t tile,
                                          int64_t end, TileIds& ids) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = flat_index(tile, j);
    ids.expert[j] = i < end ? topk_ids[i] : -1;
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j) ids.peers[j] = __match_any_sync(kFullMask, ids.expert[j]);
}

__device__ __forceinline__ bool leads(unsigned peers) { return lane_id() == __ffs(peers) - 1; }

// hist[e] += ids of expert e in the tile: one shared atomic per distinct expert of a warp step.
__device__ __forceinline__ void count_tile(const TileIds& ids, int* hist) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (ids.expert[j] >= 0 && leads(ids.peers[j])) {
      atomicAdd(&hist[ids.expert[j]], __popc(ids.peers[j]));
    }
  }
}

// hist[e] += ids of expert e among topk_ids[begin, end). Block-uniform control flow.
__device__ void count_range(const int32_t* __restrict__ topk_ids, int64_t begin, int64_t end,
                           int* hist) {
  for (int64_t tile = begin; tile < end; tile += kTile) {
    TileIds ids;
    load_tile(topk_ids, tile, end, ids);
    count_tile(ids, hist);
  }
}

// Writes each flat index of topk_ids[begin, end) to its slot of sorted_token_ids. next[e] is the
// first slot of expert e for this range, and is advanced past it. warp_next is kWarps *
// num_experts ints of scratch. Call after next[] is written and a __syncthreads().
__device__ void scatter_range(const int32_t* __restrict__ topk_ids, int64_t begin, int64_t end,
                              int num_experts, int* next, int* warp_next,
                              int32_t* __restrict__ sorted_token_ids) {
  const unsigned lanes_below = (1u << lane_id()) - 1u;
  int* my_next = warp_next + warp_id() * num_experts;
  for (int64_t tile = begin; tile < end; tile += kTile) {
    for (int i = threadIdx.x; i < kWarps * num_experts; i += kThreads) warp_next[i] = 0;
    TileIds ids;
    load_tile(topk_ids, tile, end, ids);
    __syncthreads();
    count_tile(ids, my_next);
    __syncthreads();
    // Per expert, warp w of this tile starts after the tile's warps below w.
    for (int e = threadIdx.x; e < num_experts; e += kThreads) {
      int slot = next[e];
      for (int w = 0; w < kWarps; ++w) {
        const int count = warp_next[w * num_experts + e];
        warp_next[w * num_experts + e] = slot;
        slot += count;
      }
      next[e] = slot;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int e = ids.expert[j];
      const unsigned peers = ids.peers[j];
      const int base = e >= 0 ? my_next[e] : 0;
      __syncwarp();
      if (e >= 0 && leads(peers)) my_next[e] = base + __popc(peers);
      __syncwarp();
      if (e >= 0) {
        sorted_token_ids[base + __popc(peers & lanes_below)] =
            static_cast<int32_t>(flat_index(tile, j));
      }
    }
    __syncthreads();  // before the next tile clears warp_next
  }
}

__device__ __forceinline__ int warp_inclusive_scan(int v) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const int below = __shfl_up_sync(kFullMask, v, offset);
    if (lane_id() >= offset) v += below;
  }
  return v;
}

__device__ __forceinline__ int padded(int count, int block_size) {
  return (count + block_size - 1) / block_size * block_size;
}

// Lays the experts out in ascending order: expert e owns slots [start[e], end[e]), its count
// padded to a multiple of block_size. Returns the total, in every thread. scratch: 33 ints.
__device__ int layout_experts(const int* count, int num_experts, int block_size, int* start,
                              int* end, int* scratch) {
  const int num_warps = blockDim.x / kWarpSize;
  const int per_thread = (num_experts + blockDim.x - 1) / blockDim.x;
  const int lo = min(num_experts, static_cast<int>(threadIdx.x) * per_thread);
  const int hi = min(num_experts, lo + per_thread);
  int local = 0;
  for (int e = lo; e < hi; ++e) local += padded(count[e], block_size);
  const int inclusive = warp_inclusive_scan(local);
  if (lane_id() == kWarpSize - 1) scratch[warp_id()] = inclusive;
  __syncthreads();
  if (warp_id() == 0) {
    const int warp_total = lane_id() < num_warps ? scratch[lane_id()] : 0;
    const int warps_inclusive = warp_inclusive_scan(warp_total);
    scratch[lane_id()] = warps_inclusive - warp_total;
    if (lane_id() == kWarpSize - 1) scratch[kWarpSize] = warps_inclusive;
  }
  __syncthreads();
  int slot = scratch[warp_id()] + inclusive - local;
  for (int e = lo; e < hi; ++e) {
    start[e] = slot;
    slot += padded(count[e], block_size);
    end[e] = slot;
  }
  const int total = scratch[kWarpSize];
  __syncthreads();
  return total;
}

// Everything but the token slots: expert_ids, the sentinel padding, num_tokens_post_padded.
__device__ void write_layout(const int* count, const int* start, const int* end, int num_experts,
                             int block_size, int total, int32_t numel, int64_t max_padded,
                             int64_t num_blocks, int32_t* __restrict__ sorted_token_ids,
                             int32_t* __restrict__ expert_ids, int32_t* num_tokens_post_padded) {
  if (threadIdx.x == 0) *num_tokens_post_padded = total;
  const int num_warps = blockDim.x / kWarpSize;
  for (int e = warp_id(); e < num_experts; e += num_warps) {
    for (int64_t b = start[e] / block_size + lane_id(); b < end[e] / block_size; b += kWarpSize) {
      expert_ids[b] = e;
    }
    for (int64_t s = start[e] + count[e] + lane_id(); s < end[e]; s += kWarpSize) {
      sorted_token_ids[s] = numel;
    }
  }
  for (int64_t b = total / block_size + threadIdx.x; b < num_blocks; b += blockDim.x) {
    expert_ids[b] = -1;
  }
  for (int64_t s = total + threadIdx.x; s < max_padded; s += blockDim.x) {
    sorted_token_ids[s] = numel;
  }
}

// Small inputs: the whole op in one block.
__global__ void __launch_bounds__(kThreads)
    align_single_block_kernel(const int32_t* __restrict__ topk_ids, int32_t numel, int num_experts,
                              int block_size, int64_t max_padded, int64_t num_blocks,
                              int32_t* __restrict__ sorted_token_ids,
                              int32_t* __restrict__ expert_ids,
                              int32_t* num_tokens_post_padded) {
  extern __shared__ int smem[];
  int* count = smem;
  int* start = count + num_experts;
  int* end = start + num_experts;
  int* warp_next = end + num_experts;
  __shared__ int scratch[kWarpSize + 1];

  for (int e = threadIdx.x; e < num_experts; e += kThreads) count[e] = 0;
  __syncthreads();
  count_range(topk_ids, 0, numel, count);
  __syncthreads();
  const int total = layout_experts(count, num_experts, block_size, start, end, scratch);
  write_layout(count, start, end, num_experts, block_size, total, numel, max_padded, num_blocks,
               sorted_token_ids, expert_ids, num_tokens_post_padded);
  __syncthreads();  // write_layout reads start[], which scatter_range advances
  scatter_range(topk_ids, 0, numel, num_experts, start, warp_next, sorted_token_ids);
}

// Large inputs, step 1: chunk_counts[e * num_chunks + c] = ids of expert e in chunk c.
__global__ void __launch_bounds__(kThreads)
    count_chunks_kernel(const int32_t* __restrict__ topk_ids, int64_t numel, int num_experts,
                        int64_t chunk_elems, int num_chunks, int32_t* __restrict__ chunk_counts) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < num_experts; e += kThreads) hist[e] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * chunk_elems;
  count_range(topk_ids, begin, min64(numel, begin + chunk_elems), hist);
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += kThreads) {
    chunk_counts[static_cast<int64_t>(e) * num_chunks + blockIdx.x] = hist[e];
  }
}

// Step 2, one block: chunk_counts becomes, per expert, the exclusive scan over chunks; the expert
// layout goes to expert_start, expert_ids, the padding and num_tokens_post_padded.
__global__ void __launch_bounds__(kScanThreads)
    scan_chunks_kernel(int32_t* __restrict__ chunk_counts, int32_t* __restrict__ expert_start,
                       int num_experts, int num_chunks, int block_size, int32_t numel,
                       int64_t max_padded, int64_t num_blocks,
                       int32_t* __restrict__ sorted_token_ids,
                       int32_t* __restrict__ expert_ids, int32_t* num_tokens_post_padded) {
  __shared__ int count[kMoeAlignMaxExperts];
  __shared__ int start[kMoeAlignMaxExperts];
  __shared__ int end[kMoeAlignMaxExperts];
  __shared__ int scratch[kWarpSize + 1];

  for (int e = warp_id(); e < num_experts; e += kScanThreads / kWarpSize) {
    int32_t* row = chunk_counts + static_cast<int64_t>(e) * num_chunks;
    int carry = 0;
    for (int c0 = 0; c0 < num_chunks; c0 += kWarpSize) {
      const int c = c0 + lane_id();
      const int v = c < num_chunks ? row[c] : 0;
      const int inclusive = warp_inclusive_scan(v);
      if (c < num_chunks) row[c] = carry + inclusive - v;
      carry += __shfl_sync(kFullMask, inclusive, kWarpSize - 1);
    }
    if (lane_id() == 0) count[e] = carry;
  }
  __syncthreads();
  const int total = layout_experts(count, num_experts, block_size, start, end, scratch);
  for (int e = threadIdx.x; e < num_experts; e += kScanThreads) expert_start[e] = start[e];
  write_layout(count, start, end, num_experts, block_size, total, numel, max_padded, num_blocks,
               sorted_token_ids, expert_ids, num_tokens_post_padded);
}

// Step 3: every chunk writes its ids to their slots.
__global__ void __launch_bounds__(kThreads)
    scatter_chunks_kernel(const int32_t* __restrict__ topk_ids, int64_t numel, int num_experts,
                          int64_t chunk_elems, int num_chunks,
                          const int32_t* __restrict__ chunk_offsets,
                          const int32_t* __restrict__ expert_start,
                          int32_t* __restrict__ sorted_token_ids) {
  extern __shared__ int smem[];
  int* next = smem;
  int* warp_next = smem + num_experts;
  for (int e = threadIdx.x; e < num_experts; e += kThreads) {
    next[e] = expert_start[e] + chunk_offsets[static_cast<int64_t>(e) * num_chunks + blockIdx.x];
  }
  __syncthreads();
  const int64_t begin = blockIdx.x * chunk_elems;
  scatter_range(topk_ids, begin, min64(numel, begin + chunk_elems), num_experts, next,
                warp_next, sorted_token_ids);
}

struct ChunkPlan {
  int64_t chunk_elems;  // a multiple of kTile
  int num_chunks;
};

ChunkPlan plan_chunks(int64_t numel) {
  const int64_t tiles = (numel + kTile - 1) / kTile;
  const int64_t tiles_per_chunk = (tiles + kMaxChunks - 1) / kMaxChunks;
  const int64_t chunk_elems = tiles_per_chunk * kTile;
  return {chunk_elems, static_cast<int>((numel + chunk_elems - 1) / chunk_elems)};
}

}  // namespace

int64_t moe_align_block_size_workspace_size(int64_t numel, int num_experts) {
  if (numel <= kSingleBlockMaxNumel) return 0;
  return static_cast<int64_t>(num_experts) * (plan_chunks(numel).num_chunks + 1);
}

void launch_moe_align_block_size(const int32_t* topk_ids, int64_t numel, int num_experts,
                                 int block_size, int32_t* sorted_token_ids, int32_t* expert_ids,
                                 int32_t* num_tokens_post_padded, int32_t* workspace,
                                 cudaStream_t stream) {
  if (numel == 0) {  // no slots, no blocks
    cudaMemsetAsync(num_tokens_post_padded, 0, sizeof(int32_t), stream);
    return;
  }
  const int64_t max_padded = numel + min64(num_experts, numel) * (block_size - 1);
  const int64_t num_blocks = (max_padded + block_size - 1) / block_size;
  const int32_t sentinel = static_cast<int32_t>(numel);

  if (numel <= kSingleBlockMaxNumel) {
    const size_t smem = static_cast<size_t>(3 + kWarps) * num_experts * sizeof(int);
    align_single_block_kernel<<<1, kThreads, smem, stream>>>(
        topk_ids, sentinel, num_experts, block_size, max_padded, num_blocks, sorted_token_ids,
        expert_ids, num_tokens_post_padded);
    return;
  }

  const ChunkPlan plan = plan_chunks(numel);
  int32_t* chunk_counts = workspace;  // [num_experts, num_chunks]
  int32_t* expert_start = workspace + static_cast<int64_t>(num_experts) * plan.num_chunks;
  count_chunks_kernel<<<plan.num_chunks, kThreads, num_experts * sizeof(int), stream>>>(
      topk_ids, numel, num_experts, plan.chunk_elems, plan.num_chunks, chunk_counts);
  scan_chunks_kernel<<<1, kScanThreads, 0, stream>>>(
      chunk_counts, expert_start, num_experts, plan.num_chunks, block_size, sentinel, max_padded,
      num_blocks, sorted_token_ids, expert_ids, num_tokens_post_padded);
  const size_t scatter_smem = static_cast<size_t>(1 + kWarps) * num_experts * sizeof(int);
  scatter_chunks_kernel<<<plan.num_chunks, kThreads, scatter_smem, stream>>>(
      topk_ids, numel, num_experts, plan.chunk_elems, plan.num_chunks, chunk_counts, expert_start,
      sorted_token_ids);
}

}  // namespace moe_align
