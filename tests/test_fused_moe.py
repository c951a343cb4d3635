import pytest
import torch

from moe_align.ops._backend import triton_available
from moe_align.ops._memory import MIN_ADVISED_BYTES, new_empty_huge_pages
from moe_align.ops.fused_moe import fused_experts
from oracle_experts import experts_oracle_with_grads
from conftest import requires_cuda

# Per dtype: (rtol, atol as a fraction of the largest reference magnitude).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1.6e-2, 1.6e-2)}
GRAD_NAMES = ("hidden_states", "gate_up_proj", "down_proj", "topk_weights")


@pytest.fixture
def use_backend(backend):
    """Force a backend; returns the device its tests run on (Triton: CUDA when there is one,
    else CPU tensors under TRITON_INTERPRET=1)."""

    def force(name: str) -> str:
        backend(name)
        if name != "triton" or torch.cuda.is_available():
            return "cuda" if name == "triton" else "cpu"
        if not triton_available(torch.device("cpu")):
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
        return "cpu"

    return force


def distinct_ids(num_tokens, top_k, num_experts, generator, skip=()):
    """Each token picks top_k distinct experts, never one of `skip`."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip])
    keys = torch.rand(num_tokens, allowed.numel(), generator=generator)
    return allowed[keys.topk(top_k, dim=1).indices]


def make_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, seed, ids=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    if ids is None:
        ids = distinct_ids(num_tokens, top_k, num_experts, g)
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    grad_out = torch.randn(num_tokens, hidden, generator=g)
    cast = [t.to(device=device, dtype=dtype) for t in (x, gate_up, down)]
    return (*cast, weights.to(device), ids.to(device), grad_out.to(device=device, dtype=dtype))


def assert_close(got, want, dtype, name):
    rtol, atol = TOLERANCES[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol * max(scale, 1e-6),
                               msg=lambda m: f"{name}: {m}")


def run_and_check(x, gate_up, down, weights, ids, grad_out, dtype):
    """fused_experts forward + backward against the float64 oracle; returns the gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    out = fused_experts(*leaves, ids)
    assert out.dtype == x.dtype and out.shape == x.shape
    out.backward(grad_out)
    want_out, *want_grads = experts_oracle_with_grads(x, gate_up, down, weights, ids, grad_out)
    assert_close(out, want_out, dtype, "out")
    for leaf, want, name in zip(leaves, want_grads, GRAD_NAMES):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert_close(leaf.grad, want, dtype, f"d {name}")
    return [leaf.grad for leaf in leaves]


# (tokens, hidden, inter, experts, top_k)
CASES = [
    (0, 32, 16, 5, 2),   # no tokens
    (1, 32, 16, 5, 1),   # one token, top-1
    (7, 32, 24, 5, 2),
    (33, 40, 48, 8, 3),  # odd hidden size, several column tiles
    (33, 32, 16, 1, 1),  # a single expert
    (150, 32, 16, 1, 1),  # more rows per expert than the CPU path's small-GEMM layout takes
]

