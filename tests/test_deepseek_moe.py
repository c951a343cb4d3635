"""DeepseekMoE against a naive float64 oracle and against transformers' DeepseekV2Moe / DeepseekV3MoE.

The oracle below is written from the definition (a loop over tokens and chosen experts) and
shares no code with moe_align.
"""

import copy
import math

import pytest
import torch

from conftest import requires_cuda
from moe_align.modules import DeepseekMoE, MoEConfig, update_correction_biases_
from moe_align.ops import expert_balance_loss

H, I, E = 32, 16, 8  # tiny: hidden, expert intermediate, routed experts

# name: MoEConfig fields. Each covers one router of transformers' DeepseekV2/V3.
CONFIGS = {
    "v2_greedy": dict(topk_method="greedy", num_experts_per_tok=2, n_shared_experts=2,
                      routed_scaling_factor=1.5),
    "v2_group_limited": dict(topk_method="group_limited_greedy", num_experts_per_tok=3, n_group=4,
                             topk_group=2, n_shared_experts=1, routed_scaling_factor=16.0),
    "v3": dict(topk_method="noaux_tc", num_experts_per_tok=2, n_group=4, topk_group=2,
               n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5),
    "v3_no_norm_no_shared": dict(topk_method="noaux_tc", num_experts_per_tok=3, n_group=2, topk_group=1,
                                 n_shared_experts=0, norm_topk_prob=False, routed_scaling_factor=1.0),
}


def make_config(name, **overrides):
    fields = dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, **CONFIGS[name])
    fields.update(overrides)
    return fields


