"""patch_model: our MLA, MoE and fused loss inside transformers' DeepseekV2/V3, sharing parameters.

The reference is the same transformers model, deep-copied before patching: outputs at kept tokens,
losses and every parameter's gradient must agree to fp32 tolerance.
"""

import copy
import inspect

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")  # a test dependency: present in CI, so this runs
# the KV cache's argument and output name: ``cache`` from transformers 5.24, ``past_key_values`` before
CACHE = "cache" if "cache" in inspect.signature(transformers.DeepseekV3ForCausalLM.forward).parameters \
    else "past_key_values"

from moe_align.modules import mla as mla_module  # noqa: E402
from moe_align.integrations import HFMLAttention, patch_model  # noqa: E402
from moe_align.integrations import hf as hf_module  # noqa: E402
from moe_align.modules import DeepseekMoE  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
    v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    max_position_embeddings=64, attention_dropout=0.0,
)
CONFIGS = {
    # V3: q LoRA, sigmoid router with correction bias and groups, YaRN RoPE, interleaved pairs.
    "v3": ("DeepseekV3", dict(q_lora_rank=16, n_group=2, topk_group=1, norm_topk_prob=True,
                              routed_scaling_factor=2.5,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                               "original_max_position_embeddings": 16, "mscale": 0.707,
                                               "mscale_all_dim": 0.707})),
    # V2-Lite-like: no q LoRA, softmax router, group-limited greedy; RoPE by complex pairs.
    "v2": ("DeepseekV2", dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                              routed_scaling_factor=1.5)),
}


def make_model(kind, seed=0, implementation="sdpa", head=True):
    prefix, extra = CONFIGS[kind]
    config = getattr(transformers, f"{prefix}Config")(**COMMON, **extra, attn_implementation=implementation)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM" if head else f"{prefix}Model")(config)
    with torch.no_grad():  # larger than the 0.02 init, so that every path matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


def reference_and_patched(kind, **kwargs):
    model = make_model(kind, **kwargs)
    reference = copy.deepcopy(model)
    return reference, patch_model(model)


def random_batch(batch=2, seq_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a prompt that is not trained on
    return ids, labels


def assert_grads_close(patched, reference):
    ref_params = dict(reference.named_parameters())
    names = [name for name, _ in patched.named_parameters()]
    assert names == list(ref_params)
    for name, p in patched.named_parameters():
        ref = ref_params[name].grad
        if ref is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, ref, **TOL, msg=lambda m, name=name: f"{name}: {m}")



