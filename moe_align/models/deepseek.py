"""A DeepSeek-V2/V3-style causal LM built only from moe_align modules.

The parameter names are those of transformers' ``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM``
(``model.embed_tokens``, ``model.layers.{i}.{input_layernorm,self_attn,post_attention_layernorm,mlp}``,
``model.norm``, ``lm_head``), so state dicts load strictly both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from moe_align.modules.mla import MLACache, MLAConfig, MLAttention, RMSNorm
from moe_align.modules.moe import DeepseekMoE, MoEConfig, SwiGLUMLP
from moe_align.ops._autocast import autocast_dtype
from moe_align.ops.logprobs import linear_logprobs

IGNORE_INDEX = -100


@dataclasses.dataclass
class DeepseekConfig:
    """Model configuration; field names as in transformers' DeepseekV2Config / DeepseekV3Config.

    Layers ``< first_k_dense_replace`` use a dense SwiGLU MLP of width ``intermediate_size``, the
    others a :class:`DeepseekMoE`. ``model_type`` is "deepseek_v3" (sigmoid router, ``noaux_tc``)
    or "deepseek_v2" (softmax router, ``topk_method`` "greedy" / "group_limited_greedy").
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int | None = 1
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    topk_method: str = "noaux_tc"
    model_type: str = "deepseek_v3"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.model_type not in ("deepseek_v2", "deepseek_v3"):
            raise ValueError(f"model_type must be 'deepseek_v2' or 'deepseek_v3', got {self.model_type!r}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=True is not supported (DeepSeek models do not tie)")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace={self.first_k_dense_replace} must be in "
                             f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.model_type == "deepseek_v3":
            self.topk_method = "noaux_tc"

    @classmethod
    def from_config(cls, config: Any) -> DeepseekConfig:
        """From a transformers DeepseekV2Config / DeepseekV3Config (duck-typed), or a DeepseekConfig."""
        if isinstance(config, DeepseekConfig):
            return config
        mla = MLAConfig.from_config(config)
        kwargs = {}
        for field in dataclasses.fields(cls):
            if hasattr(config, field.name):
                kwargs[field.name] = getattr(config, field.name)
        kwargs.update(rope_theta=mla.rope_theta, rope_scaling=mla.rope_scaling, rope_interleave=mla.rope_interleave)
        if kwargs.get("model_type") == "deepseek_v2":
            kwargs["norm_topk_prob"] = False  # transformers' V2 router ignores it
            kwargs.setdefault("topk_method", "greedy")
            if kwargs["topk_method"] is None:
                kwargs["topk_method"] = "greedy"
        if kwargs.get("routed_scaling_factor") is None:
            kwargs["routed_scaling_factor"] = 1.0
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str) -> DeepseekConfig:
        """One of :data:`PRESETS`: "tiny", "small", "medium" (train on a CPU), "deepseek-v2-lite",
        "deepseek-v2", "deepseek-v3" (full shapes; build them on the meta device)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**PRESETS[name])


_BIG_COMMON = dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                   max_position_embeddings=4096)
PRESETS: dict[str, dict] = {
    "tiny": dict(),
    # "small" learns the demo's arithmetic on 2 CPU cores in minutes; "medium" is the next size up.
    "small": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=32,
                  qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32, routed_scaling_factor=2.5),
    "medium": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, moe_intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=8, n_routed_experts=16, num_experts_per_tok=4,
                   n_shared_experts=1, n_group=4, topk_group=2, q_lora_rank=96, kv_lora_rank=64,
                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, routed_scaling_factor=2.5),
    "deepseek-v2-lite": dict(_BIG_COMMON, model_type="deepseek_v2", topk_method="greedy", vocab_size=102400,
                             hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                             num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
                             n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, q_lora_rank=None,
                             norm_topk_prob=False, routed_scaling_factor=1.0),
    "deepseek-v2": dict(_BIG_COMMON, model_type="deepseek_v2", topk_method="group_limited_greedy",
                        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                        num_hidden_layers=60, first_k_dense_replace=1, num_attention_heads=128,
                        n_routed_experts=160, num_experts_per_tok=6, n_shared_experts=2, n_group=8, topk_group=3,
                        q_lora_rank=1536, norm_topk_prob=False, routed_scaling_factor=16.0),
    "deepseek-v3": dict(_BIG_COMMON, model_type="deepseek_v3", topk_method="noaux_tc", vocab_size=129280,
                        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
                        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
                        q_lora_rank=1536, norm_topk_prob=True, routed_scaling_factor=2.5),
}


class DeepseekDecoderLayer(nn.Module):
    """``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``; mlp dense SwiGLU or DeepseekMoE."""

    def __init__(self, config: DeepseekConfig, layer_idx: int, *, device=None, dtype=None) -> None:
        super().__init__()
        f = dict(device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **f)
        self.self_attn = MLAttention(config, layer_idx, **f)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **f)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size,
                                 initializer_range=config.initializer_range, **f)
        else:
            self.mlp = DeepseekMoE(MoEConfig.from_config(config), **f)

    def forward(self, x: torch.Tensor, position_ids=None, *, cu_seqlens=None, max_seqlen=None,
                cache: MLACache | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), position_ids, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen, cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekModel(nn.Module):
    """Embedding, decoder layers and final norm (transformers' ``model.`` prefix)."""

    def __init__(self, config: DeepseekConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        f = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **f)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i, **f) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **f)


