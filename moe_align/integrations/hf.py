"""Run a transformers DeepseekV2/V3 model on moe_align's modules and ops, in place.

:func:`patch_model` swaps, inside a ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` (or
their base ``DeepseekV2Model`` / ``DeepseekV3Model``, or any other model of those two families):

- every ``DeepseekV2Attention`` / ``DeepseekV3Attention`` for an :class:`HFMLAttention` (our
  :class:`~moe_align.modules.MLAttention` behind transformers' call signature);
- every ``DeepseekV2Moe`` / ``DeepseekV3MoE`` for our :class:`~moe_align.modules.DeepseekMoE`;
- for causal LMs, the loss: ``forward(..., labels=...)`` computes transformers' causal-LM
  cross-entropy from the last hidden states with :func:`~moe_align.ops.linear_logprobs`, never
  materialising the ``[B, S, V]`` logits.

The new modules hold transformers' own ``nn.Parameter`` objects (and the V3 router's
``e_score_correction_bias`` buffer) under the same names: nothing is copied, the state dict keys
are unchanged, an optimizer built before or after patching updates the same tensors, and
``save_pretrained`` / ``load_state_dict`` work as before.

What runs on our kernels and what falls back to transformers' code:

- MoE layers: always ours (:func:`~moe_align.ops.grouped_topk` +
  :func:`~moe_align.ops.fused_experts`, shared experts as a SwiGLU MLP). The first
  ``first_k_dense_replace`` dense MLPs stay transformers'.
- Attention: ours (projections and RoPE of :class:`MLAttention`, then
  :func:`~moe_align.ops.mla_varlen_attention` on the packed non-padding tokens) when

  * it is called with keywords, as transformers' decoder layers do;
  * there is no KV cache, or this layer's part of it is empty (training, and the prefill of
    generation: the latents and roped keys are then written to the cache in transformers'
    layout, so later steps can read them);
  * the mask is None (``eager`` / ``sdpa``: plain causal attention per row), a 2-D ``[B, S]``
    padding mask (flash-attention implementations: each row's kept tokens form one sequence), or
    a 4-D ``[B, 1, S, S]`` boolean or additive (0 / -inf or dtype min) mask that is causal with
    key padding, left or right or anywhere, optionally block-diagonal (packed sequences): the
    structure is verified, once per forward, and shared by all layers;
  * no attention dropout applies (eval, or ``attention_dropout == 0``), and no flash-attention
    varlen kwargs (``cu_seq_lens_q``, ...) are passed.

  Anything else runs transformers' original attention forward on the same parameters: decode
  steps over a filled cache, flex-attention ``BlockMask``\\ s, masks of any other structure (e.g.
  sliding windows), a None mask under a flash/flex implementation, dropout in training. On our
  path the attention output at padding positions is 0 (transformers' values there attend to
  whatever the mask leaves and are meaningless); outputs at kept tokens match.
- Loss (``ForCausalLM`` models): ours when ``labels`` is given, ``logits_to_keep == 0``,
  ``lm_head`` is a bias-free ``nn.Linear`` and the model's ``loss_function`` is transformers'
  default ``ForCausalLMLoss``; the output then has ``logits=None``. ``num_items_in_batch``,
  ``shift_labels`` and ``ignore_index`` keyword arguments are honoured as transformers does.
  Without labels the original forward runs (logits as usual, e.g. for ``generate``).

Not supported on the patched parts: ``output_attentions`` (no attention weights are returned)
and ``output_router_logits`` (transformers records them with hooks on its router class).

Patching is idempotent: parts already patched are left alone, so a second call with the same
flags is a no-op, and a later call can add parts the first one left out.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_align.modules.mla import MLAttention
from moe_align.modules.moe import DeepseekMoE
from moe_align.ops.logprobs import linear_logprobs

__all__ = ["HFMLAttention", "causal_lm_loss", "patch_model"]

_PATCHED = "_moe_align_patched"  # model attribute: the set of parts patched so far
_PLANNER = "_moe_align_planner"
_FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# transformers 5.24 renamed the KV cache argument and output field ``past_key_values`` to ``cache``
# (the old name is deprecated until 5.40); both are read, and the installed version's is passed.
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_of(kwargs: dict) -> Any:
    """The KV cache passed to a transformers forward under either of its names (or None)."""
    return next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)


class _DeepseekClasses(NamedTuple):
    pretrained: tuple[type, ...]
    attention: tuple[type, ...]
    moe: tuple[type, ...]
    v2_attention: type
    causal_lm_loss: Any
    cache_name: str  # the KV cache's argument and output field: "cache" or "past_key_values"


@functools.cache
def _deepseek_classes() -> _DeepseekClasses | None:
    """transformers' DeepseekV2/V3 classes, or None when transformers is not installed."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    except ImportError:
        return None
    return _DeepseekClasses(
        pretrained=(v2.DeepseekV2PreTrainedModel, v3.DeepseekV3PreTrainedModel),
        attention=(v2.DeepseekV2Attention, v3.DeepseekV3Attention),
        moe=(v2.DeepseekV2Moe, v3.DeepseekV3MoE),
        v2_attention=v2.DeepseekV2Attention,
        causal_lm_loss=ForCausalLMLoss,
        cache_name="cache" if "cache" in inspect.signature(v3.DeepseekV3Model.forward).parameters
        else "past_key_values",
    )


