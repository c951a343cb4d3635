"""Backend choice (moe_align/ops/_backend.py): MOE_ALIGN_BACKEND forces a backend where an op has
it, and the forced kernel is the one that runs.

Every "triton" test in this suite relies on the forcing: if it silently fell back to the PyTorch
path, the comparisons against the oracles would still pass while testing nothing of the kernels.
So each op's Triton launchers are counted here, forward and backward.
"""

import importlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_align.kernels.fused_moe as fused_moe_kernels
import moe_align.kernels.linear_logprobs as logprobs_kernels
import moe_align.kernels.mla_attention as attention_kernels
import moe_align.kernels.mla_decode as decode_kernels
from moe_align.ops import (fused_experts, grouped_topk, linear_logprobs, mla_cache_append, mla_decode,
                           mla_varlen_attention, moe_align_block_size)
from moe_align.ops._backend import backend_for, triton_available

CPU = torch.device("cpu")
# The Triton launchers run on CUDA tensors on a GPU machine, and on CPU tensors under the
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the module, not the function of the same name that moe_align.ops exports
align_module = importlib.import_module("moe_align.ops.moe_align_block_size")


def test_backend_for_takes_the_forced_backend_only_where_the_op_has_it(backend, monkeypatch):
    monkeypatch.delenv("MOE_ALIGN_BACKEND", raising=False)
    assert backend_for("op", CPU, ("cpp", "torch"), "cpp") == "cpp"
    backend("torch")
    assert backend_for("op", CPU, ("cpp", "torch"), "cpp") == "torch"
    backend("triton")  # an op without it keeps its default
    assert backend_for("op", CPU, ("cpp", "torch"), "cpp") == "cpp"
    backend(" Torch ")
    assert backend_for("op", CPU, ("cpp", "torch"), "cpp") == "torch"
    with pytest.raises(AssertionError, match="default backend 'cuda'"):
        backend_for("op", CPU, ("cpp", "torch"), "cuda")


def test_unknown_backend_name_is_an_error(backend):
    backend("cuda2")
    with pytest.raises(ValueError, match="MOE_ALIGN_BACKEND='cuda2' is not one of torch, triton, cuda, cpp"):
        grouped_topk(torch.randn(3, 8), 2)


@pytest.mark.parametrize("value, available", [("1", True), ("0", False), ("", False), (None, False)])
def test_triton_runs_on_the_cpu_only_under_the_interpreter(monkeypatch, value, available):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_available(CPU) is available
    assert triton_available(torch.device("cuda", 0))


def _count_calls(monkeypatch, module, names):
    calls = []
    for name in names:
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def _leaves(*tensors):
    return [t.to(DEVICE).requires_grad_() for t in tensors]


def _logprobs():
    g = torch.Generator().manual_seed(0)
    hidden, weight = _leaves(torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g))
    linear_logprobs(hidden, weight, torch.randint(0, 40, (5,), generator=g).to(DEVICE)).sum().backward()


def _experts():
    g = torch.Generator().manual_seed(1)
    x, gate_up, down = _leaves(torch.randn(4, 16, generator=g), torch.randn(3, 32, 16, generator=g) * 0.2,
                               torch.randn(3, 16, 16, generator=g) * 0.2)
    weights, ids = torch.rand(4, 2, generator=g), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    fused_experts(x, gate_up, down, weights.to(DEVICE), ids.to(DEVICE)).sum().backward()


def _attention():
    g = torch.Generator().manual_seed(2)
    total, heads = 6, 2
    q_nope, k_nope, q_rope, k_rope, v = _leaves(*(torch.randn(total, h, 16, generator=g)
                                                  for h in (heads, heads, heads, 1, heads)))
    cu_seqlens = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    out, _ = mla_varlen_attention(q_nope, q_rope, k_nope, k_rope, v, cu_seqlens, 4, 1 / math.sqrt(32))
    out.sum().backward()


def _decode():
    g = torch.Generator().manual_seed(3)
    cache = torch.zeros(2, 16, 48, device=DEVICE)
    block_table = torch.tensor([[1], [0]], dtype=torch.int32, device=DEVICE)
    latent, k_rope, q_latent, q_rope = (torch.randn(shape, generator=g).to(DEVICE)
                                        for shape in ((5, 32), (5, 16), (2, 1, 2, 32), (2, 1, 2, 16)))
    mla_cache_append(cache, latent, k_rope, torch.tensor([16, 17, 18, 0, 1], device=DEVICE))
    mla_decode(q_latent, q_rope, cache, block_table, torch.tensor([3, 2], dtype=torch.int32, device=DEVICE), 0.2)


TRITON_OPS = {
    "linear_logprobs": (_logprobs, logprobs_kernels, ("logprobs_forward", "logprobs_backward")),
    "fused_experts": (_experts, fused_moe_kernels, ("fused_experts_forward", "fused_experts_backward")),
    "mla_varlen_attention": (_attention, attention_kernels, ("mla_varlen_fwd", "mla_varlen_bwd")),
    "mla_decode": (_decode, decode_kernels, ("mla_cache_append_triton", "mla_decode_triton")),
}


@pytest.mark.parametrize("forced", ["triton", "torch"])
@pytest.mark.parametrize("op", list(TRITON_OPS))
def test_forced_triton_backend_runs_the_kernels(backend, monkeypatch, op, forced):
    run, module, launchers = TRITON_OPS[op]
    backend(forced)
    calls = _count_calls(monkeypatch, module, launchers)
    run()
    assert sorted(set(calls)) == (sorted(launchers) if forced == "triton" else [])


@pytest.mark.parametrize("forced, runs_torch_path", [("cpp", False), ("torch", True), ("triton", False)])
def test_moe_align_block_size_cpu_backends(backend, monkeypatch, forced, runs_torch_path):
    backend(forced)
    calls = _count_calls(monkeypatch, align_module, ["moe_align_block_size_torch"])
    moe_align_block_size(torch.tensor([[0, 2], [1, 2]], dtype=torch.int32), 3, 4)
    assert bool(calls) is runs_torch_path


# ---- the PyTorch path's direct call (plain_eager_cpu) steps aside whenever the op itself is needed


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_op_not_its_pytorch_path():
    """A profiler-like dispatch mode (FLOP counters, DebugMode) sees moe_align's op as one call."""
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    with _RecordOps() as recorded:
        grouped_topk(logits, 2)
    assert recorded.ops == ["moe_align.grouped_topk.default"]


def test_vmap_over_the_op_matches_a_loop():
    logits = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(5))
    weights, ids = torch.func.vmap(lambda x: grouped_topk(x, 2, n_group=2, topk_group=1))(logits)
    for i, x in enumerate(logits):
        want_weights, want_ids = grouped_topk(x, 2, n_group=2, topk_group=1)
        assert torch.equal(weights[i], want_weights) and torch.equal(ids[i], want_ids)