@torch.no_grad()
def randomize_(module, seed=0):
    """Non-trivial parameters: a decisive router, a nonzero V3 bias, O(1) expert outputs.
    Every value is a bf16 number so fp32 and bf16 copies route alike."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name.endswith("tokens_per_expert"):
            continue
        if name.endswith("e_score_correction_bias"):
            value = torch.randn(tensor.shape, generator=g) * 0.1
        elif name == "gate.weight":
            value = torch.randn(tensor.shape, generator=g) * 2.0 / math.sqrt(tensor.shape[-1])
        else:
            value = torch.randn(tensor.shape, generator=g) / math.sqrt(tensor.shape[-1])
        tensor.copy_(value.bfloat16().float())
    return module


def make_moe(name, seed=0, dtype=torch.float32, device="cpu", **overrides):
    fields = make_config(name, **overrides)
    moe = randomize_(DeepseekMoE(MoEConfig(**fields)), seed).to(device=device, dtype=dtype)
    return moe, fields


# --------------------------------------------------------------------------- the float64 oracle


def silu(v):
    return v / (1.0 + torch.exp(-v))


def moe_oracle(x, params, cfg):
    """y_t = sum_k w_k down_e (silu(g) * u) + shared(x_t), [g; u] = gate_up_e x_t, routed as in
    DeepSeek-V2 (softmax, max-score groups, no renormalisation) or V3 (sigmoid, bias for the
    choice only, top-2-sum groups, optional renormalisation), both scaled by the routing factor.
    ``params``: float64 tensors by state-dict key; ``cfg``: the MoEConfig fields as a dict."""
    num_tokens = x.shape[0]
    num_experts, top_k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    inter = cfg["moe_intermediate_size"]
    v3 = cfg["topk_method"] == "noaux_tc"
    grouped = cfg["topk_method"] != "greedy" and (cfg.get("n_group") or 1) > 1
    n_group = (cfg.get("n_group") or 1) if grouped else 1
    topk_group = (cfg.get("topk_group") or n_group) if grouped else 1
    per_group = num_experts // n_group
    gate_w, gate_up, down = params["gate.weight"], params["experts.gate_up_proj"], params["experts.down_proj"]
    outputs = []
    for t in range(num_tokens):
        xt = x[t]
        logits = torch.stack([gate_w[e] @ xt for e in range(num_experts)])
        if v3:
            scores = 1.0 / (1.0 + torch.exp(-logits))
        else:
            exps = torch.exp(logits - logits.max())
            scores = exps / exps.sum()
        choice = [float(scores[e].detach()) for e in range(num_experts)]
        if v3:
            choice = [c + float(params["gate.e_score_correction_bias"][e]) for e, c in enumerate(choice)]
        if grouped:
            group_value = []
            for grp in range(n_group):
                members = sorted(choice[grp * per_group:(grp + 1) * per_group], reverse=True)
                group_value.append(members[0] + members[1] if v3 else members[0])
            kept = sorted(range(n_group), key=lambda grp: -group_value[grp])[:topk_group]
            choice = [c if e // per_group in kept else -math.inf for e, c in enumerate(choice)]
        chosen = sorted(range(num_experts), key=lambda e: -choice[e])[:top_k]
        weights = [scores[e] for e in chosen]
        if v3 and cfg.get("norm_topk_prob"):
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        y = torch.zeros_like(xt)
        for w, e in zip(weights, chosen):
            gu = gate_up[e] @ xt
            y = y + w * cfg.get("routed_scaling_factor", 1.0) * (down[e] @ (silu(gu[:inter]) * gu[inter:]))
        if cfg.get("n_shared_experts"):
            g = params["shared_experts.gate_proj.weight"] @ xt
            u = params["shared_experts.up_proj.weight"] @ xt
            y = y + params["shared_experts.down_proj.weight"] @ (silu(g) * u)
        outputs.append(y)
    return torch.stack(outputs) if num_tokens else x.new_zeros(0, x.shape[1]) + 0 * x.sum()


def check_against_oracle(moe, fields, x, seed=1, rtol=1e-5):
    """Forward and all gradients of ``moe`` at ``x`` [..., H] against the float64 oracle."""
    g = torch.Generator().manual_seed(seed)
    x = x.detach().requires_grad_(True)
    out = moe(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    grad_out = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    moe.zero_grad(set_to_none=True)
    (out * grad_out).sum().backward()

    trained = dict(moe.named_parameters())
    params64 = {k: v.detach().double().requires_grad_(k in trained) for k, v in moe.state_dict().items()}
    x64 = x.detach().double().reshape(-1, x.shape[-1]).requires_grad_(True)
    want = moe_oracle(x64, params64, fields)
    (want * grad_out.double().reshape(want.shape)).sum().backward()

    def close(actual, expected, what):
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual.detach().double().reshape(expected.shape), expected.detach(),
                                   rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m: f"{what}: {m}")

    close(out, want, "output")
    close(x.grad, x64.grad, "grad input")
    for name, p in moe.named_parameters():
        expected = params64[name].grad
        if expected is None:  # e.g. zero tokens: the oracle never touched it
            expected = torch.zeros_like(params64[name])
        actual = p.grad if p.grad is not None else torch.zeros_like(p)
        close(actual, expected, f"grad {name}")
    return out


# --------------------------------------------------------------------------- oracle tests


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_oracle_fp32(name):
    moe, fields = make_moe(name)
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(3))
    check_against_oracle(moe, fields, x)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("name", ["v2_group_limited", "v3"])
def test_backends_match_oracle(backend, backend_name, name):
    backend(backend_name)
    moe, fields = make_moe(name, seed=4)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(5))
    check_against_oracle(moe, fields, x)


@pytest.mark.parametrize(
    "num_tokens, overrides",
    [
        (1, {}),                                # one token (also: most experts get no token)
        (0, {}),                                # no token at all
        (6, dict(num_experts_per_tok=1)),      # top-1
    ],
    ids=["one_token", "zero_tokens", "top1"],
)
@pytest.mark.parametrize("name", ["v2_greedy", "v3"])
def test_edge_cases_match_oracle(name, num_tokens, overrides):
    moe, fields = make_moe(name, seed=6, **overrides)
    x = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(7))
    out = check_against_oracle(moe, fields, x)
    assert out.shape == (num_tokens, H)


def test_expert_without_tokens():
    moe, fields = make_moe("v3", seed=8)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(9))
    moe.train()
    check_against_oracle(moe, fields, x)
    counts = moe.pop_tokens_per_expert()
    assert int((counts == 0).sum()) >= E - 3 * 2  # 3 tokens x top-2 leave >= 2 experts idle
    idle = counts == 0
    assert torch.all(moe.experts.gate_up_proj.grad[idle] == 0)
    assert torch.all(moe.experts.down_proj.grad[idle] == 0)


def test_non_contiguous_input():
    moe, fields = make_moe("v2_group_limited", seed=10)
    base = torch.randn(H, 2, 9, generator=torch.Generator().manual_seed(11))
    x = base.permute(1, 2, 0)[:, ::2]  # [2, 5, H], non-contiguous
    assert not x.is_contiguous()
    check_against_oracle(moe, fields, x)


# --------------------------------------------------------------------------- transformers interop


@pytest.fixture
def hf():
    """transformers' DeepSeek modelling modules (a test dependency: these tests must not skip)."""
    try:
        from transformers import DeepseekV2Config, DeepseekV3Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError as err:  # pragma: no cover
        pytest.fail(f"transformers (a test dependency: pip install -e .[test]) is missing: {err}")
    common = dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_attention_heads=4,
                  num_key_value_heads=4, num_hidden_layers=1, vocab_size=64)

    def build(kind, **kwargs):
        if kind == "v3":
            config = DeepseekV3Config(**{**common, **dict(num_experts_per_tok=2, n_group=4, topk_group=2,
                                                          n_shared_experts=1, norm_topk_prob=True,
                                                          routed_scaling_factor=2.5), **kwargs})
            return config, DeepseekV3MoE(config)
        config = DeepseekV2Config(**{**common, **dict(num_experts_per_tok=3, n_shared_experts=2,
                                                      routed_scaling_factor=1.5), **kwargs})
        return config, DeepseekV2Moe(config)

    return build