# ---- parameter adoption --------------------------------------------------------------------------


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def _adopt(ours: nn.Module, theirs: nn.Module) -> None:
    """Make every parameter and buffer of ``theirs`` the very tensor of ``ours`` with the same name.

    ``ours`` is built on the meta device; its parameter names must be exactly those of ``theirs``,
    and every buffer of ``theirs`` must exist in ``ours`` (``ours`` may have more buffers,
    materialised by the caller).
    """
    our_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    if our_params.keys() != their_params.keys():
        raise ValueError(
            f"cannot adopt the parameters of {type(theirs).__name__}: names only in ours "
            f"{sorted(our_params.keys() - their_params.keys())}, only in transformers' "
            f"{sorted(their_params.keys() - our_params.keys())}"
        )
    our_buffers = dict(ours.named_buffers())
    tensors = [(name, t, our_params) for name, t in their_params.items()]
    tensors += [(name, t, our_buffers) for name, t in theirs.named_buffers()]
    for name, tensor, our_tensors in tensors:
        if name not in our_tensors or our_tensors[name].shape != tensor.shape:
            got = None if name not in our_tensors else tuple(our_tensors[name].shape)
            raise ValueError(f"{type(theirs).__name__}.{name}: transformers' shape {tuple(tensor.shape)}, ours {got}")
        owner, leaf = _owner(ours, name)
        setattr(owner, leaf, tensor)
    _match_order(ours, theirs)