TRITON_CASES = [
    (0, 32, 16, 5, 2, torch.float32),
    (1, 32, 16, 5, 1, torch.float32),
    (7, 32, 24, 5, 2, torch.float32),
    (33, 40, 48, 8, 3, torch.float32),
    (33, 32, 16, 1, 1, torch.float32),
    (7, 32, 24, 5, 2, torch.float16),
    (33, 40, 48, 8, 3, torch.float16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", CASES)
def test_torch_path_matches_oracle(use_backend, tokens, hidden, inter, experts, top_k, dtype):
    use_backend("torch")
    run_and_check(*make_inputs(tokens, hidden, inter, experts, top_k, dtype, seed=tokens + 10 * experts), dtype)


@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k,dtype", TRITON_CASES)
def test_triton_matches_oracle(use_backend, tokens, hidden, inter, experts, top_k, dtype):
    device = use_backend("triton")
    inputs = make_inputs(tokens, hidden, inter, experts, top_k, dtype, seed=tokens + 10 * experts, device=device)
    run_and_check(*inputs, dtype)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_edge_layouts(use_backend, backend_name):
    device = use_backend(backend_name)
    dtype = torch.float32
    # Every token on one expert (top-1), experts 0-2 and 4-5 without tokens.
    ids = torch.full((9, 1), 3)
    grads = run_and_check(*make_inputs(9, 32, 16, 6, 1, dtype, seed=1, ids=ids, device=device), dtype)
    for grad in grads[1:3]:
        assert torch.count_nonzero(grad[[0, 1, 2, 4, 5]]) == 0
    # Experts 0, 2 and the last receive nothing; duplicate experts within a token.
    g = torch.Generator().manual_seed(2)
    ids = distinct_ids(12, 2, 8, g, skip=(0, 2, 7))
    ids[3, 1] = ids[3, 0]
    grads = run_and_check(*make_inputs(12, 32, 16, 8, 2, dtype, seed=2, ids=ids, device=device), dtype)
    for grad in grads[1:3]:
        assert torch.count_nonzero(grad[[0, 2, 7]]) == 0
    # Two experts used of 16: the layout ends in many unused blocks (expert -1) after the used ones.
    ids = torch.tensor([[0], [1], [1]])
    grads = run_and_check(*make_inputs(3, 32, 16, 16, 1, dtype, seed=3, ids=ids, device=device), dtype)
    for grad in grads[1:3]:
        assert torch.count_nonzero(grad[2:]) == 0


def test_weight_gradients_in_huge_page_buffers(use_backend):
    """Weight gradients large enough for the CPU path's huge-page buffers (>= 32 MiB): still
    exact zeros for the expert without tokens and the oracle's values for the others."""
    use_backend("torch")
    g = torch.Generator().manual_seed(5)
    ids = distinct_ids(5, 2, 4, g, skip=(1,))
    inputs = make_inputs(5, 1024, 1024, 4, 2, torch.float32, seed=5, ids=ids)
    assert inputs[1].numel() * 4 >= MIN_ADVISED_BYTES
    grads = run_and_check(*inputs, torch.float32)
    for grad in grads[1:3]:
        assert torch.count_nonzero(grad[1]) == 0


def test_direct_cpu_call_equals_the_op(use_backend):
    """Without autograd, CPU calls skip the torch.library dispatch: the same result as the op's."""
    use_backend("torch")
    x, gate_up, down, weights, ids, _ = make_inputs(11, 32, 24, 5, 2, torch.float32, seed=4)
    with torch.no_grad():
        out = fused_experts(x, gate_up, down, weights, ids)
    op_out, _ = torch.ops.moe_align.fused_experts(x, gate_up, down, weights, ids, False)
    assert torch.equal(out, op_out)


@pytest.mark.parametrize("shape", [(3,), (4096, 2048 + 1), (0, 5)])
def test_new_empty_huge_pages(shape):
    like = torch.ones(2, dtype=torch.float64)
    out = new_empty_huge_pages(like, shape, dtype=torch.float32)
    assert out.shape == shape and out.dtype == torch.float32 and out.is_contiguous()
    out.fill_(2.5)
    assert torch.all(out == 2.5)
    assert torch.all(like == 1)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_strided_inputs_and_int32_ids_unmodified(use_backend, backend_name):
    device = use_backend(backend_name)
    dtype = torch.float32
    x, gate_up, down, weights, ids, grad_out = make_inputs(11, 32, 24, 5, 2, dtype, seed=3, device=device)
    # Same values, other layouts: transposed or sliced storage.
    x_s = torch.empty(11, 64, device=device)[:, ::2].copy_(x)
    gate_up_s = torch.empty(5, 32, 48, device=device).transpose(1, 2).copy_(gate_up)
    down_s = torch.empty(5, 24, 32, device=device).transpose(1, 2).copy_(down)
    weights_s = torch.empty(2, 11, device=device).t().copy_(weights)
    ids_s = torch.empty(2, 11, dtype=torch.int32, device=device).t().copy_(ids)
    grad_s = torch.empty(32, 11, device=device).t().copy_(grad_out)
    for t in (x_s, gate_up_s, down_s, weights_s, ids_s, grad_s):
        assert not t.is_contiguous()
    before = [t.clone() for t in (x_s, gate_up_s, down_s, weights_s, ids_s, grad_s)]
    run_and_check(x_s, gate_up_s, down_s, weights_s, ids_s, grad_s, dtype)
    for t, b in zip((x_s, gate_up_s, down_s, weights_s, ids_s, grad_s), before):
        assert torch.equal(t, b)
    # int32 and int64 ids give the same bits.
    with torch.no_grad():
        a = fused_experts(x, gate_up, down, weights, ids.to(torch.int32))
        b = fused_experts(x, gate_up, down, weights, ids.to(torch.int64))
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_partial_requires_grad_and_determinism(use_backend, backend_name):
    device = use_backend(backend_name)
    dtype = torch.float32
    x, gate_up, down, weights, ids, grad_out = make_inputs(9, 32, 16, 4, 2, dtype, seed=4, device=device)
    want = experts_oracle_with_grads(x, gate_up, down, weights, ids, grad_out)
    # Only the weights (and not the activations / routing weights) need gradients, as for the
    # first MoE layer with a frozen router.
    gate_up_leaf = gate_up.clone().requires_grad_(True)
    down_leaf = down.clone().requires_grad_(True)
    fused_experts(x, gate_up_leaf, down_leaf, weights, ids).backward(grad_out)
    assert_close(gate_up_leaf.grad, want[2], dtype, "d gate_up_proj")
    assert_close(down_leaf.grad, want[3], dtype, "d down_proj")
    # Only the routing weights.
    weights_leaf = weights.clone().requires_grad_(True)
    fused_experts(x, gate_up, down, weights_leaf, ids).backward(grad_out)
    assert_close(weights_leaf.grad, want[4], dtype, "d topk_weights")
    # Under no_grad nothing is saved, and the result is the same bits; repeated runs agree.
    with torch.no_grad():
        first = fused_experts(x, gate_up_leaf, down_leaf, weights_leaf, ids)
    second = fused_experts(x, gate_up_leaf, down_leaf, weights_leaf, ids)
    assert torch.equal(first, second.detach())


def test_topk_weights_dtype(use_backend):
    use_backend("torch")
    x, gate_up, down, weights, ids, grad_out = make_inputs(5, 32, 16, 4, 2, torch.float32, seed=5)
    w64 = weights.double().requires_grad_(True)
    out = fused_experts(x, gate_up, down, w64, ids)
    out.backward(grad_out)
    assert w64.grad.dtype == torch.float64
    want = experts_oracle_with_grads(x, gate_up, down, weights, ids, grad_out)
    assert_close(w64.grad, want[4], torch.float32, "d topk_weights")


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_opcheck(use_backend, backend_name):
    device = use_backend(backend_name)
    x, gate_up, down, weights, ids, grad_out = make_inputs(6, 32, 16, 4, 2, torch.float32, seed=6, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    torch.library.opcheck(torch.ops.moe_align.fused_experts.default, (*leaves, ids, True))
    torch.library.opcheck(torch.ops.moe_align.fused_experts.default, (x, gate_up, down, weights, ids.int(), False))
    _, gu = torch.ops.moe_align.fused_experts(x, gate_up, down, weights, ids, True)
    torch.library.opcheck(torch.ops.moe_align.fused_experts_backward.default,
                          (grad_out, x, gate_up, down, weights, ids, gu, [True, True, True, True]))
    torch.library.opcheck(torch.ops.moe_align.fused_experts_backward.default,
                          (grad_out, x, gate_up, down, weights, ids, gu, [False, True, False, True]))


def _moe_loss(x, gate_up, down, weights, ids):
    return (fused_experts(x, gate_up, down, weights.softmax(-1), ids) * x).sum()


@pytest.mark.parametrize("backend_name,compiler", [("torch", "aot_eager"), ("triton", "aot_eager"),
                                                   ("torch", "inductor")])
def test_torch_compile_fullgraph(use_backend, backend_name, compiler):
    device = use_backend(backend_name)
    torch._dynamo.reset()
    x, gate_up, down, weights, ids, _ = make_inputs(5, 32, 16, 4, 2, torch.float32, seed=7, device=device)
    eager = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    compiled = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    want = _moe_loss(*eager, ids)
    want.backward()
    got = torch.compile(_moe_loss, fullgraph=True, backend=compiler)(*compiled, ids)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    x, gate_up, down, weights, ids, _ = make_inputs(4, 32, 16, 4, 2, torch.float32, seed=8)
    cases = [
        ((x[0], gate_up, down, weights, ids), ValueError, "hidden_states"),
        ((x, gate_up[:, :31], down, weights, ids), ValueError, "gate_up_proj"),
        ((x, gate_up, down[:, :, :8], weights, ids), ValueError, "down_proj"),
        ((x, gate_up, down, weights[:, :1], ids), ValueError, "topk_weights"),
        ((x, gate_up, down, weights, ids[:3]), ValueError, "topk_ids"),
        ((x, gate_up, down, weights, ids + 4), ValueError, "topk_ids"),
        ((x, gate_up, down, weights, ids - 5), ValueError, "topk_ids"),
        ((x, gate_up, down, weights, ids.float()), TypeError, "topk_ids"),
        ((x.int(), gate_up, down, weights, ids), TypeError, "hidden_states"),
        ((x, gate_up.half(), down, weights, ids), TypeError, "gate_up_proj"),
        ((x, gate_up, down.double(), weights, ids), TypeError, "down_proj"),
        ((x, gate_up, down, weights.int(), ids), TypeError, "topk_weights"),
        ((x, gate_up, down, weights, ids[:, :0]), ValueError, "topk_ids"),
        ((x, gate_up, down, weights, ids.to("meta")), ValueError, "topk_ids"),
        ((x, gate_up, down, weights, ids.tolist()), TypeError, "topk_ids"),
    ]
    for args, error, name in cases:
        with pytest.raises(error, match=name):
            fused_experts(*args)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", [(1, 256, 128, 8, 2), (300, 512, 192, 16, 6)])
def test_bf16_on_gpu(use_backend, backend_name, tokens, hidden, inter, experts, top_k):
    use_backend(backend_name)
    dtype = torch.bfloat16
    inputs = make_inputs(tokens, hidden, inter, experts, top_k, dtype, seed=tokens, device="cuda")
    run_and_check(*inputs, dtype)


def _reference_expert(x, gate_up, down, weights, ids, grad_out, expert):
    """float64 d gate_up[expert] and d down[expert] from the pairs routed to `expert`."""
    token, k = torch.nonzero(ids == expert, as_tuple=True)
    xe = x[token].double()
    gu = xe @ gate_up[expert].double().t()
    inter = gu.shape[1] // 2
    g, u = gu[:, :inter], gu[:, inter:]
    sig = torch.sigmoid(g)
    act = g * sig * u
    w = weights[token, k].double()[:, None]
    dy = grad_out[token].double()
    z = dy @ down[expert].double()
    dg = w * z * u * sig * (1 + g * (1 - sig))
    du = w * z * g * sig
    return torch.cat([dg, du], dim=1).t() @ xe, (w * dy).t() @ act


@requires_cuda
def test_65536_tokens_hidden_7168_top8_addressing():
    """Pair rows past 2**31 elements: every index must be 64-bit (sampled rows checked)."""
    torch.manual_seed(0)
    tokens, hidden, inter, experts, top_k = 65536, 7168, 64, 256, 8
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    ids = torch.rand(tokens, experts, device=device).topk(top_k, dim=1).indices.to(torch.int32)
    weights = torch.rand(tokens, top_k, device=device)
    grad_out = torch.randn(tokens, hidden, device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    out = fused_experts(*leaves, ids)
    out.backward(grad_out)
    torch.cuda.synchronize()

    rows = torch.tensor([0, 1, 37449, 37450, 40000, 52345, 65534, 65535], device=device)
    want_out, want_dx, _, _, want_dw = experts_oracle_with_grads(
        x[rows], gate_up, down, weights[rows], ids[rows], grad_out[rows], wrt=(0, 3))
    assert_close(out[rows], want_out, dtype, "out rows")
    assert_close(leaves[0].grad[rows], want_dx, dtype, "d hidden_states rows")
    assert_close(leaves[3].grad[rows], want_dw, dtype, "d topk_weights rows")
    for expert in (0, 131, 255):
        want_dgu, want_ddown = _reference_expert(x, gate_up, down, weights, ids, grad_out, expert)
        assert_close(leaves[1].grad[expert], want_dgu.cpu(), dtype, f"d gate_up_proj[{expert}]")
        assert_close(leaves[2].grad[expert], want_ddown.cpu(), dtype, f"d down_proj[{expert}]")