class DeepseekForCausalLM(nn.Module):
    """DeepSeek-style causal LM: ``lm_head(norm(layers(embed(ids))))``.

    Args:
        config: a :class:`DeepseekConfig`, a preset name (:data:`PRESETS`), or a transformers
            DeepseekV2Config / DeepseekV3Config (duck-typed).
        device, dtype: of the parameters (``device="meta"`` builds shapes only).

    Training (:meth:`forward`, :meth:`token_logprobs`, :meth:`loss`) runs on packed batches:
    ``input_ids [T]`` int64 holding N sequences delimited by ``cu_seqlens`` (int32 ``[N + 1]``,
    ``0 = c_0 <= ... <= c_N = T``) with ``max_seqlen >= max(c_{i+1} - c_i)``; a token attends only
    to earlier tokens of its own sequence. Log-probs go through the fused
    :func:`~moe_align.ops.logprobs.linear_logprobs` (no ``[T, V]`` logits).
    Generation (:meth:`generate`) runs through the paged latent cache (:class:`MLACache`).
    """

    def __init__(self, config: Any, *, device=None, dtype=None) -> None:
        super().__init__()
        config = DeepseekConfig.preset(config) if isinstance(config, str) else DeepseekConfig.from_config(config)
        self.config = config
        self.model = DeepseekModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if torch.device(device or "cpu").type != "meta":
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    # ---- argument checks -----------------------------------------------------------------

    def _check_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1:
            raise ValueError(f"input_ids must be a 1-D tensor [T] of packed tokens, got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids has token ids outside [0, vocab_size={vocab}): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [N + 1] with N >= 1")
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
        if cu_seqlens.device != input_ids.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, input_ids on {input_ids.device}")
        cu = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if cu[0] != 0 or cu[-1] != input_ids.shape[0] or min(lengths) < 0:
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={input_ids.shape[0]}, "
                             f"got {cu}")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen must be an int >= the longest sequence ({max(lengths)}), got {max_seqlen!r}")

    # ---- training ------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Packed ``input_ids [T]`` -> final (normed) hidden states ``[T, hidden]``.
        ``position_ids [T]`` default to ``0 ..`` within each sequence."""
        self._check_packed(input_ids, cu_seqlens, max_seqlen)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.model.norm(x)

    @staticmethod
    def shift_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Next-token targets of packed ``labels [T]``: ``targets[t] = labels[t + 1]`` within a
        sequence, ``ignore_index`` at each sequence's last token."""
        targets = torch.full_like(labels, ignore_index)
        targets[:-1] = labels[1:]
        ends = cu_seqlens[1:].long() - 1
        targets[ends[ends >= 0]] = ignore_index
        return targets

    def token_logprobs(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp [T] float32, targets [T])``: log-prob of each next token (``labels`` aligned with
        ``input_ids``, default ``input_ids``; ``ignore_index`` masks targets, e.g. prompts), 0 where
        the target is ignored. Computed by the fused log-prob op, never as ``[T, V]`` logits."""
        labels = input_ids if labels is None else labels
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        hidden = self(input_ids, cu_seqlens, max_seqlen, position_ids)
        targets = self.shift_targets(labels.long(), cu_seqlens, ignore_index)
        valid = targets != ignore_index
        if valid.any():
            bad = targets[valid]
            if int(bad.min()) < 0 or int(bad.max()) >= self.config.vocab_size:
                raise ValueError(f"labels has ids outside [0, vocab_size={self.config.vocab_size}) "
                                 f"other than ignore_index={ignore_index}")
        logp = linear_logprobs(hidden, self.lm_head.weight, targets, temperature=temperature,
                               ignore_index=ignore_index)
        return logp, targets

    def loss(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
             labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
             ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy: ``-sum(logp over kept targets)`` divided by their count
        (``reduction="mean"``; 0 when none is kept) or not (``"sum"``)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        logp, targets = self.token_logprobs(input_ids, cu_seqlens, max_seqlen, labels, position_ids, ignore_index)
        total = -logp.sum()
        if reduction == "sum":
            return total
        return total / (targets != ignore_index).sum().clamp(min=1)

    @staticmethod
    def pack(sequences: Sequence[Sequence[int]], device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(input_ids [T], cu_seqlens [N + 1] int32, max_seqlen)`` of a list of token lists."""
        lengths = [len(s) for s in sequences]
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.int64, device=device)
        cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
        return ids, cu, max(lengths, default=0)

    # ---- generation ----------------------------------------------------------------------

    def _cached_step(self, input_ids: torch.Tensor, cache: MLACache,
                     last: Sequence[int] | None = None) -> torch.Tensor:
        """``input_ids [B, s]`` of the sequences of ``cache.step`` -> final hidden states ``[B, hidden]``
        of each sequence's token ``last[b]`` (default: its last token)."""
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cache=cache)
        if last is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), torch.tensor(last, device=x.device)]
        return self.model.norm(x)

    @staticmethod
    def _prefill_groups(lengths: Sequence[int], pad: bool) -> list[list[int]]:
        """Indices of the prompts prefilled together: the prompts of one length, or with ``pad``,
        prompts of similar lengths (shortest first, as long as padding them to the longest adds at
        most a quarter to their tokens)."""
        groups: list[list[int]] = []
        tokens = 0  # prompt tokens of the last group
        for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
            n = lengths[i]
            group = groups[-1] if groups else []
            # padded to n, the group holds (len(group) + 1) * n tokens
            if group and (n == lengths[group[-1]] or pad and 4 * (len(group) + 1) * n <= 5 * (tokens + n)):
                group.append(i)
                tokens += n
            else:
                groups.append([i])
                tokens = n
        return groups

    def _next_tokens(self, hidden: torch.Tensor, temperature: float, top_p: float,
                     generator: torch.Generator | None) -> torch.Tensor:
        logits = (hidden @ self.lm_head.weight.t()).float()  # [B, V], this step only
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
                 block_size: int = 16) -> list[list[int]]:
        """Continue each prompt (token lists of any lengths >= 1) by up to ``max_new_tokens`` tokens.

        The prompts are prefilled into a paged :class:`MLACache`: in eval mode each distinct prompt
        once (its repeats copy its cache, see :meth:`MLACache.fork`), those of similar lengths in
        one step (right-padded to the longest: causal attention keeps the padding from the
        prompts' tokens, and it is cut from the cache); in training mode, where the MoE routers
        count the tokens, every prompt, a step per length. Then all unfinished sequences decode
        one token per step. ``temperature=0`` is greedy; otherwise sampling from
        ``softmax(logits / temperature)`` restricted to the top-p nucleus, drawn with
        ``generator``. A sequence stops after emitting a token of ``stop_tokens`` (kept in its
        output). Returns the new tokens of each prompt.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        vocab = self.config.vocab_size
        prompts = [list(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}] is empty")
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                raise ValueError(f"prompts[{i}] has token ids outside [0, vocab_size={vocab})")
        outputs: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens == 0 or not prompts:
            return outputs
        stop = set(stop_tokens)
        weight = self.lm_head.weight
        # A cache step feeds the same number of tokens to each of its sequences, and on a CPU a
        # step costs mostly per step, not per token: the prefill takes few steps. In eval mode a
        # prompt given several times (the G samples of a GRPO group) is prefilled once, its copies
        # fork its cache, and prompts of similar lengths share a right-padded step. In training
        # mode, where the MoE routers count the tokens they see, every prompt is prefilled, in
        # steps of one length.
        shared = not self.training
        lengths = [len(p) for p in prompts]
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(p), i) if shared else i for i, p in enumerate(prompts)]
        distinct = [i for i, s in enumerate(source) if s == i]
        groups = [[distinct[j] for j in group]
                  for group in self._prefill_groups([lengths[i] for i in distinct], pad=shared)]
        width = {i: lengths[group[-1]] for group in groups for i in group}  # the prefill step's length
        num_blocks = sum(-(-max(n + max_new_tokens, width.get(i, n)) // block_size) for i, n in enumerate(lengths))
        # under autocast (a bf16 rollout of fp32 weights) the cache holds autocast's dtype
        cache_dtype = autocast_dtype(weight.device) or weight.dtype
        cache = MLACache.for_config(self.config, len(self.model.layers), max(num_blocks, 1),
                                    block_size=block_size, dtype=cache_dtype, device=weight.device)
        seq_ids = {i: cache.add_sequence() for i in distinct}
        last = torch.empty(len(prompts), self.config.hidden_size, dtype=weight.dtype, device=weight.device)
        for indices in groups:
            step_len = width[indices[0]]
            cache.begin_step([seq_ids[i] for i in indices], step_len)
            ids = torch.tensor([prompts[i] + [0] * (step_len - lengths[i]) for i in indices], device=weight.device)
            ends = [lengths[i] - 1 for i in indices]
            last[indices] = self._cached_step(ids, cache, None if min(ends) == step_len - 1 else ends)
            for i in indices:
                if lengths[i] < step_len:
                    cache.truncate(seq_ids[i], lengths[i])
        if len(distinct) < len(prompts):
            seq_ids.update({i: cache.fork(seq_ids[s]) for i, s in enumerate(source) if s != i})
            last = last[source]
        tokens = self._next_tokens(last, temperature, top_p, generator).tolist()
        active = list(range(len(prompts)))
        for step in range(max_new_tokens):
            still = []
            for i, t in zip(active, tokens):
                outputs[i].append(t)
                if t not in stop and step + 1 < max_new_tokens:
                    still.append(i)
            active = still
            if not active:
                break
            cache.begin_step([seq_ids[i] for i in active], 1)
            ids = torch.tensor([outputs[i][-1] for i in active], device=weight.device)[:, None]
            tokens = self._next_tokens(self._cached_step(ids, cache), temperature, top_p, generator).tolist()
        return outputs