@pytest.fixture
def count_calls(monkeypatch):
    """Count the calls the integration makes to our ops: ``count_calls()["mla_varlen_attention"]``."""
    counts = {"mla_varlen_attention": 0, "linear_logprobs": 0}
    # where the integration's calls look the ops up: MLAttention's attention, the loss's LM head
    for module, name in ((mla_module, "mla_varlen_attention"), (hf_module, "linear_logprobs")):
        op = getattr(module, name)

        def counting(*args, _op=op, _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return lambda: dict(counts)


# ---- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_parameters_are_shared_not_copied(kind):
    model = make_model(kind)
    before = dict(model.named_parameters())
    ptrs = {name: p.data_ptr() for name, p in before.items()}
    buffers = {name: b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")}
    keys = list(model.state_dict())
    hf_attention = model.model.layers[1].self_attn

    assert patch_model(model) is model
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for name, p in after.items():
        assert p is before[name], name
        assert p.data_ptr() == ptrs[name], name
    after_buffers = dict(model.named_buffers())
    for name, b in buffers.items():
        assert after_buffers[name] is b, name
    assert list(model.state_dict()) == keys
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, HFMLAttention)
    assert not isinstance(model.model.layers[0].mlp, DeepseekMoE)  # first_k_dense_replace=1: dense
    assert isinstance(model.model.layers[1].mlp, DeepseekMoE)
    attn = model.model.layers[1].self_attn
    assert attn.kv_b_proj.weight is hf_attention.kv_b_proj.weight
    assert attn.o_proj.weight is hf_attention.o_proj.weight


def test_patch_twice_is_a_no_op():
    model = patch_model(make_model("v3"))
    modules = [(layer.self_attn, layer.mlp) for layer in model.model.layers]
    forward = model.forward
    assert patch_model(model) is model
    assert [(layer.self_attn, layer.mlp) for layer in model.model.layers] == modules
    assert model.forward == forward


def test_patched_model_copies_pickles_and_keeps_its_signature():
    import inspect
    import io

    model = patch_model(make_model("v3"))
    parameters = inspect.signature(model.forward).parameters  # what generate() and Trainer read
    assert {"input_ids", "attention_mask", "labels", "logits_to_keep"} <= set(parameters)
    ids, labels = random_batch()
    loss = model(ids, labels=labels).loss
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert not torch.equal(twin(ids, labels=labels).loss, loss)  # the copy runs on its own weights
    torch.testing.assert_close(model(ids, labels=labels).loss, loss, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(ids, labels=labels).loss, loss, rtol=0, atol=0)
    assert isinstance(loaded.model.layers[1].self_attn, HFMLAttention)


def test_parts_can_be_added_later(count_calls):
    model = make_model("v2")
    reference = copy.deepcopy(model)
    patch_model(model, attention=False, loss=False)
    assert not isinstance(model.model.layers[0].self_attn, HFMLAttention)
    assert isinstance(model.model.layers[1].mlp, DeepseekMoE)
    patch_model(model, moe=False)
    assert isinstance(model.model.layers[0].self_attn, HFMLAttention)
    ids, labels = random_batch()
    torch.testing.assert_close(model(ids, labels=labels).loss, reference(ids, labels=labels).loss, **TOL)
    assert count_calls() == {"mla_varlen_attention": 2, "linear_logprobs": 1}


def test_rejects_other_models():
    with pytest.raises(TypeError, match="model must be a transformers DeepseekV2/DeepseekV3 model"):
        patch_model(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model"):
        patch_model("deepseek")
    with pytest.raises(TypeError, match="moe must be a bool"):
        patch_model(make_model("v3"), moe=1)


def test_unsupported_layer_leaves_the_model_untouched():
    config = transformers.DeepseekV3Config(**{**COMMON, "qk_rope_head_dim": 8}, q_lora_rank=16, n_group=2,
                                           topk_group=1)
    model = transformers.DeepseekV3ForCausalLM(config)
    modules = list(model.modules())
    with pytest.raises(ValueError, match="qk_rope_head_dim=8.*attention=False"):
        patch_model(model)
    assert list(model.modules()) == modules
    patch_model(model, attention=False)
    assert isinstance(model.model.layers[1].mlp, DeepseekMoE)


# ---- numerics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_loss_logits_and_gradients_match(kind, implementation, count_calls):
    reference, model = reference_and_patched(kind, implementation=implementation)
    ids, labels = random_batch()

    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)
    assert count_calls()["mla_varlen_attention"] == 2

    ref_out, out = reference(ids, labels=labels), model(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    assert count_calls() == {"mla_varlen_attention": 4, "linear_logprobs": 1}
    ref_out.loss.backward()
    out.loss.backward()
    assert_grads_close(model, reference)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bf16_autocast_loss_and_gradients_match(kind, count_calls):
    """Under bf16 autocast (a GPU trainer's default) the patched attention and loss cast their
    custom ops' inputs to bf16 as transformers' linears are: the loss and gradients agree to bf16
    tolerance."""
    reference, model = reference_and_patched(kind)
    ids, labels = random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, loss = reference(ids, labels=labels).loss, model(ids, labels=labels).loss
    assert count_calls() == {"mla_varlen_attention": 2, "linear_logprobs": 1}
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    ref_loss.backward()
    loss.backward()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        if ref.grad is not None and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref.grad.flatten(), dim=0)
            assert cos > 0.98 or ref.grad.norm() < 1e-3, (name, float(cos))


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batch_matches(kind, padding, count_calls):
    reference, model = reference_and_patched(kind, seed=2)
    ids, labels = random_batch(batch=3, seq_len=8, seed=3)
    lengths = [8, 5, 2]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, :n] = 1
        else:
            mask[b, 8 - n:] = 1
    labels = labels.masked_fill(mask == 0, -100)
    kept = mask.bool()

    ref_logits, logits = reference(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[kept], ref_logits[kept], **TOL)

    ref_out = reference(ids, attention_mask=mask, labels=labels)
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    assert count_calls() == {"mla_varlen_attention": 4, "linear_logprobs": 1}  # no fallback
    ref_out.loss.backward()
    out.loss.backward()
    assert_grads_close(model, reference)


