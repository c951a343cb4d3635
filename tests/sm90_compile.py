"""Compile every Triton kernel of moe_align for sm_90 (H100) on a machine without a GPU.

Run as a script, in a process without ``TRITON_INTERPRET``: ``python tests/sm90_compile.py bf16``
(or ``fp32``). The public ops run on CPU tensors with the Triton backend forced, the kernel
modules choose their GPU tiles, and every launch compiles instead of running: Triton's driver is
replaced by one that only names the target (cuda, sm_90, 32-wide warps), and an autotuned kernel
compiles each of its configs. Outputs are never written, so the values are garbage; only the
launches matter.

Checks what the interpreter does not: that the code compiles (typing, tl.dot shapes and dtypes),
that every launch sets enable_fp_fusion (Triton 3.10 turns its default off), and that a kernel's
shared memory fits sm_90's 227 KiB per block (an autotuned launch needs one config that does:
the autotuner skips configs that fail to load). In bf16, the dtype that runs fast, no kernel may
spill registers (cuobjdump's STACK), or, for an autotuned launch, at least one config must not:
spills do not stop a config from running, so the autotuner would time it.
float32 (exact products without tensor cores, a correctness reference) reports its spills.
Prints one line per compiled kernel and config.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import types

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
os.environ["MOE_ALIGN_BACKEND"] = "triton"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import moe_align.ops._backend as backend  # noqa: E402
from moe_align.kernels import linear_logprobs as logprobs_kernels  # noqa: E402
from moe_align.kernels import mla_attention as attention_kernels  # noqa: E402
from moe_align.kernels import mla_decode as decode_kernels  # noqa: E402

SM90_SHARED_BYTES = 227 * 1024
H100_SMS = 132
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class CompileOnlyDriver:
    """Names the target; anything that would touch a device fails loudly."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def __getattr__(self, name: str):
        raise AttributeError(f"compile-only driver: no {name!r} without a GPU")


# (kernel name, autotuned, config) -> (shared bytes, registers, spill bytes)
compiled: dict[tuple[str, bool, str], tuple[int, int, int]] = {}
failures: list[str] = []
launch_groups: list[list[tuple[str, bool, str]]] = []  # the configs of one autotuned launch


def resource_usage(kernel) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of a compiled kernel, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


_jit_run = JITFunction.run
_autotuned: list[str] = []  # config descriptions while an autotuner compiles its configs


def compile_only_run(self, *args, grid, warmup, **kwargs):
    if kwargs.get("enable_fp_fusion") is not True:  # Triton 3.10 changes the default to off
        failures.append(f"{self.__name__}: launched without enable_fp_fusion=ENABLE_FP_FUSION")
    kernel = _jit_run(self, *args, grid=grid, warmup=True, **kwargs)
    constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
    desc = " ".join(f"{k}={v}" for k, v in sorted(constexprs.items()) if k.startswith(("BLOCK", "GROUP")))
    desc += f" warps={kernel.metadata.num_warps} stages={kernel.metadata.num_stages}"
    key = (self.__name__, bool(_autotuned), desc)
    if key not in compiled:
        regs, stack = resource_usage(kernel)
        compiled[key] = (kernel.metadata.shared, regs, stack)
    if _autotuned:
        _autotuned.append(key)
    return kernel