def _match_order(ours: nn.Module, theirs: nn.Module) -> None:
    """Order ours' submodules, parameters and buffers as theirs (``parameters()`` and the state
    dict then list them in transformers' order, so optimizer states saved before patching load)."""
    for attr in ("_modules", "_parameters", "_buffers"):
        mine, order = getattr(ours, attr), list(getattr(theirs, attr))
        ranked = sorted(mine.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
        mine.clear()
        mine.update(ranked)
    for name, child in ours.named_children():
        their_child = getattr(theirs, name, None)
        if isinstance(their_child, nn.Module):
            _match_order(child, their_child)


def _check_materialized(module: nn.Module) -> None:
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise AssertionError(f"{type(module).__name__}: tensors left on the meta device: {left}")


# ---- packing: transformers' padded batch -> our varlen layout ------------------------------------


class _Packing(NamedTuple):
    """How one forward's ``[B, S]`` tokens map onto packed sequences.

    ``rows`` int64 ``[T]``: flat index ``b * S + s`` of each kept token, in packed order (None:
    all ``B * S`` tokens, in order); ``positions`` int64 ``[B * S]``: the RoPE position of every
    token (padding included); ``cu_seqlens`` int32 ``[N + 1]`` and ``max_seqlen`` of the packed
    sequences.
    """

    rows: torch.Tensor | None
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def _segments_from_4d_mask(mask: torch.Tensor, batch: int, seq_len: int):
    """``(keep [B, S] bool, segment [B, S] int64)`` if ``mask [B, 1, S, S]`` is causal with key
    padding and block-diagonal segments (rows of dropped queries are not checked), else None.

    A query is kept when it may attend to itself; it starts a segment when it attends to no
    earlier key.
    """
    if tuple(mask.shape) != (batch, 1, seq_len, seq_len):
        return None
    m = mask[:, 0]
    if m.dtype == torch.bool:
        allowed, well_formed = m, None
    elif m.is_floating_point():
        allowed = m == 0
        well_formed = allowed | (m <= torch.finfo(m.dtype).min)  # 0 or -inf / dtype min, nothing else
    else:
        return None
    keep = allowed.diagonal(dim1=-2, dim2=-1)
    idx = torch.arange(seq_len, device=m.device)
    first_key = allowed.to(torch.uint8).argmax(dim=-1)  # the first maximum: the earliest allowed key
    segment = (keep & (first_key == idx)).long().cumsum(dim=-1)
    expected = (
        (idx[:, None] >= idx[None, :])
        & keep[:, None, :]
        & (segment[:, :, None] == segment[:, None, :])
    )
    ok = (allowed == expected) | ~keep[:, :, None]
    if well_formed is not None:
        ok &= well_formed
    if not bool(ok.all()):
        return None
    return keep, segment


def _build_packing(attention_mask, position_ids, batch: int, seq_len: int, device: torch.device,
                   implementation: str | None) -> _Packing | None:
    if position_ids is None:
        positions = torch.arange(seq_len, device=device).repeat(batch)
    elif (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
          or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch)):
        return None
    else:
        positions = position_ids.to(device=device, dtype=torch.long).expand(batch, seq_len).reshape(-1)

    keep = segment = None
    if attention_mask is None:
        if implementation not in ("eager", "sdpa"):
            return None  # flash kernels may split rows into sequences by position_ids
    elif not isinstance(attention_mask, torch.Tensor):
        return None  # e.g. flex attention's BlockMask
    elif attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, seq_len):
            return None
        keep = attention_mask.to(device).bool()
    elif attention_mask.dim() == 4:
        found = _segments_from_4d_mask(attention_mask.to(device), batch, seq_len)
        if found is None:
            return None
        keep, segment = found
    else:
        return None

    if keep is None:
        cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
        return _Packing(None, positions, cu_seqlens, seq_len)
    rows = keep.reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    if segment is None:
        segment = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    # Globally unique segment ids (row-major), constant along each packed sequence.
    global_segment = (torch.arange(batch, device=device)[:, None] * (seq_len + 1) + segment).reshape(-1)[rows]
    _, lengths = torch.unique_consecutive(global_segment, return_counts=True)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return _Packing(None if rows.numel() == batch * seq_len else rows, positions, cu_seqlens,
                    int(lengths.max()))