HF_CASES = {
    "v3": ("v3", {}),
    "v3_top1_no_norm": ("v3", dict(num_experts_per_tok=1, norm_topk_prob=False, n_group=2, topk_group=1)),
    "v2_greedy": ("v2", dict(topk_method="greedy")),
    # transformers' V2 ignores norm_topk_prob: so must we.
    "v2_group_limited": ("v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    norm_topk_prob=True, routed_scaling_factor=16.0)),
    "v2_mlp_bias": ("v2", dict(topk_method="greedy", mlp_bias=True)),
}


def hf_pair(hf, case, seed=0):
    kind, kwargs = HF_CASES[case]
    config, ref = hf(kind, **kwargs)
    randomize_(ref, seed)
    ours = DeepseekMoE(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers_fp32_forward_backward(hf, case):
    ours, ref = hf_pair(hf, case)
    assert set(ours.state_dict()) == set(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, H, generator=g)
    grad_out = torch.randn(3, 4, H, generator=g)
    outs, grads = [], []
    for module in (ours, ref):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out * grad_out).sum().backward()
        outs.append(out)
        grads.append({"input": xi.grad, **{n: p.grad for n, p in module.named_parameters()}})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5 * outs[1].abs().max().item())
    assert set(grads[0]) == set(grads[1])
    for name, want in grads[1].items():
        torch.testing.assert_close(grads[0][name], want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("case", ["v3", "v2_group_limited"])
def test_transformers_state_dict_round_trip(hf, case):
    ours, ref = hf_pair(hf, case)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(-1)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key
    assert list(ours.state_dict()) == list(ours.state_dict(keep_vars=True))


def test_state_dict_keys_exactly_transformers(hf):
    _, ref3 = hf("v3")
    _, ref2 = hf("v2", topk_method="greedy")
    ours3 = DeepseekMoE(MoEConfig(**make_config("v3")))
    ours2 = DeepseekMoE(MoEConfig(**make_config("v2_greedy")))
    assert sorted(ours3.state_dict()) == sorted(ref3.state_dict())
    assert sorted(ours2.state_dict()) == sorted(ref2.state_dict())
    assert "gate.e_score_correction_bias" not in ours2.state_dict()
    for key, value in ref3.state_dict().items():
        assert ours3.state_dict()[key].shape == value.shape, key
    no_shared = DeepseekMoE(MoEConfig(**make_config("v3_no_norm_no_shared")))
    assert not any(key.startswith("shared_experts") for key in no_shared.state_dict())


@pytest.mark.parametrize("case", ["v3", "v2_group_limited"])
def test_transformers_bf16_forward(hf, case):
    ours, ref = hf_pair(hf, case, seed=2)
    ours, ref = ours.bfloat16(), ref.bfloat16()
    # Both routers work in fp32 from the same bf16 weights; our correction bias stays fp32
    # (transformers keeps it fp32 when loading a checkpoint), its values are bf16 numbers.
    assert ours.gate.weight.dtype == torch.bfloat16
    if case == "v3":
        assert ours.gate.e_score_correction_bias.dtype == torch.float32
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        out, want = ours(x), ref(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())


# --------------------------------------------------------------------------- configs


def test_config_from_transformers(hf):
    v3_config, _ = hf("v3")
    v2_config, _ = hf("v2", topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=True)
    c3, c2 = MoEConfig.from_config(v3_config), MoEConfig.from_config(v2_config)
    assert (c3.topk_method, c3.scoring_func, c3.norm_topk_prob, c3.routed_scaling_factor) == \
        ("noaux_tc", "sigmoid", True, 2.5)
    assert (c2.topk_method, c2.scoring_func, c2.norm_topk_prob) == ("group_limited_greedy", "softmax", False)
    assert c3.model_type == "deepseek_v3" and c2.model_type == "deepseek_v2"


class _Duck:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group=3 must divide"),
        (dict(topk_method="noaux_tc", n_group=4, topk_group=5), "topk_group=5"),
        (dict(topk_method="noaux_tc", n_group=4, topk_group=0), "topk_group must be a positive int"),
        (dict(topk_method="noaux_tc", n_group=4, topk_group=1, num_experts_per_tok=3), "exceeds"),
        (dict(topk_method="noaux_tc", n_group=8, topk_group=2), "two best experts"),
        (dict(topk_method="topk"), "topk_method='topk'"),
        (dict(topk_method="greedy", scoring_func="sigmoid"), "scoring_func='sigmoid'"),
        (dict(topk_method="greedy", norm_topk_prob=True), "norm_topk_prob"),
        (dict(topk_method="greedy", hidden_act="gelu"), "hidden_act"),
        (dict(topk_method="greedy", num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(topk_method="greedy", n_shared_experts=-1), "n_shared_experts"),
    ],
)
def test_bad_config_raises(fields, match):
    base = dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2)
    with pytest.raises(ValueError, match=match):
        DeepseekMoE(MoEConfig(**{**base, **fields}))
    with pytest.raises(ValueError, match=match):  # the same through a duck-typed config
        DeepseekMoE(_Duck(**{**base, **fields}))


