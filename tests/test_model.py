"""Tests of moe_align.models.DeepseekForCausalLM against transformers and naive float64 oracles."""

import pytest
import torch

from moe_align.models import DeepseekConfig, DeepseekForCausalLM

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _torch_backend(backend):
    """The ops' kernels are tested against oracles in their own tests; the model's tests check the
    wiring on the PyTorch paths, which keeps them fast on a CPU (the Triton interpreter is slow)."""
    backend("torch")

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2,
              n_shared_experts=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def _hf_pair(version):
    torch.manual_seed(0)
    if version == 3:
        cfg = transformers.DeepseekV3Config(**COMMON, n_group=2, topk_group=1, q_lora_rank=24,
                                            routed_scaling_factor=2.5)
        ref = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**COMMON, q_lora_rank=None, topk_method="greedy")
        ref = transformers.DeepseekV2ForCausalLM(cfg)
    ref = ref.float().eval()
    with torch.no_grad():  # make the norms and the V3 correction bias non-trivial
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.01 * torch.randn_like(b))
    model = DeepseekForCausalLM(cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


@torch.no_grad()
def _naive_logits(model, seqs):
    """Logits of each sequence run alone through full forwards, float64."""
    out = []
    for s in seqs:
        ids, cu, mx = model.pack([s])
        out.append((model(ids, cu, mx).double() @ model.lm_head.weight.double().T))
    return out


@pytest.mark.parametrize("version", [2, 3])
def test_state_dict_round_trip_and_logits_match_transformers(version):
    ref, model = _hf_pair(version)
    assert set(model.state_dict()) == set(ref.state_dict())
    for k, v in model.state_dict().items():
        assert v.shape == ref.state_dict()[k].shape, k
    ref.load_state_dict(model.state_dict(), strict=True)  # and back
    seqs = [[int(t) for t in torch.randint(0, VOCAB, (n,))] for n in (5, 1, 9)]
    ids, cu, mx = model.pack(seqs)
    with torch.no_grad():
        hidden = model(ids, cu, mx)
    ours = hidden @ model.lm_head.weight.T
    for i, s in enumerate(seqs):
        with torch.no_grad():
            theirs = ref(torch.tensor([s])).logits[0]
        torch.testing.assert_close(ours[cu[i]:cu[i + 1]], theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", [2, 3])
def test_loss_gradients_match_transformers(version):
    ref, model = _hf_pair(version)
    seq = [int(t) for t in torch.randint(0, VOCAB, (11,))]
    ids, cu, mx = model.pack([seq])
    model.loss(ids, cu, mx).backward()
    ref_loss = ref(torch.tensor([seq]), labels=torch.tensor([seq])).loss
    ref_loss.backward()
    torch.testing.assert_close(model.loss(ids, cu, mx), ref_loss, rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_logprobs_equal_each_sequence_alone_and_loss_matches_float64_oracle():
    torch.manual_seed(1)
    model = DeepseekForCausalLM("tiny")
    seqs = [[int(t) for t in torch.randint(0, 512, (n,))] for n in (6, 1, 13, 4)]
    ids, cu, mx = model.pack(seqs)
    labels = ids.clone()
    labels[cu[2]:cu[2] + 5] = -100  # a masked prompt
    with torch.no_grad():
        logp, targets = model.token_logprobs(ids, cu, mx, labels=labels)
        loss = model.loss(ids, cu, mx, labels=labels)
    dense = torch.cat(_naive_logits(model, seqs))  # [T, V] float64, oracle only
    kept, expected, total = 0, torch.zeros(len(ids), dtype=torch.float64), 0.0
    for t in range(len(ids)):
        seq = int(torch.searchsorted(cu[1:], t, right=True))
        if t + 1 < cu[seq + 1] and labels[t + 1] != -100:
            lse = torch.logsumexp(dense[t], 0)
            expected[t] = dense[t, labels[t + 1]] - lse
            total -= float(expected[t])
            kept += 1
    assert torch.equal(targets != -100, expected != 0)
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), torch.tensor(total / kept, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_shift_targets_at_one_token_and_empty_sequences():
    """Each sequence's last token has no target, also when the sequence is one token long (first
    in the pack included) or the pack holds empty sequences."""
    for lengths in ([1, 3, 1, 2], [0, 1, 4], [2, 0, 1, 1], [1]):
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        labels = torch.arange(10, 10 + sum(lengths))
        targets = DeepseekForCausalLM.shift_targets(labels, cu)
        expected, start = [], 0
        for n in lengths:
            expected += [int(labels[start + j + 1]) if j + 1 < n else -100 for j in range(n)]
            start += n
        assert targets.tolist() == expected, lengths


def test_labels_outside_the_vocabulary_raise_naming_labels():
    model = DeepseekForCausalLM("tiny")
    ids, cu, mx = model.pack([[1, 2, 3], [4, 5]])
    for bad in (-5, 512):
        labels = ids.clone()
        labels[1] = bad
        with pytest.raises(ValueError, match="labels"):
            model.token_logprobs(ids, cu, mx, labels=labels)
    labels = ids.clone()
    labels[0] = 600  # no token predicts the first one: not a target, no error
    model.token_logprobs(ids, cu, mx, labels=labels)


def _argmax_by_full_forwards(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(_naive_logits(model, [seq])[0][-1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("version", [2, 3])
def test_greedy_generation_through_cache_equals_full_forwards(version):
    _, model = _hf_pair(version)
    prompts = [[3, 14, 15], [9], [26, 53, 58, 97 - 1, 32, 38, 46], [2, 7]]
    out = model.generate(prompts, max_new_tokens=6, block_size=4)
    assert out == [_argmax_by_full_forwards(model, p, 6) for p in prompts]


def test_prefill_of_mixed_lengths_equals_each_prompt_alone():
    """Eval mode prefills each distinct prompt once, prompts of similar lengths in one right-padded
    step; training mode every prompt, a step per length, so that the MoE routers count real
    tokens only. The tokens are those of each prompt generated alone."""
    _, model = _hf_pair(3)
    prompts = [[5] * n for n in (4, 5, 5, 6, 1, 12, 4)]
    assert model._prefill_groups([len(p) for p in prompts], pad=True) == [[4], [0, 6, 1, 2, 3], [5]]
    assert model._prefill_groups([len(p) for p in prompts], pad=False) == [[4], [0, 6], [1, 2], [3], [5]]
    # padding may add at most a quarter to a group's tokens
    assert model._prefill_groups([3, 5], pad=True) == [[0, 1]]  # 10 <= 1.25 * 8
    assert model._prefill_groups([2, 5], pad=True) == [[0], [1]]  # 10 > 1.25 * 7
    prompts = [[3, 1, 4, 1], [5, 9, 2, 6, 5], [35, 8], [5, 9, 2, 6, 5], [9], [7] * 12, [3, 1, 4, 1], [2, 7, 1, 8]]
    alone = [model.generate([p], max_new_tokens=5)[0] for p in prompts]
    # repeated prompts are prefilled once (their copies fork the cache)
    assert model.generate(prompts, max_new_tokens=5) == alone
    model.train()
    moe = [layer.mlp for layer in model.model.layers[1:]]
    for m in moe:
        m.pop_tokens_per_expert()
    out = model.generate(prompts, max_new_tokens=5)
    assert out == alone
    fed = sum(len(p) for p in prompts) + sum(len(o) - 1 for o in out)  # the last token is never fed
    top_k = model.config.num_experts_per_tok
    assert all(int(m.pop_tokens_per_expert().sum()) == fed * top_k for m in moe)


def test_stop_tokens_and_max_new_tokens():
    torch.manual_seed(2)
    model = DeepseekForCausalLM("tiny")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    full = model.generate(prompts, max_new_tokens=8)
    assert [len(o) for o in full] == [8, 8]
    assert model.generate(prompts, max_new_tokens=0) == [[], []]
    stop = full[0][2]
    out = model.generate(prompts, max_new_tokens=8, stop_tokens=[stop])
    assert out[0] == full[0][:full[0].index(stop) + 1]
    assert out[1] == (full[1][:full[1].index(stop) + 1] if stop in full[1] else full[1])


def test_sampling_reproducible_with_generator():
    torch.manual_seed(3)
    model = DeepseekForCausalLM("tiny")
    prompts = [[1, 2, 3], [4]]
    kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.9)
    a = model.generate(prompts, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompts, generator=torch.Generator().manual_seed(7), **kw)
    assert a == b and all(0 <= t < 512 for o in a for t in o)
    # top_p -> 0 keeps only the top token: sampling becomes greedy
    tiny_p = model.generate(prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6,
                            generator=torch.Generator().manual_seed(0))
    assert tiny_p == model.generate(prompts, max_new_tokens=10)
    # temperature -> 0 sharpens softmax(logits / temperature) onto the top token: greedy too
    cold = model.generate(prompts, max_new_tokens=10, temperature=1e-5, generator=torch.Generator().manual_seed(0))
    assert cold == model.generate(prompts, max_new_tokens=10)


def _expected_params(c):
    """Parameter count of a DeepSeek config, counted naively from the shapes."""
    h, heads = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = (h * heads * qk if c.q_lora_rank is None
            else h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * qk)
    attn += h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    attn += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * h
    dense = 3 * h * c.intermediate_size
    moe = c.n_routed_experts * h + 3 * h * c.moe_intermediate_size * (c.n_routed_experts + c.n_shared_experts)
    k = c.first_k_dense_replace
    return (2 * c.vocab_size * h + h + c.num_hidden_layers * (attn + 2 * h) + k * dense
            + (c.num_hidden_layers - k) * moe)


@pytest.mark.parametrize("name,billions", [("deepseek-v2-lite", 15.7), ("deepseek-v2", 236), ("deepseek-v3", 671)])
def test_meta_presets_have_the_published_sizes(name, billions):
    model = DeepseekForCausalLM(name, device="meta")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    n = sum(p.numel() for p in params)
    assert n == _expected_params(model.config)
    assert abs(n / 1e9 - billions) / billions < 0.01, n
    layer = model.model.layers[-1]
    c = model.config
    assert layer.mlp.experts.gate_up_proj.shape == (c.n_routed_experts, 2 * c.moe_intermediate_size, c.hidden_size)
    assert model.lm_head.weight.shape == (c.vocab_size, c.hidden_size)


def test_bad_input_raises_clear_errors():
    model = DeepseekForCausalLM("tiny")
    ids, cu, mx = model.pack([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 512, 3, 4, 5]), cu, mx)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, -1, 3, 4, 5]), cu, mx)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, torch.tensor([0, 3, 4], dtype=torch.int32), mx)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids, torch.tensor([0, 4, 3, 5], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="cu_seqlens"):
        model(ids, cu.long(), mx)
    with pytest.raises(ValueError, match="max_seqlen"):
        model(ids, cu, 2)
    with pytest.raises(ValueError, match="prompts"):
        model.generate([[1], [600]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts"):
        model.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="preset"):
        DeepseekForCausalLM("deepseek-v9")


def test_config_from_transformers_config():
    cfg = transformers.DeepseekV3Config(**COMMON, q_lora_rank=24)
    ours = DeepseekConfig.from_config(cfg)
    assert ours.model_type == "deepseek_v3" and ours.q_lora_rank == 24 and ours.first_k_dense_replace == 1


def test_bf16_autocast_training_matches_fp32():
    """Under autocast the custom ops get bf16 inputs (cast by the modules) and gradients reach the
    fp32 parameters; log-probs agree with the fp32 run to bf16 accuracy."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(DeepseekConfig())
    ids, cu, max_seqlen = model.pack([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11]])
    ref, _ = model.token_logprobs(ids, cu, max_seqlen)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model.token_logprobs(ids, cu, max_seqlen)
    out.sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, name
        # bf16 has 8 bits of mantissa: compare gradients relative to their scale
        scale = ref_grads[name].abs().max().clamp(min=1e-6)
        assert (p.grad - ref_grads[name]).abs().max() <= 3e-2 * scale, name