def autotune_compile_all(self, *args, **kwargs):
    """Compile every config the autotuner would time (the GPU run picks among those that load)."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    _autotuned[:] = [None]
    try:
        for config in configs:
            kernel = self.fn.run(*args, **kwargs, **config.all_kwargs())
    finally:
        launch_groups.append([k for k in _autotuned[1:]])
        _autotuned.clear()
        self.nargs = None
    return kernel


def force_gpu_paths() -> None:
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", 90, 32)))
    JITFunction.run = compile_only_run
    Autotuner.run = autotune_compile_all
    backend.triton_interpreted = lambda: True  # the ops offer Triton for CPU tensors
    cuda = torch.device("cuda")
    for module in (logprobs_kernels, attention_kernels, decode_kernels):  # the GPU tiles for CPU tensors
        original = module.default_config
        module.default_config = lambda device, *a, _original=original, **k: _original(cuda, *a, **k)
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=H100_SMS)


def run_ops(dtype: torch.dtype) -> None:
    """Every Triton launch of the ops at DeepSeek's dimensions (few tokens: values do not matter)."""
    from moe_align.ops import (fused_experts, linear_logprobs, mla_cache_append, mla_decode, mla_decode_plan,
                               mla_varlen_attention)

    def param(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    # DeepseekMoE, V2-Lite's expert dims (H=2048, I=1408), 8 experts, top-6; layout blocks of 16, 32, 64
    for tokens in (4, 40, 512) if dtype == torch.bfloat16 else (512,):
        x, gate_up, down = param(tokens, 2048), param(8, 2 * 1408, 2048), param(8, 2048, 1408)
        weights = torch.rand(tokens, 6, requires_grad=True)
        ids = torch.stack([torch.randperm(8)[:6] for _ in range(tokens)]).int()
        fused_experts(x, gate_up, down, weights, ids).sum().backward()

    # the fused LM head: H=1024, V=32000, with entropy and the fp32 head
    hidden, head = param(64, 1024), param(32000, 1024)
    targets = torch.randint(0, 32000, (64,))
    for entropy, fp32_head in ((False, False), (True, False), (False, True)):
        out = linear_logprobs(hidden, head, targets, return_entropy=entropy, fp32_head=fp32_head)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()

    # MLA training attention: 192 / 128 head dims, rope key shared by the heads
    cu_seqlens = torch.tensor([0, 100, 300], dtype=torch.int32)
    q_nope, q_rope, k_nope = param(300, 16, 128), param(300, 16, 64), param(300, 16, 128)
    k_rope, v = param(300, 1, 64), param(300, 16, 128)
    out, lse = mla_varlen_attention(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, 200, 0.1)
    (out.sum() + lse.sum()).backward()

    # decode over the paged latent cache: 16 and 128 heads, s_q 1 and 2; cache append
    cache = torch.randn(8, 64, 576, dtype=dtype)
    block_table = torch.arange(8, dtype=torch.int32).view(2, 4)
    seqlens = torch.tensor([200, 77], dtype=torch.int32)
    for heads in (16, 128):
        for s_q in (1, 2):
            q_latent, q_rope = torch.randn(2, s_q, heads, 512, dtype=dtype), torch.randn(2, s_q, heads, 64, dtype=dtype)
            plan = mla_decode_plan(seqlens, heads, s_q)
            mla_decode(q_latent, q_rope, cache, block_table, seqlens, 0.1, plan=plan)
    mla_cache_append(cache, torch.randn(5, 512, dtype=dtype), torch.randn(5, 64, dtype=dtype),
                     torch.tensor([0, 1, 70, 130, 300]))


def check(spills_fail: bool) -> None:
    def loads(key):
        return compiled[key][0] <= SM90_SHARED_BYTES

    def fits(key):
        return loads(key) and (compiled[key][2] == 0 or not spills_fail)

    for key, (shared, regs, stack) in sorted(compiled.items()):
        name, autotuned, desc = key
        if not loads(key):
            verdict = "over shared memory: the autotuner skips it" if autotuned else "FAIL: over shared memory"
        elif stack:
            verdict = "spills" + (" (FAIL)" if spills_fail and not autotuned else "")
        else:
            verdict = "ok"
        print(f"{name:28s} {desc:62s} shared {shared / 1024:6.1f} KiB  regs {regs:3d}  spill {stack:4d}  {verdict}")
        if not autotuned and not fits(key):
            failures.append(f"{name} {desc}: shared {shared} bytes, {stack} bytes of spills")
    for group in launch_groups:
        if group and not any(fits(key) for key in group):
            failures.append(f"{group[0][0]}: none of its autotune configs fits ({', '.join(k[2] for k in group)})")
    kernels = len({key[0] for key in compiled})
    print(f"{len(compiled)} compilations of {kernels} kernels for sm_90 (Triton {triton.__version__})")


if __name__ == "__main__":
    force_gpu_paths()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
    run_ops(dtype)
    check(spills_fail=dtype == torch.bfloat16)
    if failures:
        sys.exit("\n".join(["sm_90 compile check failed:", *failures]))
