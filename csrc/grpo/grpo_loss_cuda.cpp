// Torch glue of the fused GRPO loss kernels: argument checks, device guard, current stream and
// output allocation. The kernels and their launchers are in grpo_loss.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "grpo/grpo_loss.cuh"
#include "ops.h"

namespace moe_align {
namespace {

void check_token_tensor(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda() && x.device() == like.device(), "fused_grpo: ", name, " must be on ",
              like.device(), ", got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fused_grpo: ", name, " must be fp32, got ",
              x.scalar_type());
  TORCH_CHECK(x.sizes() == like.sizes(), "fused_grpo: ", name, " must have shape ", like.sizes(),
              ", got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "fused_grpo: ", name, " must be contiguous");
}

const float* optional_ptr(const std::optional<at::Tensor>& x, const char* name,
                          const at::Tensor& like) {
  if (!x.has_value()) return nullptr;
  check_token_tensor(*x, name, like);
  return x->data_ptr<float>();
}

void check_common(const at::Tensor& logp, const at::Tensor& old_logp,
                  const at::Tensor& advantages, const at::Tensor& mask) {
  TORCH_CHECK(logp.is_cuda(), "fused_grpo: logp must be a CUDA tensor");
  TORCH_CHECK(logp.dim() == 2, "fused_grpo: logp must be [batch, seq_len], got ", logp.sizes());
  check_token_tensor(logp, "logp", logp);
  check_token_tensor(old_logp, "old_logp", logp);
  check_token_tensor(mask, "mask", logp);
  TORCH_CHECK(advantages.device() == logp.device() && advantages.scalar_type() == at::kFloat &&
                  advantages.dim() == 1 && advantages.size(0) == logp.size(0) &&
                  advantages.is_contiguous(),
              "fused_grpo: advantages must be a contiguous fp32 [", logp.size(0), "] tensor on ",
              logp.device());
}

}  // namespace

at::Tensor fused_grpo_fwd_cuda(const at::Tensor& logp, const at::Tensor& old_logp,
                               const std::optional<at::Tensor>& ref_logp,
                               const std::optional<at::Tensor>& sampler_logp,
                               const at::Tensor& advantages, const at::Tensor& mask,
                               const std::optional<at::Tensor>& entropy, double eps_low,
                               double eps_high, double beta, double tis_cap, bool unbiased_kl) {
  check_common(logp, old_logp, advantages, mask);
  const float* ref = optional_ptr(ref_logp, "ref_logp", logp);
  const float* sampler = optional_ptr(sampler_logp, "sampler_logp", logp);
  const float* ent = optional_ptr(entropy, "entropy", logp);
  const int64_t batch = logp.size(0);
  TORCH_CHECK(batch <= 2147483647LL, "fused_grpo: too many sequences (", batch, ")");

  const c10::cuda::CUDAGuard device_guard(logp.device());
  at::Tensor stats = at::empty({batch, kGrpoNumStats}, logp.options());
  launch_grpo_fwd(logp.data_ptr<float>(), old_logp.data_ptr<float>(), ref, sampler,
                  advantages.data_ptr<float>(), mask.data_ptr<float>(), ent, batch, logp.size(1),
                  static_cast<float>(eps_low), static_cast<float>(eps_high),
                  static_cast<float>(beta), static_cast<float>(tis_cap), unbiased_kl,
                  stats.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

at::Tensor fused_grpo_bwd_cuda(const at::Tensor& grad_loss_sum, const at::Tensor& logp,
                               const at::Tensor& old_logp,
                               const std::optional<at::Tensor>& ref_logp,
                               const std::optional<at::Tensor>& sampler_logp,
                               const at::Tensor& advantages, const at::Tensor& mask,
                               double eps_low, double eps_high, double beta, double tis_cap,
                               bool unbiased_kl) {
  check_common(logp, old_logp, advantages, mask);
  check_token_tensor(grad_loss_sum, "grad_loss_sum", advantages);
  const float* ref = optional_ptr(ref_logp, "ref_logp", logp);
  const float* sampler = optional_ptr(sampler_logp, "sampler_logp", logp);

  const c10::cuda::CUDAGuard device_guard(logp.device());
  at::Tensor grad_logp = at::empty_like(logp);
  launch_grpo_bwd(grad_loss_sum.data_ptr<float>(), logp.data_ptr<float>(),
                  old_logp.data_ptr<float>(), ref, sampler, advantages.data_ptr<float>(),
                  mask.data_ptr<float>(), logp.size(0), logp.size(1),
                  static_cast<float>(eps_low), static_cast<float>(eps_high),
                  static_cast<float>(beta), static_cast<float>(tis_cap), unbiased_kl,
                  grad_logp.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_logp;
}

}  // namespace moe_align
