import math

import pytest
import torch

from conftest import requires_cuda
from moe_align.ops.logprobs import linear_logprobs
from oracle_grpo import logprobs_oracle

BACKENDS = ["torch", "triton"]
# Values are accumulated and reduced in float32 whatever the input dtype (16-bit products are exact
# in float32); gradients come out in the input dtype.
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# "Within float32 rounding": a few ulps of values of magnitude 1-20.
ROUNDING_TOL = dict(rtol=1e-6, atol=1e-6)


def make_inputs(num_tokens, hidden_size, vocab, dtype=torch.float32, seed=0, logit_std=3.0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * (logit_std / math.sqrt(hidden_size))
    targets = torch.randint(0, vocab, (num_tokens,), generator=g)
    for i in ignore:
        targets[i] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def check_against_oracle(hidden, weight, targets, *, temperature=1.0, ignore_index=-100,
                         entropy=True, chunk_size=None, fp32_head=False, seed=1):
    """Values and gradients (through logp and entropy) against the float64 oracle."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = linear_logprobs(h, w, targets, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=entropy, chunk_size=chunk_size, fp32_head=fp32_head)
    logp, ent = out if entropy else (out, None)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    want_logp, want_ent = logprobs_oracle(h64, w64, targets, temperature, ignore_index)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    torch.testing.assert_close(logp.double(), want_logp.detach(), **VALUE_TOL)
    g = torch.Generator().manual_seed(seed)
    g_logp = torch.randn(targets.shape, generator=g, dtype=torch.float64).to(targets.device)
    g_ent = torch.randn(targets.shape, generator=g, dtype=torch.float64).to(targets.device)
    loss = (logp.double() * g_logp).sum()
    want = (want_logp * g_logp).sum()
    if entropy:
        torch.testing.assert_close(ent.double(), want_ent.detach(), **VALUE_TOL)
        loss = loss + (ent.double() * g_ent).sum()
        want = want + (want_ent * g_ent).sum()
    loss.backward()
    want.backward()
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    tol = GRAD_TOL[hidden.dtype]
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    ignored = targets == ignore_index
    assert torch.all(logp[ignored] == 0) and torch.all(h.grad[ignored] == 0)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "num_tokens,hidden_size,vocab,kwargs",
    [
        (37, 48, 1000, dict()),  # nothing a multiple of any block
        (37, 48, 1000, dict(temperature=0.7, chunk_size=5)),  # several backward chunks
        (19, 40, 300, dict(entropy=False, ignore=(0, 3, 18))),
        (1, 16, 77, dict()),
    ],
)
def test_matches_oracle_fp32(backend, backend_name, num_tokens, hidden_size, vocab, kwargs):
    backend(backend_name)
    kwargs = dict(kwargs)
    hidden, weight, targets = make_inputs(num_tokens, hidden_size, vocab, ignore=kwargs.pop("ignore", ()))
    check_against_oracle(hidden, weight, targets, **kwargs)


@pytest.mark.parametrize("backend_name,fp32_head", [("torch", False), ("triton", False), ("triton", True)])
def test_matches_oracle_fp16(backend, backend_name, fp32_head):
    # fp16 under the interpreter (its bf16 dot is wrong); bf16 is tested on the GPU. fp32_head
    # takes the kernels' float32 path (dz in float32, 16-bit operands upcast in the dots).
    backend(backend_name)
    hidden, weight, targets = make_inputs(29, 32, 500, torch.float16, seed=4, ignore=(7,))
    check_against_oracle(hidden, weight, targets, temperature=1.3, fp32_head=fp32_head, chunk_size=9)


def test_matches_oracle_bf16_torch_path(backend):
    backend("torch")
    hidden, weight, targets = make_inputs(21, 32, 400, torch.bfloat16, seed=5)
    check_against_oracle(hidden, weight, targets)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_deepseek_v3_vocabulary_at_tiny_hidden(backend, backend_name):
    backend(backend_name)
    hidden, weight, targets = make_inputs(5, 16, 129280, seed=6, ignore=(2,))
    targets[0], targets[1] = 129279, 0  # the last and first ids
    check_against_oracle(hidden, weight, targets, chunk_size=2)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_huge_logits_stay_finite(backend, backend_name):
    backend(backend_name)
    hidden, weight, targets = make_inputs(9, 32, 300, seed=7, logit_std=4000.0)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = linear_logprobs(h, w, targets, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    for x in (logp, ent, h.grad, w.grad):
        assert torch.isfinite(x).all()
    want_logp, want_ent = logprobs_oracle(hidden.double(), weight.double(), targets)
    assert want_logp.abs().max() > 1e3  # logits of magnitude 1e4
    # float32 logits of magnitude 1e4 carry absolute rounding ~1e4 * 2**-24 * sqrt(H) per logit.
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_token_independent_of_batch_and_chunks(backend, backend_name):
    backend(backend_name)
    hidden, weight, targets = make_inputs(48, 32, 700, seed=8)
    full_logp, full_ent = linear_logprobs(hidden, weight, targets, return_entropy=True)
    for chunk_size in (1, 7, 48):
        logp, ent = linear_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=chunk_size)
        torch.testing.assert_close(logp, full_logp, **ROUNDING_TOL)
        torch.testing.assert_close(ent, full_ent, **ROUNDING_TOL)
    for i in (0, 17, 47):
        alone_logp, alone_ent = linear_logprobs(hidden[i:i + 1], weight, targets[i:i + 1], return_entropy=True)
        torch.testing.assert_close(alone_logp[0], full_logp[i], **ROUNDING_TOL)
        torch.testing.assert_close(alone_ent[0], full_ent[i], **ROUNDING_TOL)
    # The same token among other tokens, some of them ignored.
    mixed = targets.clone()
    mixed[::2] = -100
    logp = linear_logprobs(hidden, weight, mixed)
    torch.testing.assert_close(logp[1::2], full_logp[1::2], **ROUNDING_TOL)


def test_torch_path_is_bitwise_batch_invariant(backend):
    # The PyTorch path reduces each token over its whole row and pads chunks to 16 rows (the
    # CPU GEMM changes code path below that): results are bitwise identical.
    backend("torch")
    hidden, weight, targets = make_inputs(40, 32, 700, seed=9)
    full = linear_logprobs(hidden, weight, targets)
    assert torch.equal(linear_logprobs(hidden[5:6], weight, targets[5:6])[0], full[5])
    assert torch.equal(linear_logprobs(hidden, weight, targets, chunk_size=3), full)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_all_ignored_and_custom_ignore_index(backend, backend_name):
    backend(backend_name)
    hidden, weight, targets = make_inputs(6, 16, 50, seed=10)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp = linear_logprobs(h, w, torch.full_like(targets, -100))
    logp.sum().backward()
    assert torch.equal(logp, torch.zeros(6)) and torch.equal(h.grad, torch.zeros_like(h))
    assert torch.equal(w.grad, torch.zeros_like(w))
    # ignore_index may be any int, also one inside the vocabulary.
    targets[2] = 7
    check_against_oracle(hidden, weight, targets, ignore_index=7)


def test_leading_dims_non_contiguous_and_inputs_untouched(backend):
    backend("torch")
    hidden, weight, targets = make_inputs(24, 16, 90, seed=11)
    hidden3 = hidden.view(4, 6, 16).transpose(0, 1)  # [6, 4, 16], not contiguous
    targets2 = targets.view(4, 6).T
    before = (hidden3.clone(), weight.clone(), targets2.clone())
    logp = linear_logprobs(hidden3, weight, targets2)
    assert logp.shape == (6, 4)
    want, _ = logprobs_oracle(hidden3.reshape(-1, 16).double(), weight.double(), targets2.reshape(-1))
    torch.testing.assert_close(logp.reshape(-1).double(), want, **VALUE_TOL)
    assert all(torch.equal(a, b) for a, b in zip(before, (hidden3, weight, targets2)))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_frozen_weight_gets_no_gradient(backend, backend_name):
    backend(backend_name)
    hidden, weight, targets = make_inputs(10, 16, 120, seed=12)
    h = hidden.clone().requires_grad_()
    linear_logprobs(h, weight, targets).sum().backward()
    h64 = hidden.double().requires_grad_()
    logprobs_oracle(h64, weight.double(), targets)[0].sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, **GRAD_TOL[torch.float32])
    assert weight.grad is None


def test_triton_tile_sizes_change_only_rounding():
    from moe_align.kernels.linear_logprobs import LogprobsConfig, logprobs_backward, logprobs_forward

    # the kernels themselves: on the GPU, or on the CPU through the interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets = (t.to(device) for t in make_inputs(20, 48, 600, seed=13))
    small = LogprobsConfig(16, 64, 16, 128, mm_dw=(64, 16, 16), mm_dh=(16, 16, 64))
    large = LogprobsConfig(32, 256, 64, 512, mm_dw=(256, 64, 32), mm_dh=(32, 64, 256))
    results = []
    for cfg in (small, large):
        logp, ent, lse = logprobs_forward(hidden, weight, targets, None, 1.0, True, False, cfg)
        ones = torch.ones(20, device=device)
        grads = logprobs_backward(ones, ones, hidden, weight, targets, None, lse, ent,
                                  1.0, False, budget_elems=20 * 300, config=cfg)
        results.append((logp, ent, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck(backend):
    backend("torch")
    hidden, weight, targets = make_inputs(7, 16, 60, seed=14, ignore=(1,))
    for entropy in (False, True):
        args = (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets, 0.9, -100,
                entropy, False, 3)
        torch.library.opcheck(torch.ops.moe_align.linear_logprobs.default, args)
    logp, ent, lse = torch.ops.moe_align.linear_logprobs(hidden, weight, targets, 0.9, -100, True, False, 3)
    bwd_args = (torch.randn(7), torch.randn(7), hidden, weight, targets, lse, ent, 0.9, -100, False, 3, True, True)
    torch.library.opcheck(torch.ops.moe_align.linear_logprobs_backward.default, bwd_args)


def test_opcheck_triton(backend):
    backend("triton")
    hidden, weight, targets = make_inputs(5, 16, 40, seed=15, ignore=(2,))
    args = (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets, 1.0, -100, True, False, 4)
    torch.library.opcheck(torch.ops.moe_align.linear_logprobs.default, args)


def test_compiles_fullgraph(backend):
    backend("torch")
    hidden, weight, targets = make_inputs(12, 16, 80, seed=16, ignore=(3,))

    def nll_and_entropy(h, w):
        logp, ent = linear_logprobs(h, w, targets, temperature=0.8, return_entropy=True)
        return -logp.sum() + 0.1 * ent.sum()

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1 = nll_and_entropy(h1, w1)
    loss2 = torch.compile(nll_and_entropy, fullgraph=True)(h2, w2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda h, w, t: linear_logprobs(h, w, t[:-1]), ValueError, "targets must have shape"),
        (lambda h, w, t: linear_logprobs(h[:, :-1], w, t), ValueError, "weight must be"),
        (lambda h, w, t: linear_logprobs(h, w[0], t), ValueError, "weight must be"),
        (lambda h, w, t: linear_logprobs(h, w.double(), t), TypeError, "weight dtype"),
        (lambda h, w, t: linear_logprobs(h.long(), w, t), TypeError, "hidden must be"),
        (lambda h, w, t: linear_logprobs(h, w, t.float()), TypeError, "targets must be an int"),
        (lambda h, w, t: linear_logprobs(h, w, t.clone().fill_(50)), ValueError, r"targets must be in \[0, 50\)"),
        (lambda h, w, t: linear_logprobs(h, w, t.clone().fill_(-1)), ValueError, "targets must be in"),
        (lambda h, w, t: linear_logprobs(h, w, t, temperature=0.0), ValueError, "temperature"),
        (lambda h, w, t: linear_logprobs(h, w, t, chunk_size=0), ValueError, "chunk_size"),
        (lambda h, w, t: linear_logprobs(h, w, t, ignore_index=1.5), TypeError, "ignore_index"),
    ],
)
def test_bad_input(call, error, match):
    hidden, weight, targets = make_inputs(4, 8, 50)
    with pytest.raises(error, match=match):
        call(hidden, weight, targets)


# ---- GPU ----------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1000, 32000, 129280])
def test_cuda_triton_matches_oracle(backend, dtype, vocab):
    backend("triton")
    hidden, weight, targets = make_inputs(333, 256, vocab, dtype, seed=20, ignore=(0, 100, 332))
    check_against_oracle(hidden.cuda(), weight.cuda(), targets.cuda(), temperature=0.9, chunk_size=64)


@requires_cuda
def test_cuda_fp32_head_with_bf16_inputs(backend):
    backend("triton")
    hidden, weight, targets = make_inputs(130, 128, 5000, torch.bfloat16, seed=21)
    check_against_oracle(hidden.cuda(), weight.cuda(), targets.cuda(), fp32_head=True)


@requires_cuda
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_cuda_batch_invariant_and_deterministic(backend, backend_name):
    backend(backend_name)
    hidden, weight, targets = make_inputs(1000, 512, 32000, torch.bfloat16, seed=22)
    hidden, weight, targets = hidden.cuda(), weight.cuda(), targets.cuda()
    full = linear_logprobs(hidden, weight, targets)
    for i in (0, 129, 999):
        torch.testing.assert_close(linear_logprobs(hidden[i:i + 1], weight, targets[i:i + 1])[0], full[i],
                                   **ROUNDING_TOL)
    grads = []
    for _ in range(2):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        linear_logprobs(h, w, targets).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@requires_cuda
def test_cuda_memory_stays_below_the_logits(backend):
    backend("triton")
    n, h, v = 2048, 1024, 129280
    hidden, weight, targets = make_inputs(n, h, v, torch.bfloat16, seed=23)
    hidden = hidden.cuda().requires_grad_()
    weight = weight.cuda().requires_grad_()
    targets = targets.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_logprobs(hidden, weight, targets, chunk_size=128).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = hidden.numel() * 2 + weight.numel() * 2
    logits_fp32 = n * v * 4
    assert extra - grads < 0.1 * logits_fp32
