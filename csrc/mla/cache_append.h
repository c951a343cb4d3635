// Raw-pointer launcher of the MLA paged-cache append (csrc/mla/cache_append.cu). Plain C++ and
// CUDA runtime types only, so both the .cu kernel and the torch glue can include it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moe_align {

// For t < num_tokens with slot = slot_mapping[t] >= 0, copies latent row t (latent_dim values)
// and k_rope row t (rope_dim values) into cache row [slot / block_size, slot % block_size]:
// cache[b, o, 0:latent_dim] = latent[t], cache[b, o, latent_dim:latent_dim + rope_dim] = k_rope[t].
// Values are copied bit for bit (elem_size bytes each: the cache and the inputs share a dtype).
// Strides are in elements; every row has a unit stride along its values.
cudaError_t mla_cache_write_launch(void* cache, const void* latent, const void* k_rope,
                                   const int64_t* slot_mapping, int64_t num_tokens,
                                   int64_t latent_dim, int64_t rope_dim, int64_t elem_size,
                                   int64_t cache_block_stride, int64_t cache_token_stride,
                                   int64_t block_size, int64_t latent_row_stride,
                                   int64_t rope_row_stride, cudaStream_t stream);

}  // namespace moe_align