def test_num_items_in_batch_shift_labels_and_tuple_output():
    reference, model = reference_and_patched("v3")
    ids, labels = random_batch()
    n = torch.tensor(17)  # not the 11 kept targets: the given count must be the divisor
    ref = reference(ids, labels=labels, num_items_in_batch=n, return_dict=False)
    out = model(ids, labels=labels, num_items_in_batch=n, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref[0], **TOL)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[1, 3] = -100
    torch.testing.assert_close(model(ids, labels=labels, shift_labels=shifted).loss,
                               reference(ids, labels=labels, shift_labels=shifted).loss, **TOL)
    # logits asked for (logits_to_keep other than 0): transformers' forward, logits and loss
    keep = torch.arange(ids.shape[1])
    ref, out = reference(ids, labels=labels, logits_to_keep=keep), model(ids, labels=labels, logits_to_keep=keep)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_prefill_fills_the_cache_for_decoding(kind, count_calls):
    """Prefill on our path writes the latents in transformers' layout; decode steps then run
    transformers' attention over them and must match the unpatched model."""
    reference, model = reference_and_patched(kind, seed=4)
    ids, _ = random_batch(batch=2, seq_len=6, seed=5)
    with torch.no_grad():
        ref_out, out = reference(ids, use_cache=True), model(ids, use_cache=True)
        assert count_calls()["mla_varlen_attention"] == 2
        torch.testing.assert_close(out.logits, ref_out.logits, **TOL)
        ref_cache, cache = getattr(ref_out, CACHE), getattr(out, CACHE)
        for layer in range(2):
            torch.testing.assert_close(cache.layers[layer].keys, ref_cache.layers[layer].keys, **TOL)
            torch.testing.assert_close(cache.layers[layer].values, ref_cache.layers[layer].values, **TOL)
        step = ids[:, -1:].flip(0)
        ref_next = reference(step, **{CACHE: ref_cache}, use_cache=True)
        nxt = model(step, **{CACHE: cache}, use_cache=True)
        assert count_calls()["mla_varlen_attention"] == 2  # decoding fell back to transformers
        torch.testing.assert_close(nxt.logits, ref_next.logits, **TOL)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_fused_loss_takes_the_cache_under_either_name(name, count_calls):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; the patched forward takes
    both, with labels (our loss) too, and fills the cache it is given on our prefill path."""
    reference, model = reference_and_patched("v3", seed=4)
    ids, labels = random_batch(batch=2, seq_len=6, seed=5)
    with torch.no_grad():
        ref_cache, cache = transformers.DynamicCache(config=reference.config), transformers.DynamicCache(
            config=model.config)
        ref = reference(ids, labels=labels, use_cache=True, **{CACHE: ref_cache})
        out = model(ids, labels=labels, use_cache=True, **{name: cache})
    assert count_calls()["mla_varlen_attention"] == 2 and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert getattr(out, CACHE) is cache
    for layer in range(2):
        torch.testing.assert_close(cache.layers[layer].keys, ref_cache.layers[layer].keys, **TOL)
    with pytest.raises(ValueError, match="cache or as past_key_values, not both"):
        model(ids, labels=labels, cache=cache, past_key_values=cache)


def test_base_model_is_patched_without_loss():
    reference = make_model("v3", head=False)
    model = patch_model(copy.deepcopy(reference))
    ids, _ = random_batch()
    torch.testing.assert_close(model(ids).last_hidden_state, reference(ids).last_hidden_state, **TOL)
    assert "loss" not in model._moe_align_patched


# ---- the attention adapter on its own: masks transformers' model never builds on the CPU ----------


def attention_pair(kind="v3", implementation="sdpa"):
    reference, model = reference_and_patched(kind, seed=6, implementation=implementation)
    return reference.model.layers[0].self_attn, model.model.layers[0].self_attn, reference.model.rotary_emb


def call(attn, hidden, mask, rotary, position_ids):
    return attn(hidden_states=hidden, attention_mask=mask, position_ids=position_ids,
                position_embeddings=rotary(hidden, position_ids), **{CACHE: None})[0]


def test_block_diagonal_mask_packs_sequences(count_calls):
    ref_attn, attn, rotary = attention_pair()
    seq_len, lengths = 9, [4, 3, 2]
    allowed = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    position_ids, start = [], 0
    for n in lengths:
        allowed[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        position_ids += list(range(n))
        start += n
    position_ids = torch.tensor([position_ids])
    hidden = torch.randn(1, seq_len, 32)
    for mask in (allowed[None, None], torch.zeros(1, 1, seq_len, seq_len).masked_fill(~allowed, float("-inf"))):
        torch.testing.assert_close(call(attn, hidden, mask, rotary, position_ids),
                                   call(ref_attn, hidden, mask, rotary, position_ids), **TOL)
    assert count_calls()["mla_varlen_attention"] == 2


def test_2d_padding_mask_as_flash_attention_passes_it(count_calls):
    ref_attn, attn, rotary = attention_pair("v2")
    mask2d = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    keep = mask2d.bool()
    mask4d = (torch.ones(6, 6, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]
    position_ids = torch.arange(6)[None]
    hidden = torch.randn(2, 6, 32)
    out = call(attn, hidden, mask2d, rotary, position_ids)
    assert count_calls()["mla_varlen_attention"] == 1
    torch.testing.assert_close(out[keep], call(ref_attn, hidden, mask4d, rotary, position_ids)[keep], **TOL)
    assert not out[~keep].any()  # our path leaves padding at 0
    # the same mask tensor edited in place is planned anew
    mask2d[1, 4] = 1
    keep = mask2d.bool()
    mask4d = (torch.ones(6, 6, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]
    out = call(attn, hidden, mask2d, rotary, position_ids)
    torch.testing.assert_close(out[keep], call(ref_attn, hidden, mask4d, rotary, position_ids)[keep], **TOL)


def test_other_masks_fall_back_to_transformers(count_calls):
    ref_attn, attn, rotary = attention_pair()
    seq_len = 6
    window = torch.ones(seq_len, seq_len, dtype=torch.bool).tril() & ~torch.ones(seq_len, seq_len,
                                                                                 dtype=torch.bool).tril(-3)
    bidirectional = torch.ones(seq_len, seq_len, dtype=torch.bool)
    position_ids = torch.arange(seq_len)[None]
    hidden = torch.randn(2, seq_len, 32, requires_grad=True)
    for allowed in (window, bidirectional):
        mask = allowed[None, None].expand(2, 1, seq_len, seq_len)
        torch.testing.assert_close(call(attn, hidden, mask, rotary, position_ids),
                                   call(ref_attn, hidden, mask, rotary, position_ids), **TOL)
    assert count_calls()["mla_varlen_attention"] == 0
    # an additive float mask with a finite bias is not a 0 / -inf pattern: transformers adds it
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    soft = torch.zeros(2, 1, seq_len, seq_len).masked_fill(~causal, -1.0)
    torch.testing.assert_close(call(attn, hidden, soft, rotary, position_ids),
                               call(ref_attn, hidden, soft, rotary, position_ids), **TOL)
    assert count_calls()["mla_varlen_attention"] == 0


def test_packing_without_a_mask_only_for_eager_and_sdpa():
    """Without a mask, flash kernels may split rows into sequences by position_ids: fall back."""
    cpu = torch.device("cpu")
    for implementation in ("flash_attention_2", "flex_attention", None):
        assert hf_module._build_packing(None, None, 2, 5, cpu, implementation) is None, implementation
    for implementation in ("eager", "sdpa"):
        plan = hf_module._build_packing(None, None, 2, 5, cpu, implementation)
        assert plan.rows is None and plan.cu_seqlens.tolist() == [0, 5, 10] and plan.max_seqlen == 5


def test_attention_dropout_in_training_falls_back_to_transformers(count_calls):
    prefix, extra = CONFIGS["v3"]
    config = transformers.DeepseekV3Config(**dict(COMMON, attention_dropout=0.1), **extra, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = patch_model(transformers.DeepseekV3ForCausalLM(config))
    ids, _ = random_batch()
    model.eval()(ids)
    assert count_calls()["mla_varlen_attention"] == 2
    model.train()(ids)
    assert count_calls()["mla_varlen_attention"] == 2  # dropout on the attention weights: transformers'


# ---- training ------------------------------------------------------------------------------------


def test_optimizer_step_updates_the_transformers_parameters():
    model = make_model("v3", seed=7).train()
    reference = copy.deepcopy(model)
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    kv_b = model.model.layers[0].self_attn.kv_b_proj.weight
    start = {"experts": experts.detach().clone(), "kv_b": kv_b.detach().clone()}
    patch_model(model)
    ids, labels = random_batch(seed=8)
    for m in (model, reference):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        m(ids, labels=labels).loss.backward()
        optimizer.step()
    assert model.model.layers[1].mlp.experts.gate_up_proj is experts
    assert model.model.layers[0].self_attn.kv_b_proj.weight is kv_b
    assert not torch.equal(experts.detach(), start["experts"])
    assert not torch.equal(kv_b.detach(), start["kv_b"])
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert int(model.model.layers[1].mlp.pop_tokens_per_expert().sum()) == ids.numel() * 2  # top-2 routing