class _PackingPlanner:
    """Builds the :class:`_Packing` of a forward once and hands it to every layer.

    All layers of a forward get the same mask and position tensors: the last plan is reused while
    they are the same objects at the same version (so the mask is checked, and the host reads
    ``max_seqlen``, once per forward, and again only for a recomputation with other inputs).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._plan: _Packing | None = None

    @staticmethod
    def _make_key(*items) -> tuple:
        return tuple((x, x._version) if isinstance(x, torch.Tensor) else (x, None) for x in items)

    def plan(self, attention_mask, position_ids, batch: int, seq_len: int, device: torch.device,
             implementation: str | None) -> _Packing | None:
        key = self._make_key(attention_mask, position_ids, batch, seq_len, device, implementation)
        if self._key is not None and all(
            (a is b if isinstance(a, torch.Tensor) else a == b) and va == vb
            for (a, va), (b, vb) in zip(self._key, key)
        ):
            return self._plan
        with torch.no_grad():
            plan = _build_packing(attention_mask, position_ids, batch, seq_len, device, implementation)
        self._key, self._plan = key, plan
        return plan


# ---- attention -----------------------------------------------------------------------------------


class HFMLAttention(MLAttention):
    """:class:`~moe_align.modules.MLAttention` with the call signature of transformers'
    ``DeepseekV2Attention`` / ``DeepseekV3Attention``, sharing that module's parameters.

    Built by :func:`patch_model` from the transformers module (which it keeps, unregistered, for
    the cases it hands back to transformers; see the module docstring).

    Forward (as transformers' decoder layers call it, with keywords): ``hidden_states
    [B, S, hidden]``, ``attention_mask`` (None, ``[B, S]`` or ``[B, 1, S, S_kv]``),
    ``position_ids [1 or B, S]``, ``cache`` (``past_key_values`` before transformers 5.24: a
    transformers ``Cache`` or None),
    ``position_embeddings`` (unused on our path: RoPE is recomputed from ``position_ids`` with the
    same frequencies), other kwargs -> ``(attn_output [B, S, hidden], None)``.
    """

    def __init__(self, hf_attention: nn.Module, planner: _PackingPlanner, *, v2_rope_layout: bool) -> None:
        hf_config = hf_attention.config
        super().__init__(hf_config, hf_attention.layer_idx, device="meta")
        if not math.isclose(self.softmax_scale, hf_attention.scaling, rel_tol=1e-9):
            raise ValueError(
                f"softmax scale {self.softmax_scale} differs from transformers' {hf_attention.scaling} "
                f"(rope_parameters={getattr(hf_config, 'rope_parameters', None)})"
            )
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            dim = getattr(self, name)
            if dim % 16:  # the tile size of mla_varlen_attention
                raise ValueError(f"{name}={dim}: our MLA kernels need head dimensions that are multiples of 16")
        _adopt(self, hf_attention)
        device = self.kv_b_proj.weight.device
        self.inv_freq = self.config.rope_frequencies()[0].to(device)
        for name in ("q_a_layernorm", "kv_a_layernorm"):
            if hasattr(self, name):
                getattr(self, name).variance_epsilon = getattr(hf_attention, name).variance_epsilon
        _check_materialized(self)
        self.train(hf_attention.training)
        # Plain attributes, not submodules: the parameters stay registered once, under our names.
        object.__setattr__(self, "_hf_attention", hf_attention)
        self._hf_config = hf_config
        self._planner = planner
        # transformers' DeepSeek-V2 keeps roped pairs interleaved; our (and V3's) layout
        # de-interleaves them. Only the KV cache we write must follow transformers' layout.
        self._v2_rope_layout = v2_rope_layout
        self._shared_names = [name for name, _ in hf_attention.named_parameters()]

    # ---- transformers' own forward, for the cases we do not handle ------------------------------

    def _hf_forward(self, hidden_states, *args, **kwargs):
        hf = self._hf_attention
        for name in self._shared_names:  # rebind, in case our parameters were replaced since
            owner, leaf = _owner(self, name)
            hf_owner, _ = _owner(hf, name)
            setattr(hf_owner, leaf, getattr(owner, leaf))
        if hf.training != self.training:
            hf.train(self.training)
        return hf(hidden_states, *args, **kwargs)

    def _packing(self, hidden_states: torch.Tensor, attention_mask, kwargs: dict) -> _Packing | None:
        """The packing of this call, or None when transformers' forward must run."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            return None
        if self.training and self.config.attention_dropout > 0:
            return None
        if any(kwargs.get(name) is not None for name in _FLASH_VARLEN_KWARGS):
            return None
        cache = _cache_of(kwargs)
        if cache is not None and cache.get_seq_length(self.layer_idx) != 0:
            return None
        batch, seq_len, _ = hidden_states.shape
        return self._planner.plan(attention_mask, kwargs.get("position_ids"), batch, seq_len,
                                  hidden_states.device, getattr(self._hf_config, "_attn_implementation", None))

    def _write_cache(self, cache, latent: torch.Tensor, k_rope: torch.Tensor, batch: int, seq_len: int) -> None:
        """Append the layer's normalised latents and roped keys (all ``B * S`` tokens) to a
        transformers cache, shaped ``[B, 1, S, D]`` as its attention does."""
        if self._v2_rope_layout:
            half = k_rope.shape[-1] // 2
            k_rope = torch.stack((k_rope[:, :half], k_rope[:, half:]), dim=-1).flatten(1)
        cache.update(latent.view(batch, 1, seq_len, -1), k_rope.view(batch, 1, seq_len, -1), self.layer_idx)

    def forward(self, hidden_states: torch.Tensor, *args, attention_mask=None, **kwargs):
        plan = None if args else self._packing(hidden_states, attention_mask, kwargs)
        if plan is None:
            return self._hf_forward(hidden_states, *args, attention_mask=attention_mask, **kwargs)
        batch, seq_len, hidden = hidden_states.shape
        cache = _cache_of(kwargs)
        x, positions, rows = hidden_states.reshape(batch * seq_len, hidden), plan.positions, plan.rows
        if cache is None and rows is not None:  # padding needs no projections
            x, positions = x[rows], positions[rows]
        # MLAttention's packed forward, split to write the cache between projection and attention.
        q_nope, q_rope, latent, k_rope = self._project(x, positions)
        if cache is not None:
            self._write_cache(cache, latent, k_rope, batch, seq_len)
            if rows is not None:
                q_nope, q_rope, latent, k_rope = q_nope[rows], q_rope[rows], latent[rows], k_rope[rows]
        out = self.o_proj(self._attend(q_nope, q_rope, latent, k_rope, plan.cu_seqlens, plan.max_seqlen))
        if rows is not None:
            out = out.new_zeros(batch * seq_len, hidden).index_copy(0, rows, out)
        return out.view(batch, seq_len, hidden), None


def _moe_from_hf(hf_moe: nn.Module, config: Any) -> DeepseekMoE:
    """Our DeepseekMoE holding the parameters (and V3 correction bias) of transformers' MoE."""
    moe = DeepseekMoE(config, device="meta")
    _adopt(moe, hf_moe)
    gate = moe.gate
    gate.tokens_per_expert = torch.zeros(gate.num_experts, dtype=torch.int64, device=gate.weight.device)
    _check_materialized(moe)
    moe.train(hf_moe.training)
    return moe


# ---- loss ----------------------------------------------------------------------------------------


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` from the last hidden states, without the logits.

    ``hidden_states [B, S, H]`` (any float dtype), ``lm_head_weight [V, H]`` (same dtype),
    ``labels`` int ``[B, S]`` (token ``s`` predicts ``labels[:, s + 1]``; ``ignore_index`` masks)
    or ``shift_labels [B, S]`` (already shifted). Returns the fp32 scalar::

        loss = -sum_{b,s: y_bs != ignore} log softmax(W h_bs)[y_bs] / D

    with ``y`` the shifted labels (``ignore_index`` at the last position) and ``D`` the number of
    kept targets, or ``num_items_in_batch`` when given (gradient accumulation). The log-probs come
    from :func:`~moe_align.ops.linear_logprobs` (the ``[B, S, V]`` logits never exist).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden_states.device)
    # under autocast the head runs in its dtype, as transformers' lm_head Linear would
    logp = linear_logprobs(hidden_states, lm_head_weight, targets, ignore_index=ignore_index)
    total = -logp.sum()
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _fused_loss_forward(
    self,
    hf_forward,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    cache=None,
    **kwargs,
):
    """``ForCausalLM.forward`` with the loss from :func:`causal_lm_loss` (``logits=None``)
    whenever labels are given and the fused loss computes what transformers would; otherwise
    ``hf_forward`` (an instance-level forward found at patching time) or the class's forward.
    The KV cache may come as ``cache`` or ``past_key_values``; it is passed on under the name the
    installed transformers declares."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as cache or as past_key_values, not both")
    cache = cache if cache is not None else past_key_values
    args = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, use_cache=use_cache)
    classes = _deepseek_classes()
    head = self.lm_head
    fused = (
        labels is not None
        and isinstance(logits_to_keep, int) and logits_to_keep == 0
        and isinstance(head, nn.Linear) and head.bias is None
        and classes is not None and self.loss_function is classes.causal_lm_loss
    )
    args[classes.cache_name if classes is not None else "past_key_values"] = cache
    if not fused:
        forward = hf_forward if hf_forward is not None else type(self).forward.__get__(self)
        return forward(**args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.model(**args, **kwargs)
    loss = causal_lm_loss(
        outputs.last_hidden_state, head.weight, labels,
        ignore_index=kwargs.get("ignore_index", -100),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        shift_labels=kwargs.get("shift_labels"),
    )
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    result = MoeCausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        router_logits=getattr(outputs, "router_logits", None),
        **{classes.cache_name: getattr(outputs, classes.cache_name)},
    )
    return result if return_dict else result.to_tuple()


class _FusedLossForward:
    """The ``forward`` :func:`patch_model` sets on a causal LM instance.

    An object rather than a bound method so that the model still pickles and deep-copies (onto
    the copy); it reports the original forward's signature, which transformers' ``generate`` and
    ``Trainer`` inspect (e.g. to keep the ``labels`` column).
    """

    def __init__(self, owner: nn.Module, hf_forward=None) -> None:
        self.owner, self.hf_forward = owner, hf_forward

    def __call__(self, *args, **kwargs):
        return _fused_loss_forward(self.owner, self.hf_forward, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.hf_forward or type(self.owner).forward.__get__(self.owner))


# ---- entry point ---------------------------------------------------------------------------------


def patch_model(model: nn.Module, attention: bool = True, moe: bool = True, loss: bool = True) -> nn.Module:
    """Swap moe_align's modules and fused loss into a transformers DeepseekV2/V3 model, in place.

    Args:
        model: a transformers DeepseekV2/DeepseekV3 model (``DeepseekV3ForCausalLM``,
            ``DeepseekV2Model``, ...), any dtype and device.
        attention: replace each MLA attention by an :class:`HFMLAttention`.
        moe: replace each MoE layer by a :class:`~moe_align.modules.DeepseekMoE`.
        loss: for causal LMs, compute the loss of ``forward(..., labels=...)`` with
            :func:`causal_lm_loss` (ignored for models without an ``lm_head``).

    Returns ``model`` itself. Its parameters are the same ``nn.Parameter`` objects as before
    (shared, not copied) under the same names; forward outputs at non-padding tokens, losses and
    gradients equal the unpatched model's up to floating-point rounding. Which calls run our
    kernels and which fall back to transformers is listed in this module's docstring.

    Idempotent: parts already patched are skipped (see the module docstring).

    Raises:
        TypeError: ``model`` is not a transformers DeepseekV2/V3 model, or a flag is not a bool.
        ValueError: a layer's configuration is one our modules do not implement (e.g. a RoPE type
            other than default/YaRN, a non-SwiGLU expert): nothing is patched then.
    """
    classes = _deepseek_classes()
    if classes is None or not isinstance(model, classes.pretrained):
        raise TypeError(
            "model must be a transformers DeepseekV2/DeepseekV3 model (e.g. DeepseekV3ForCausalLM), "
            f"got {type(model).__name__}"
        )
    for name, flag in (("attention", attention), ("moe", moe), ("loss", loss)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    config = model.config
    planner = getattr(model, _PLANNER, None) or _PackingPlanner()

    # Build every replacement first, so an unsupported layer leaves the model untouched.
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if attention and isinstance(child, classes.attention):
                try:
                    new = HFMLAttention(child, planner, v2_rope_layout=isinstance(child, classes.v2_attention))
                except ValueError as err:
                    raise ValueError(f"cannot patch attention {type(child).__name__}: {err} "
                                     "(patch_model(..., attention=False) keeps transformers' attention)") from err
                swaps.append((parent, child_name, new))
            elif moe and isinstance(child, classes.moe):
                try:
                    new = _moe_from_hf(child, config)
                except ValueError as err:
                    raise ValueError(f"cannot patch {type(child).__name__}: {err} "
                                     "(patch_model(..., moe=False) keeps transformers' MoE)") from err
                swaps.append((parent, child_name, new))
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)

    patched = set(getattr(model, _PATCHED, ()))
    if attention:
        patched.add("attention")
        setattr(model, _PLANNER, planner)
    if moe:
        patched.add("moe")
    if loss and "loss" not in patched and isinstance(getattr(model, "lm_head", None), nn.Module) \
            and hasattr(model, "model"):
        model.forward = _FusedLossForward(model, model.__dict__.get("forward"))
        patched.add("loss")
    setattr(model, _PATCHED, patched)
    return model