def test_bad_duck_configs_raise():
    base = dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="cannot tell the router"):
        DeepseekMoE(_Duck(**base))
    with pytest.raises(ValueError, match="deepseek_v2 config with topk_method='noaux_tc'"):
        DeepseekMoE(_Duck(model_type="deepseek_v2", topk_method="noaux_tc", **base))
    with pytest.raises(ValueError, match="lacks moe_intermediate_size"):
        DeepseekMoE(_Duck(model_type="deepseek_v3", hidden_size=H, n_routed_experts=E, num_experts_per_tok=2))


def test_duck_config_fields_and_defaults():
    """from_config reads every field it knows from any object; a missing optional field takes the
    default of transformers' DeepseekV3Config (scaling 1.0, no shared experts, no MLP bias)."""
    base = dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2)
    bare = MoEConfig.from_config(_Duck(model_type="deepseek_v3", **base))
    assert (bare.routed_scaling_factor, bare.n_shared_experts, bare.mlp_bias, bare.initializer_range) == \
        (1.0, 0, False, 0.02)
    assert bare.routing_groups == (1, 1) and not bare.norm_topk_prob
    full = MoEConfig.from_config(_Duck(model_type="deepseek_v3", routed_scaling_factor=2.5, n_shared_experts=2,
                                       mlp_bias=True, initializer_range=0.05, n_group=4, topk_group=2,
                                       norm_topk_prob=True, **base))
    assert (full.routed_scaling_factor, full.n_shared_experts, full.mlp_bias, full.initializer_range) == \
        (2.5, 2, True, 0.05)
    assert full.routing_groups == (4, 2) and full.norm_topk_prob


