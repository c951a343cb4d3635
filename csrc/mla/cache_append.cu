// MLA paged-cache append: one thread block per new token copies its latent and roped key into
// the token's cache slot, in the widest vector (16, 8, 4 or 2 bytes) that every address allows.
#include "mla/cache_append.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace moe_align {
namespace {

constexpr int kThreads = 64;

// Byte sizes and strides of one append.
struct AppendParams {
  char* cache;
  const char* latent;
  const char* k_rope;
  const int64_t* slot_mapping;
  int64_t cache_block_bytes;
  int64_t cache_token_bytes;
  int64_t block_size;
  int64_t latent_row_bytes;
  int64_t rope_row_bytes;
  int64_t latent_bytes;
  int64_t rope_bytes;
};

template <typename Vec>
__global__ void mla_cache_write_kernel(const AppendParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0) return;  // padding token
  char* row = p.cache + (slot / p.block_size) * p.cache_block_bytes +
              (slot % p.block_size) * p.cache_token_bytes;
  const Vec* src_latent = reinterpret_cast<const Vec*>(p.latent + token * p.latent_row_bytes);
  const Vec* src_rope = reinterpret_cast<const Vec*>(p.k_rope + token * p.rope_row_bytes);
  Vec* dst_latent = reinterpret_cast<Vec*>(row);
  Vec* dst_rope = reinterpret_cast<Vec*>(row + p.latent_bytes);
  const int latent_vecs = static_cast<int>(p.latent_bytes / sizeof(Vec));
  const int rope_vecs = static_cast<int>(p.rope_bytes / sizeof(Vec));
  for (int i = threadIdx.x; i < latent_vecs; i += blockDim.x) dst_latent[i] = src_latent[i];
  for (int i = threadIdx.x; i < rope_vecs; i += blockDim.x) dst_rope[i] = src_rope[i];
}

// Largest power of two <= 16 dividing x.
int64_t alignment_of(int64_t x) {
  int64_t a = 16;
  while (a > 1 && x % a != 0) a /= 2;
  return a;
}

int64_t address_of(const void* ptr) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr)); }

}  // namespace

cudaError_t mla_cache_write_launch(void* cache, const void* latent, const void* k_rope,
                                   const int64_t* slot_mapping, int64_t num_tokens,
                                   int64_t latent_dim, int64_t rope_dim, int64_t elem_size,
                                   int64_t cache_block_stride, int64_t cache_token_stride,
                                   int64_t block_size, int64_t latent_row_stride,
                                   int64_t rope_row_stride, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const AppendParams p{static_cast<char*>(cache),
                       static_cast<const char*>(latent),
                       static_cast<const char*>(k_rope),
                       slot_mapping,
                       cache_block_stride * elem_size,
                       cache_token_stride * elem_size,
                       block_size,
                       latent_row_stride * elem_size,
                       rope_row_stride * elem_size,
                       latent_dim * elem_size,
                       rope_dim * elem_size};
  // Every address the kernel forms is a sum of these, so their common alignment bounds the vector.
  int64_t align = 16;
  for (int64_t x : {p.cache_block_bytes, p.cache_token_bytes, p.latent_row_bytes, p.rope_row_bytes,
                    p.latent_bytes, p.rope_bytes, address_of(cache), address_of(latent),
                    address_of(k_rope)}) {
    const int64_t a = alignment_of(x);
    if (a < align) align = a;
  }
  const dim3 grid(static_cast<unsigned int>(num_tokens));
  switch (align) {
    case 16: mla_cache_write_kernel<uint4><<<grid, kThreads, 0, stream>>>(p); break;
    case 8: mla_cache_write_kernel<uint2><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: mla_cache_write_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(p); break;
    default: mla_cache_write_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace moe_align
