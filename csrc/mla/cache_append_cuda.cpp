// Torch glue of the MLA paged-cache append CUDA kernel (csrc/mla/cache_append.cu).
// moe_align/ops/mla.py validates values (slot range); this checks what the kernel relies on.
#include <ATen/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mla/cache_append.h"
#include "ops.h"

namespace moe_align {

void mla_cache_write_cuda(at::Tensor& kv_cache, const at::Tensor& latent, const at::Tensor& k_rope,
                          const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.is_cuda() && latent.is_cuda() && k_rope.is_cuda() && slot_mapping.is_cuda(),
              "mla_cache_write: all tensors must be CUDA tensors");
  TORCH_CHECK(latent.device() == kv_cache.device() && k_rope.device() == kv_cache.device() &&
                  slot_mapping.device() == kv_cache.device(),
              "mla_cache_write: all tensors must be on one device");
  TORCH_CHECK(kv_cache.dim() == 3 && kv_cache.stride(2) == 1,
              "mla_cache_write: kv_cache must be [num_blocks, block_size, D] with a unit last stride");
  TORCH_CHECK(latent.dim() == 2 && latent.stride(1) == 1 && k_rope.dim() == 2 && k_rope.stride(1) == 1,
              "mla_cache_write: latent and k_rope must be [N, D] with a unit last stride");
  TORCH_CHECK(latent.scalar_type() == kv_cache.scalar_type() && k_rope.scalar_type() == kv_cache.scalar_type(),
              "mla_cache_write: latent, k_rope and kv_cache must share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "mla_cache_write: slot_mapping must be a contiguous int64 [N]");
  const int64_t num_tokens = latent.size(0);
  TORCH_CHECK(k_rope.size(0) == num_tokens && slot_mapping.size(0) == num_tokens,
              "mla_cache_write: latent, k_rope and slot_mapping must have one row per token");
  TORCH_CHECK(latent.size(1) + k_rope.size(1) == kv_cache.size(2),
              "mla_cache_write: kv_cache rows must hold latent and k_rope");
  if (num_tokens == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(kv_cache.device());
  const cudaError_t err = mla_cache_write_launch(
      kv_cache.data_ptr(), latent.data_ptr(), k_rope.data_ptr(), slot_mapping.data_ptr<int64_t>(),
      num_tokens, latent.size(1), k_rope.size(1), kv_cache.element_size(), kv_cache.stride(0),
      kv_cache.stride(1), kv_cache.size(1), latent.stride(0), k_rope.stride(0),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "mla_cache_write: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace moe_align
