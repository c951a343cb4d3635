"""DeepSeekMoE layer: a linear router, routed experts and shared experts (DeepSeek-V2 and V3).

A drop-in for transformers' ``DeepseekV2Moe`` / ``DeepseekV3MoE``: the same parameter names and
shapes (``load_state_dict(strict=True)`` works both ways) and the same routing semantics. The
math lives in the ops: :func:`~moe_align.ops.gate.grouped_topk` routes and
:func:`~moe_align.ops.fused_moe.fused_experts` runs the routed experts. This file holds the fp32
linear router, the shared-expert SwiGLU MLP, and the routing statistics a trainer needs for load
balance (token counts per expert, optionally the last routing for the balance losses).

transformers is not a dependency: configs are duck-typed. ``model_type`` ("deepseek_v2" /
"deepseek_v3") or, without one, ``topk_method`` tells the two routers apart:

- V2 (``topk_method`` "greedy" or "group_limited_greedy"): softmax scores, groups ranked by their
  best expert (group-limited only), no renormalisation (transformers' V2 ignores
  ``norm_topk_prob``), weights times ``routed_scaling_factor``.
- V3 (``topk_method`` "noaux_tc"): sigmoid scores, ``e_score_correction_bias`` added for the
  choice only, groups ranked by the sum of their two best experts, weights renormalised when
  ``norm_topk_prob``, times ``routed_scaling_factor``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_align.ops._autocast import autocast_dtype
from moe_align.ops.fused_moe import fused_experts
from moe_align.ops.gate import grouped_topk
from moe_align.ops.load_balance import update_correction_bias_

__all__ = [
    "DeepseekMoE",
    "MoEConfig",
    "MoEGate",
    "MoERouting",
    "RoutedExperts",
    "SwiGLUMLP",
    "update_correction_biases_",
]

V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
V3_TOPK_METHOD = "noaux_tc"
_V2_MODEL_TYPE, _V3_MODEL_TYPE = "deepseek_v2", "deepseek_v3"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass
class MoEConfig:
    """The fields of a DeepSeek MoE layer, named as in transformers' DeepseekV2/V3Config.

    ``topk_method`` picks the router: "greedy" or "group_limited_greedy" (DeepSeek-V2, softmax)
    or "noaux_tc" (DeepSeek-V3, sigmoid + ``e_score_correction_bias``). ``scoring_func`` may be
    left None (it follows from ``topk_method``); a value that contradicts it is an error.
    ``n_group`` / ``topk_group`` of None mean one group (all experts). ``norm_topk_prob`` is a
    V3 option: transformers' V2 router never renormalises, so True with a V2 method is refused
    here (:meth:`from_config` drops it from a DeepseekV2Config, as transformers ignores it).

    Invalid combinations (``n_group`` not dividing ``n_routed_experts``, ``topk_group`` outside
    ``[1, n_group]``, more experts per token than the kept groups hold, ...) raise ValueError.
    """

    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int | None = None
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    scoring_func: str | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"):
            _positive_int(name, getattr(self, name))
        if self.topk_method not in (*V2_TOPK_METHODS, V3_TOPK_METHOD):
            raise ValueError(
                f"topk_method={self.topk_method!r} must be one of {(*V2_TOPK_METHODS, V3_TOPK_METHOD)}"
            )
        expected_scoring = "sigmoid" if self.is_v3 else "softmax"
        if self.scoring_func is None:
            self.scoring_func = expected_scoring
        elif self.scoring_func != expected_scoring:
            raise ValueError(
                f"scoring_func={self.scoring_func!r} does not fit topk_method={self.topk_method!r}, "
                f"which scores with {expected_scoring!r}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU experts) is supported")
        if self.n_shared_experts is None:
            self.n_shared_experts = 0
        if isinstance(self.n_shared_experts, bool) or not isinstance(self.n_shared_experts, int) \
                or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be a non-negative int, got {self.n_shared_experts!r}")
        if self.norm_topk_prob and not self.is_v3:
            raise ValueError(
                f"norm_topk_prob=True with topk_method={self.topk_method!r}: DeepSeek-V2's router "
                "(as in transformers) never renormalises the weights; use topk_method='noaux_tc' or "
                "set norm_topk_prob=False"
            )
        self.norm_topk_prob = bool(self.norm_topk_prob)
        self.routed_scaling_factor = float(self.routed_scaling_factor)

        num_experts, top_k = self.n_routed_experts, self.num_experts_per_tok
        n_group, topk_group = self.routing_groups
        if num_experts % n_group:
            raise ValueError(f"n_group={n_group} must divide n_routed_experts={num_experts}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        reachable = topk_group * (num_experts // n_group)
        if top_k > reachable:
            raise ValueError(
                f"num_experts_per_tok={top_k} exceeds the {reachable} experts of the "
                f"topk_group={topk_group} groups kept per token"
            )
        if self.is_v3 and n_group > 1 and num_experts // n_group < 2:
            raise ValueError(
                f"topk_method='noaux_tc' ranks groups by their two best experts: each of the "
                f"n_group={n_group} groups needs >= 2 of the {num_experts} experts"
            )

    @property
    def is_v3(self) -> bool:
        return self.topk_method == V3_TOPK_METHOD

    @property
    def model_type(self) -> str:
        """The transformers model type whose MoE this config describes."""
        return _V3_MODEL_TYPE if self.is_v3 else _V2_MODEL_TYPE

    @property
    def routing_groups(self) -> tuple[int, int]:
        """``(n_group, topk_group)`` as the router uses them; greedy routing has one group."""
        if self.topk_method == "greedy":
            return 1, 1
        n_group = 1 if self.n_group is None else _positive_int("n_group", self.n_group)
        topk_group = n_group if self.topk_group is None else _positive_int("topk_group", self.topk_group)
        return n_group, topk_group

    @classmethod
    def from_config(cls, config: Any) -> MoEConfig:
        """A MoEConfig from a transformers DeepseekV2Config / DeepseekV3Config (duck-typed), or
        from any object with the same field names and a ``topk_method``.

        ``model_type`` "deepseek_v3" means V3 routing whatever ``topk_method`` says (transformers'
        V3 has a single router); "deepseek_v2" needs a V2 ``topk_method`` and drops
        ``norm_topk_prob`` (transformers' V2 ignores it).
        """
        if isinstance(config, MoEConfig):
            return config
        model_type = getattr(config, "model_type", None)
        topk_method = getattr(config, "topk_method", None)
        norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        if model_type == _V3_MODEL_TYPE:
            topk_method = V3_TOPK_METHOD
        elif model_type == _V2_MODEL_TYPE:
            topk_method = "greedy" if topk_method is None else topk_method
            if topk_method not in V2_TOPK_METHODS:
                raise ValueError(
                    f"a deepseek_v2 config with topk_method={topk_method!r}: transformers' "
                    f"DeepseekV2 router supports {V2_TOPK_METHODS}"
                )
            norm_topk_prob = False
        elif topk_method is None:
            raise ValueError(
                f"cannot tell the router of config {type(config).__name__}: it has neither "
                f"model_type 'deepseek_v2'/'deepseek_v3' nor a topk_method"
            )
        missing = [
            name for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
            if getattr(config, name, None) is None
        ]
        if missing:
            raise ValueError(f"config {type(config).__name__} lacks {', '.join(missing)}")
        scale = getattr(config, "routed_scaling_factor", None)
        return cls(
            hidden_size=config.hidden_size,
            moe_intermediate_size=config.moe_intermediate_size,
            n_routed_experts=config.n_routed_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            n_shared_experts=getattr(config, "n_shared_experts", None),
            n_group=getattr(config, "n_group", None),
            topk_group=getattr(config, "topk_group", None),
            norm_topk_prob=norm_topk_prob,
            routed_scaling_factor=1.0 if scale is None else scale,
            topk_method=topk_method,
            scoring_func=getattr(config, "scoring_func", None),
            hidden_act=getattr(config, "hidden_act", "silu"),
            initializer_range=getattr(config, "initializer_range", 0.02),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


class MoERouting(NamedTuple):
    """One forward's routing, kept for the balance losses (see :attr:`DeepseekMoE.record_routing`).

    ``router_logits`` fp32 ``[N, E]``; ``scores`` fp32 ``[N, E]`` (softmax or sigmoid of the
    logits, differentiable: the ``s`` of ``expert_balance_loss`` / ``sequence_balance_loss``);
    ``topk_weights`` fp32 ``[N, K]``; ``topk_ids`` int32 ``[N, K]``. ``N`` counts the tokens of
    the flattened input.
    """

    router_logits: torch.Tensor
    scores: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


class MoEGate(nn.Module):
    """The router: ``logits = x W^T`` in fp32, then :func:`grouped_topk`.

    Parameters/buffers (transformers' names): ``weight`` ``[E, H]``; V3 only:
    ``e_score_correction_bias`` fp32 ``[E]``, kept in fp32 when the module is cast (as
    transformers' ``_keep_in_fp32_modules_strict`` does). Non-persistent buffer
    ``tokens_per_expert`` int64 ``[E]``: routed (token, k) pairs per expert, accumulated by
    every forward in training mode; read and zero it with :meth:`pop_tokens_per_expert`.
    """

    def __init__(self, config: Any, *, device=None, dtype=None) -> None:
        super().__init__()
        config = MoEConfig.from_config(config)
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.hidden_size = config.hidden_size
        self.initializer_range = config.initializer_range
        self.is_v3 = config.is_v3
        n_group, topk_group = config.routing_groups
        self.routing_kwargs = dict(
            n_group=n_group,
            topk_group=topk_group,
            scoring_func=config.scoring_func,
            group_score="top2_sum" if config.is_v3 else "max",
            renormalize=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor,
        )
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, **factory))
        if self.is_v3:
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(self.num_experts, device=device, dtype=torch.float32)
            )
        else:
            self.e_score_correction_bias = None
        self.register_buffer(
            "tokens_per_expert", torch.zeros(self.num_experts, device=device, dtype=torch.int64), persistent=False
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.initializer_range)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()
        self.tokens_per_expert.zero_()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        bias = self._buffers.get("e_score_correction_bias")
        if bias is not None and bias.dtype != torch.float32:
            self._buffers["e_score_correction_bias"] = bias.float()
        return self

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states [N, H]`` -> ``(router_logits fp32 [N, E], topk_weights fp32 [N, K],
        topk_ids int32 [N, K])``, the outputs of transformers' routers (ids there are int64)."""
        with torch.autocast(hidden_states.device.type, enabled=False):  # autocast would make it bf16
            router_logits = F.linear(hidden_states.float(), self.weight.float())
        bias = self.e_score_correction_bias
        topk_weights, topk_ids = grouped_topk(
            router_logits, self.top_k, correction_bias=None if bias is None else bias.float(),
            **self.routing_kwargs,
        )
        if self.training:
            # A scatter, not expert_token_counts: no host sync (bincount and its id range check
            # read the ids on the host), and it traces under torch.compile. grouped_topk's ids are
            # in range by construction.
            with torch.no_grad():
                ids = topk_ids.reshape(-1).long()
                self.tokens_per_expert.scatter_add_(0, ids, torch.ones_like(ids))
        return router_logits, topk_weights, topk_ids

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The affinities ``s`` of the routing: softmax (V2) or sigmoid (V3) of the fp32 logits."""
        if self.routing_kwargs["scoring_func"] == "sigmoid":
            return router_logits.float().sigmoid()
        return router_logits.float().softmax(dim=-1)

    @torch.no_grad()
    def pop_tokens_per_expert(self) -> torch.Tensor:
        """The counts accumulated since the last pop (int64 ``[E]``, a copy); zeroes the buffer."""
        counts = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return counts

    def extra_repr(self) -> str:
        kw = self.routing_kwargs
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, scoring={kw['scoring_func']}, "
            f"groups={kw['topk_group']}/{kw['n_group']}, renormalize={kw['renormalize']}, "
            f"scale={kw['routed_scaling_factor']}, correction_bias={self.is_v3}"
        )


class RoutedExperts(nn.Module):
    """``E`` SwiGLU experts stored as 3-D tensors (transformers' DeepseekV3Experts layout).

    ``gate_up_proj [E, 2I, H]`` (rows ``[0, I)`` the gate projection, ``[I, 2I)`` the up
    projection), ``down_proj [E, H, I]``. The forward is :func:`fused_experts`.
    """

    def __init__(self, config: Any, *, device=None, dtype=None) -> None:
        super().__init__()
        config = MoEConfig.from_config(config)
        factory = {"device": device, "dtype": dtype}
        self.num_experts = config.n_routed_experts
        self.hidden_size, self.intermediate_size = config.hidden_size, config.moe_intermediate_size
        self.initializer_range = config.initializer_range
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_size, self.hidden_size, **factory)
        )
        self.down_proj = nn.Parameter(
            torch.empty(self.num_experts, self.hidden_size, self.intermediate_size, **factory)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=self.initializer_range)
        nn.init.normal_(self.down_proj, mean=0.0, std=self.initializer_range)

    def forward(
        self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden_states [T, H]``, ``topk_ids`` int ``[T, K]``, ``topk_weights`` fp32 ``[T, K]`` ->
        ``[T, H]``: ``out[t] = sum_k w[t,k] * down[e] @ (silu(g) * u)``, ``[g; u] = gate_up[e] @ x_t``,
        ``e = topk_ids[t, k]``. Arguments in the order of transformers' experts modules."""
        return fused_experts(hidden_states, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: DeepSeek's dense / shared-expert MLP."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, bias: bool = False,
        initializer_range: float = 0.02, device=None, dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.initializer_range = initializer_range
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=self.initializer_range)
            if linear.bias is not None:
                linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeepseekMoE(nn.Module):
    """DeepSeekMoE: ``y = sum_k w_k E_{i_k}(x) + S(x)`` for each token ``x``.

    ``(w, i) = grouped_topk(x W_gate^T)`` routes each token to ``K`` of ``E`` SwiGLU experts
    ``E_e`` (:class:`RoutedExperts`, run by :func:`fused_experts`); ``S`` is the shared experts'
    SwiGLU MLP of width ``moe_intermediate_size * n_shared_experts`` (absent when that is 0).

    Args:
        config: a :class:`MoEConfig`, or a transformers DeepseekV2Config / DeepseekV3Config (or
            any object with their field names), read by :meth:`MoEConfig.from_config`.
        device, dtype: for the parameters (the V3 correction bias stays fp32).

    Forward: ``hidden_states [..., H]`` (fp32, bf16 or fp16, any strides, matching the
    parameters' dtype) -> same shape and dtype.

    State dict: exactly transformers' DeepseekV3MoE (V3 configs) or DeepseekV2Moe (V2 configs):
    ``gate.weight``, ``gate.e_score_correction_bias`` (V3), ``experts.gate_up_proj``,
    ``experts.down_proj``, ``shared_experts.{gate,up,down}_proj.weight``.

    Load balance: in training mode every forward adds its routed (token, k) pairs per expert to
    ``gate.tokens_per_expert``; :meth:`pop_tokens_per_expert` reads and zeroes it, and for V3
    :meth:`update_correction_bias_` (or :func:`update_correction_biases_` over a whole model)
    applies the auxiliary-loss-free bias update after the optimizer step. Set
    ``record_routing = True`` to keep the last forward's :class:`MoERouting` in
    ``last_routing`` for ``expert_balance_loss`` / ``sequence_balance_loss`` (it holds the
    ``[N, E]`` logits and their graph until the next forward).

    With activation checkpointing the recomputed forward counts its tokens again; the V3 bias
    update only uses the sign of ``mean(load) - load``, which a uniform factor does not change.
    """

    def __init__(self, config: Any, *, device=None, dtype=None) -> None:
        super().__init__()
        config = MoEConfig.from_config(config)
        self.config = config
        self.hidden_size = config.hidden_size
        self.gate = MoEGate(config, device=device, dtype=dtype)
        self.experts = RoutedExperts(config, device=device, dtype=dtype)
        if config.n_shared_experts:
            self.shared_experts = SwiGLUMLP(
                config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                bias=config.mlp_bias, initializer_range=config.initializer_range, device=device, dtype=dtype,
            )
        else:
            self.shared_experts = None
        self.record_routing = False
        self.last_routing: MoERouting | None = None

    def reset_parameters(self) -> None:
        for module in (self.gate, self.experts, self.shared_experts):
            if module is not None:
                module.reset_parameters()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [..., hidden_size={self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        if hidden_states.dtype != self.experts.gate_up_proj.dtype and autocast_dtype(hidden_states.device) is None:
            raise TypeError(
                f"hidden_states is {hidden_states.dtype} but the experts are {self.experts.gate_up_proj.dtype}"
            )
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        router_logits, topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.record_routing:
            self.last_routing = MoERouting(router_logits, self.gate.scores(router_logits), topk_weights, topk_ids)
        return out.view(shape)

    def pop_tokens_per_expert(self) -> torch.Tensor:
        """Routed (token, k) pairs per expert since the last pop (int64 ``[E]``); zeroes the count."""
        return self.gate.pop_tokens_per_expert()

    @torch.no_grad()
    def update_correction_bias_(self, gamma: float, counts: torch.Tensor | None = None) -> torch.Tensor:
        """DeepSeek-V3's auxiliary-loss-free balancing: ``b_i += gamma * sign(mean(load) - load_i)``.

        Args:
            gamma: the bias update speed (DeepSeek-V3: 0.001 for most of training).
            counts: ``[E]`` tokens per expert over the step; by default :meth:`pop_tokens_per_expert`
                (with data parallelism, all-reduce the popped counts and pass them here).

        Returns the counts used. Raises ValueError for a V2 router, which has no bias.
        """
        bias = self.gate.e_score_correction_bias
        if bias is None:
            raise ValueError(
                f"topk_method={self.config.topk_method!r}: only DeepSeek-V3 routing ('noaux_tc') "
                "has an e_score_correction_bias to update"
            )
        if counts is None:
            counts = self.pop_tokens_per_expert()
        update_correction_bias_(bias, counts, gamma)
        return counts

    def extra_repr(self) -> str:
        return f"model_type={self.config.model_type}, shared_experts={self.config.n_shared_experts}"


def _moe_layers(model: nn.Module) -> Iterator[DeepseekMoE]:
    return (module for module in model.modules() if isinstance(module, DeepseekMoE))


@torch.no_grad()
def update_correction_biases_(
    model: nn.Module, gamma: float, reduce: Callable[[torch.Tensor], Any] | None = None
) -> int:
    """Apply :meth:`DeepseekMoE.update_correction_bias_` to every V3 MoE layer of ``model``.

    Call after each optimizer step. Each layer's accumulated counts are popped (V2 layers' counts
    too, so they do not grow without bound); ``reduce`` (e.g. ``torch.distributed.all_reduce``)
    is applied in place to each V3 layer's counts first, so all data-parallel ranks move their
    biases alike. Returns the number of layers updated.
    """
    updated = 0
    for layer in _moe_layers(model):
        counts = layer.pop_tokens_per_expert()
        if layer.gate.e_score_correction_bias is None:
            continue
        if reduce is not None:
            reduce(counts)
        layer.update_correction_bias_(gamma, counts)
        updated += 1
    return updated