def test_bad_input_raises():
    moe, _ = make_moe("v3")
    with pytest.raises(ValueError, match="hidden_size=32"):
        moe(torch.randn(4, H + 1))
    with pytest.raises(TypeError, match="bfloat16"):
        moe(torch.randn(4, H, dtype=torch.bfloat16))


def test_default_init_and_dtype_cast():
    torch.manual_seed(0)
    moe = DeepseekMoE(MoEConfig(**make_config("v3", hidden_size=256, initializer_range=0.05)))
    for name, p in moe.named_parameters():
        assert abs(p.std().item() - 0.05) < 0.01, name
    assert torch.all(moe.gate.e_score_correction_bias == 0)
    moe = moe.to(torch.bfloat16)  # the correction bias stays fp32, counts stay int64
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.tokens_per_expert.dtype == torch.int64


def test_router_stays_fp32_under_autocast():
    """The router's logits are fp32 under bf16 autocast (autocast would run its linear in bf16,
    and with many experts bf16 logits tie and change the routing)."""
    moe, _ = make_moe("v3")
    x = torch.randn(6, H)
    want_logits, want_w, want_ids = moe.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, ids = moe.gate(x)
    assert logits.dtype == torch.float32 and weights.dtype == torch.float32
    assert torch.equal(logits, want_logits) and torch.equal(ids, want_ids) and torch.equal(weights, want_w)


def test_bf16_router_computes_in_fp32():
    """A bf16 layer's router multiplies in fp32 (transformers casts both operands): bf16 logits
    would be rounded to 8 bits of mantissa before the top-k."""
    moe, _ = make_moe("v3")
    moe = moe.to(torch.bfloat16)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(16)).bfloat16()
    logits, _, _ = moe.gate(x)
    want = (x.double() @ moe.gate.weight.double().T).float()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)


def test_input_not_modified():
    moe, _ = make_moe("v3")
    x = torch.randn(5, H)
    before = x.clone()
    moe(x)
    assert torch.equal(x, before)


# --------------------------------------------------------------------------- routing statistics


def test_token_counts_and_record_routing():
    moe, _ = make_moe("v3", seed=12)
    moe.train()
    moe.record_routing = True
    g = torch.Generator().manual_seed(13)
    all_ids = []
    for num_tokens in (5, 1, 0, 9):
        moe(torch.randn(num_tokens, H, generator=g))
        all_ids.append(moe.last_routing.topk_ids.reshape(-1).long())
    expected = torch.bincount(torch.cat(all_ids), minlength=E)
    assert torch.equal(moe.gate.tokens_per_expert, expected)
    assert "gate.tokens_per_expert" not in moe.state_dict()
    assert torch.equal(moe.pop_tokens_per_expert(), expected)
    assert int(moe.gate.tokens_per_expert.sum()) == 0
    moe.eval()
    moe(torch.randn(4, H, generator=g))
    assert int(moe.gate.tokens_per_expert.sum()) == 0  # no counting outside training

    # The recorded scores feed the balance loss and carry the gate's gradient.
    moe.train()
    moe(torch.randn(6, H, generator=g))
    routing = moe.last_routing
    assert routing.scores.shape == (6, E) and routing.topk_weights.shape == (6, 2)
    torch.testing.assert_close(routing.scores, routing.router_logits.sigmoid())
    expert_balance_loss(routing.scores, routing.topk_ids).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    moe.reset_parameters()  # a re-initialised layer starts counting afresh
    assert int(moe.gate.tokens_per_expert.sum()) == 0


