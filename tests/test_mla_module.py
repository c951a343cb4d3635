"""MLAttention and MLACache: transformers equivalence, the float64 oracle, decode == full forward."""

import types

import pytest
import torch

from conftest import requires_cuda
from moe_align.modules.mla import MLACache, MLAConfig, MLAttention
from oracle_mla import mla_layer_oracle

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
HEADS, D_NOPE, D_ROPE, D_V, D_LAT, HIDDEN = 2, 16, 16, 32, 32, 64
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
VARIANTS = {
    # q_lora_rank, attention_bias, rope_interleave, rope scaling
    "v3_yarn": (32, True, True, YARN),
    "v2_lite_plain": (None, False, False, None),
    "yarn_mscale_only": (32, False, True, {**YARN, "mscale_all_dim": 0, "mscale": 0.7}),
}


def make_config(variant):
    q_lora, bias, interleave, scaling = VARIANTS[variant]
    return MLAConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, q_lora_rank=q_lora, kv_lora_rank=D_LAT,
                     qk_nope_head_dim=D_NOPE, qk_rope_head_dim=D_ROPE, v_head_dim=D_V, attention_bias=bias,
                     rope_interleave=interleave, rope_scaling=scaling, max_position_embeddings=256)


def make_module(variant, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    module = MLAttention(make_config(variant), device=device)
    with torch.no_grad():
        for p in module.parameters():  # norms and biases random too
            p.normal_(0, 0.2)
    return module.to(dtype)


def oracle_forward(module, hidden, positions, cu_seqlens):
    cfg = module.config
    inv_freq, scaling = cfg.rope_frequencies()
    dims = (HEADS, D_NOPE, D_ROPE, D_V, D_LAT)
    params = {k: v.cpu() for k, v in module.state_dict().items()}
    return mla_layer_oracle(params, dims, hidden.cpu(), positions.cpu(), cu_seqlens.cpu(),
                            inv_freq, scaling, cfg.softmax_scale, cfg.rope_interleave)


# ---- transformers ------------------------------------------------------------------------------


def hf_pair(variant, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    q_lora, bias, interleave, scaling = VARIANTS[variant]
    rope = {"rope_type": "default", "rope_theta": 10000.0} if scaling is None else {"rope_theta": 10000.0, **scaling}
    config = transformers.DeepseekV3Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=q_lora,
        kv_lora_rank=D_LAT, qk_nope_head_dim=D_NOPE, qk_rope_head_dim=D_ROPE, v_head_dim=D_V,
        attention_bias=bias, rope_interleave=interleave, max_position_embeddings=256, rope_parameters=rope,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = DeepseekV3Attention(config, layer_idx=0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = MLAttention(config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, DeepseekV3RotaryEmbedding(config), ours


def hf_forward(hf, rotary, hidden):
    batch, seq_len, _ = hidden.shape
    positions = torch.arange(seq_len)[None].expand(batch, seq_len)
    mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)[None, None].expand(batch, 1, seq_len, seq_len)
    out, _ = hf(hidden, rotary(hidden, positions), mask)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_is_transformers(variant):
    hf, _, ours = hf_pair(variant)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    hf.load_state_dict(ours.state_dict(), strict=True)
    assert ours.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers_forward_and_backward(variant):
    hf, rotary, ours = hf_pair(variant, seed=1)
    hidden = torch.randn(2, 24, HIDDEN)
    x_hf, x_ours = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ref, out = hf_forward(hf, rotary, x_hf), ours(x_ours)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    grad = torch.randn_like(ref)
    (ref * grad).sum().backward()
    (out * grad).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, **TOL[torch.float32])
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("q_lora", [None, 32])
def test_matches_transformers_deepseek_v2(q_lora):
    """DeepSeek-V2's attention: the same parameters, RoPE by complex multiplication of interleaved
    pairs (our de-interleaved layout permutes q and k alike, so the scores are the same)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding

    config = transformers.DeepseekV2Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=q_lora,
        kv_lora_rank=D_LAT, qk_nope_head_dim=D_NOPE, qk_rope_head_dim=D_ROPE, v_head_dim=D_V,
        max_position_embeddings=256, rope_parameters={"rope_theta": 10000.0, **YARN, "mscale": 0.707,
                                                      "mscale_all_dim": 0.707},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(10)
    hf = DeepseekV2Attention(config, layer_idx=0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = MLAttention(config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    hidden = torch.randn(2, 20, HIDDEN)
    positions = torch.arange(20)[None].expand(2, 20)
    mask = torch.full((20, 20), float("-inf")).triu(1)[None, None].expand(2, 1, 20, 20)
    ref = hf(hidden, attention_mask=mask, position_embeddings=DeepseekV2RotaryEmbedding(config)(hidden, positions))[0]
    torch.testing.assert_close(ours(hidden), ref, **TOL[torch.float32])


# ---- float64 oracle, packing -------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_packed_matches_oracle(backend, impl):
    backend(impl)
    module = make_module("v3_yarn", seed=2)
    lengths = [5, 1, 19]
    cu = torch.tensor([0, 5, 6, 25], dtype=torch.int32)
    hidden = torch.randn(sum(lengths), HIDDEN)
    out = module(hidden, cu_seqlens=cu, max_seqlen=19)
    positions = torch.cat([torch.arange(n) for n in lengths])
    torch.testing.assert_close(out.double(), oracle_forward(module, hidden, positions, cu), **TOL[torch.float32])
    # Each packed sequence equals the same sequence run alone.
    alone = module(hidden[6:25][None])[0]
    torch.testing.assert_close(out[6:25], alone, **TOL[torch.float32])


def test_bf16_matches_oracle():
    module = make_module("v3_yarn", seed=3, dtype=torch.bfloat16)
    hidden = torch.randn(1, 30, HIDDEN).bfloat16()
    out = module(hidden)
    assert out.dtype == torch.bfloat16 and module.inv_freq.dtype == torch.float32
    ref = oracle_forward(module, hidden[0], torch.arange(30), torch.tensor([0, 30], dtype=torch.int32))
    torch.testing.assert_close(out[0].double(), ref, **TOL[torch.bfloat16])


def test_compiles_fullgraph():
    module = make_module("v3_yarn", seed=4)
    compiled_module = make_module("v3_yarn", seed=4)
    cu = torch.tensor([0, 4, 13], dtype=torch.int32)
    hidden = torch.randn(13, HIDDEN)
    compiled = torch.compile(compiled_module, fullgraph=True)
    out, out_c = module(hidden, cu_seqlens=cu, max_seqlen=9), compiled(hidden, cu_seqlens=cu, max_seqlen=9)
    torch.testing.assert_close(out_c, out)
    out.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p), pc in zip(module.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(pc.grad, p.grad, msg=lambda m: f"{name}: {m}")
    # Other sizes: torch.compile retraces with symbolic sizes (max_seqlen becomes a SymInt).
    cu = torch.tensor([0, 1, 2, 21], dtype=torch.int32)
    hidden = torch.randn(21, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, cu_seqlens=cu, max_seqlen=19),
                                   module(hidden, cu_seqlens=cu, max_seqlen=19))


# ---- decode through the cache ------------------------------------------------------------------


def decode_in_steps(module, cache, seq_ids, hidden, steps):
    """Feed hidden [B, S, hidden] through the cache in chunks of `steps` tokens."""
    outs, start = [], 0
    for n in steps:
        cache.begin_step(seq_ids, n)
        with torch.no_grad():
            outs.append(module(hidden[:, start:start + n], cache=cache))
        start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("variant", ["v3_yarn", "v2_lite_plain"])
def test_decode_equals_full_forward(backend, impl, variant):
    backend(impl)
    module = make_module(variant, seed=5)
    steps = [3, 1, 2, 4, 1, 1, 2, 4, 5]  # s_q in {1, 2, 4} and a prompt-like chunk
    hidden = torch.randn(2, sum(steps), HIDDEN)
    with torch.no_grad():
        full = module(hidden)
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=12, block_size=16)
    # A sequence that comes and goes first, so the pool hands out recycled, shuffled blocks.
    other = cache.add_sequence()
    cache.begin_step([other], 20)
    cache.free(other)
    seq_ids = [cache.add_sequence(), cache.add_sequence()]
    cache.kv.fill_(float("nan"))  # nothing stale may leak into the new sequences
    decoded = decode_in_steps(module, cache, seq_ids, hidden, steps)
    torch.testing.assert_close(decoded, full, **TOL[torch.float32])
    assert [cache.length(s) for s in seq_ids] == [sum(steps)] * 2


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_decode_batch_of_different_lengths(backend, impl):
    """Sequences whose caches differ in length decode together (one padded batch on the CPU)."""
    backend(impl)
    module = make_module("v3_yarn", seed=8)
    prompts, steps = [9, 2, 17], [1, 2, 1]
    hidden = [torch.randn(1, n + sum(steps), HIDDEN) for n in prompts]
    with torch.no_grad():
        full = [module(h) for h in hidden]
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=13, block_size=4)
    cache.kv.fill_(float("nan"))
    seq_ids = [cache.add_sequence() for _ in prompts]
    for s, h, n in zip(seq_ids, hidden, prompts):
        decode_in_steps(module, cache, [s], h[:, :n], [n])
    assert cache.step.plan is None  # the PyTorch path needs no split plan (one is made on CUDA)
    rest = decode_in_steps(module, cache, seq_ids, torch.cat([h[:, n:] for h, n in zip(hidden, prompts)]), steps)
    for b, (f, n) in enumerate(zip(full, prompts)):
        torch.testing.assert_close(rest[b:b + 1], f[:, n:], **TOL[torch.float32])


def test_fork_copies_a_sequence():
    """G samples of one prompt: the prompt is decoded once, its copies fork the cache and go on
    with their own tokens."""
    module = make_module("v3_yarn", seed=10)
    prompt, continuations = torch.randn(1, 7, HIDDEN), torch.randn(3, 4, HIDDEN)
    with torch.no_grad():
        full = module(torch.cat([prompt.expand(3, -1, -1), continuations], dim=1))
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=9, block_size=4)
    cache.kv.fill_(float("nan"))
    first = cache.add_sequence()
    decode_in_steps(module, cache, [first], prompt, [7])
    seq_ids = [first, cache.fork(first), cache.fork(first)]
    assert [cache.length(s) for s in seq_ids] == [7] * 3 and cache.num_free_blocks == 3
    torch.testing.assert_close(decode_in_steps(module, cache, seq_ids, continuations, [1, 3]), full[:, 7:],
                               **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="cache is full"):
        cache.fork(first)


def test_absorbed_weights_follow_every_update():
    """The absorbed weights are views of kv_b_proj.weight: current after any in-place update,
    also fused AdamW's, which does not bump the weight's version counter."""
    module = make_module("v3_yarn", seed=6)
    assert module.absorbed_weights()[0].data_ptr() == module.kv_b_proj.weight.data_ptr()  # a view, no copy
    module(torch.randn(1, 5, HIDDEN)).square().sum().backward()
    torch.optim.AdamW(module.parameters(), lr=0.1, fused=True).step()  # torch 2.13: no version bump
    w = module.kv_b_proj.weight.detach().view(module.num_heads, -1, module.kv_lora_rank)
    assert torch.equal(module.absorbed_weights()[0], w[:, :module.qk_nope_head_dim])
    # Decoding with the updated weights matches the full forward with them.
    hidden = torch.randn(1, 6, HIDDEN)
    with torch.no_grad():
        full = module(hidden)
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=2, block_size=8)
    seq = cache.add_sequence()
    torch.testing.assert_close(decode_in_steps(module, cache, [seq], hidden, [2, 4]), full, **TOL[torch.float32])


def test_truncate_rolls_back_speculative_tokens():
    module = make_module("v3_yarn", seed=9)
    hidden = torch.randn(1, 12, HIDDEN)
    draft = torch.randn(1, 4, HIDDEN)
    with torch.no_grad():
        full = module(hidden)
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=4, block_size=4)
    seq = cache.add_sequence()
    first = decode_in_steps(module, cache, [seq], hidden[:, :6], [6])
    decode_in_steps(module, cache, [seq], draft, [4])  # 4 draft tokens, all rejected
    cache.truncate(seq, 6)
    assert cache.length(seq) == 6 and cache.num_free_blocks == 2
    cache.kv.view(-1, cache.kv.shape[-1])[6:].fill_(float("nan"))  # the rejected slots: never read again
    rest = decode_in_steps(module, cache, [seq], hidden[:, 6:], [2, 4])
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, **TOL[torch.float32])
    with pytest.raises(ValueError, match="length"):
        cache.truncate(seq, 13)


def test_bf16_decode_equals_full_forward():
    module = make_module("v3_yarn", seed=7, dtype=torch.bfloat16)
    hidden = torch.randn(1, 20, HIDDEN).bfloat16()
    with torch.no_grad():
        full = module(hidden)
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=3, block_size=8, dtype=torch.bfloat16)
    decoded = decode_in_steps(module, cache, [cache.add_sequence()], hidden, [1] * 20)
    torch.testing.assert_close(decoded, full, **TOL[torch.bfloat16])


@pytest.mark.parametrize("module_dtype,cache_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_decode_through_a_cache_of_another_dtype_equals_the_full_forward(module_dtype, cache_dtype):
    """Outside autocast the cache's dtype sets the decode's precision, the module's the rest."""
    module = make_module("v3_yarn", seed=10, dtype=module_dtype)
    hidden = torch.randn(2, 10, HIDDEN).to(module_dtype)
    with torch.no_grad():
        full = module(hidden)
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=4, block_size=8, dtype=cache_dtype)
    decoded = decode_in_steps(module, cache, [cache.add_sequence(), cache.add_sequence()], hidden, [4, 1, 5])
    assert decoded.dtype == module_dtype
    torch.testing.assert_close(decoded, full, **TOL[torch.bfloat16])


def test_autocast_decode_of_fp32_weights_in_a_bf16_cache_equals_the_full_forward():
    """A bf16 rollout of an fp32 model (a GPU trainer's autocast): decode steps under autocast,
    through a bf16 cache, agree with the full forward under autocast to bf16 tolerance."""
    module = make_module("v3_yarn", seed=9)
    hidden = torch.randn(2, 12, HIDDEN)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = module(hidden)
        cache = MLACache.for_config(module.config, num_layers=1, num_blocks=4, block_size=8, dtype=torch.bfloat16)
        decoded = decode_in_steps(module, cache, [cache.add_sequence(), cache.add_sequence()], hidden, [5, 1, 2, 4])
    assert decoded.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(decoded, full, **TOL[torch.bfloat16])


def test_config_from_older_transformers_fields():
    old = types.SimpleNamespace(
        hidden_size=HIDDEN, num_attention_heads=HEADS, kv_lora_rank=D_LAT, q_lora_rank=None,
        qk_nope_head_dim=D_NOPE, qk_rope_head_dim=D_ROPE, v_head_dim=D_V, rope_theta=5000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                      "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=256,
    )
    cfg = MLAConfig.from_config(old)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling["type"] == "yarn" and cfg.rope_interleave
    mscale = 0.1 * 1.0 * torch.log(torch.tensor(4.0)).item() + 1.0
    assert cfg.softmax_scale == pytest.approx((D_NOPE + D_ROPE) ** -0.5 * mscale**2)
    assert cfg.rope_frequencies()[1] == pytest.approx(1.0)  # mscale / mscale_all_dim


def test_bad_usage():
    module = make_module("v2_lite_plain")
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=3, block_size=4, max_seq_len=8)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match="begin_step"):
        module(torch.randn(1, 1, HIDDEN), cache=cache)
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.begin_step([seq + 1])
    cache.begin_step([seq], 2)
    with pytest.raises(ValueError, match=r"hidden_states must be \[1, 2, 64\]"):
        module(torch.randn(1, 1, HIDDEN), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.begin_step([seq], 7)
    other = cache.add_sequence()
    with pytest.raises(RuntimeError, match="cache is full"):
        cache.begin_step([seq, other], 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        module(torch.randn(5, HIDDEN), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="rope type"):
        MLAConfig(hidden_size=8, num_attention_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})


# ---- GPU ---------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_module(backend, dtype):
    backend("triton")
    module = make_module("v3_yarn", seed=8, dtype=dtype, device="cuda")
    hidden = torch.randn(2, 70, HIDDEN, device="cuda").to(dtype)
    with torch.no_grad():
        full = module(hidden)
    ref = oracle_forward(module, hidden[1], torch.arange(70), torch.tensor([0, 70], dtype=torch.int32))
    torch.testing.assert_close(full[1].double().cpu(), ref, **TOL[dtype])
    cache = MLACache.for_config(module.config, num_layers=1, num_blocks=12, block_size=16, dtype=dtype,
                                device="cuda")
    ids = [cache.add_sequence(), cache.add_sequence()]
    decoded = decode_in_steps(module, cache, ids, hidden, [4, 1, 2] * 10)
    torch.testing.assert_close(decoded, full, **TOL[dtype])