def test_update_correction_bias():
    moe, _ = make_moe("v3", seed=14)
    moe.train()
    moe(torch.randn(32, H, generator=torch.Generator().manual_seed(15)))
    counts = moe.gate.tokens_per_expert.clone()
    bias_before = moe.gate.e_score_correction_bias.clone()
    used = moe.update_correction_bias_(gamma=0.01)
    assert torch.equal(used, counts)
    step = moe.gate.e_score_correction_bias - bias_before
    load = counts.float()
    overloaded, underloaded = load > load.mean(), load < load.mean()
    assert overloaded.any() and underloaded.any()
    torch.testing.assert_close(step[overloaded], torch.full_like(step[overloaded], -0.01))
    torch.testing.assert_close(step[underloaded], torch.full_like(step[underloaded], 0.01))
    assert int(moe.gate.tokens_per_expert.sum()) == 0

    v2, _ = make_moe("v2_greedy")
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        v2.update_correction_bias_(gamma=0.01)


def test_update_correction_biases_over_a_model():
    v3a, _ = make_moe("v3", seed=16)
    v3b, _ = make_moe("v3", seed=17)
    v2, _ = make_moe("v2_greedy", seed=18)
    model = torch.nn.Sequential(v3a, v2, v3b).train()
    model(torch.randn(16, H, generator=torch.Generator().manual_seed(19)))
    biases = [m.gate.e_score_correction_bias.clone() for m in (v3a, v3b)]
    reduced = []
    assert update_correction_biases_(model, 0.001, reduce=lambda c: reduced.append(c.clone())) == 2
    assert len(reduced) == 2
    for m, before in zip((v3a, v3b), biases):
        assert not torch.equal(m.gate.e_score_correction_bias, before)
    for m in (v3a, v2, v3b):
        assert int(m.gate.tokens_per_expert.sum()) == 0


# --------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager, _ = make_moe("v3", seed=20)
    eager.train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 6, H, generator=g)
    grad_out = torch.randn(2, 6, H, generator=g)
    results = []
    for fn, module in ((eager, eager), (compiled, compiled_module)):
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * grad_out).sum().backward()
        results.append((out, xi.grad, {n: p.grad for n, p in module.named_parameters()},
                        module.gate.tokens_per_expert.clone()))
    (out_e, gx_e, gp_e, cnt_e), (out_c, gx_c, gp_c, cnt_c) = results
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-6)
    for n in gp_e:
        torch.testing.assert_close(gp_c[n], gp_e[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert torch.equal(cnt_c, cnt_e) and int(cnt_c.sum()) == 12 * eager.gate.top_k


# --------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("name", ["v2_group_limited", "v3"])
def test_cuda_matches_oracle(name):
    moe, fields = make_moe(name, seed=22, device="cuda")
    x = torch.randn(33, H, generator=torch.Generator().manual_seed(23)).cuda()
    check_against_oracle(moe, fields, x)


@requires_cuda
def test_cuda_bf16_matches_fp32():
    moe, _ = make_moe("v3", seed=24, device="cuda")
    moe16 = copy.deepcopy(moe).bfloat16()
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(25)).bfloat16().cuda()
    with torch.no_grad():
        want, out = moe(x.float()), moe16(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
