"""DeepSeekMoE microbenchmarks: the gate, moe_align_block_size and the whole MoE layer, side by side.

Sections (one table):
  gate   grouped_topk per backend vs a plain PyTorch gate (transformers' router code), forward,
         on router logits [T, E]
  align  moe_align_block_size: the native kernel (C++ on CPU, CUDA on GPU) vs the PyTorch path,
         always also at T=16384 (the target is measured there)
  moe    DeepseekMoE forward / backward / forward+backward vs the same module forced to the PyTorch
         path (GPU; on the CPU the default already is the PyTorch path), a per-expert loop like
         transformers' DeepseekV3Experts, and on a GPU torch._grouped_mm (sort, two grouped GEMMs,
         SwiGLU, combine). All providers share the gate and shared experts of the module; the
         "bwd" rows are fwd+bwd minus fwd.

    python benchmarks/bench_moe.py                     # CPU-sized defaults (a few minutes on 2 cores)
    python benchmarks/bench_moe.py --device cuda       # the model shapes at T = 1 .. 16384
    python benchmarks/bench_moe.py --quick             # seconds: a smoke run for CI
    python benchmarks/bench_moe.py --markdown benchmarks/results/moe_cpu.md --csv benchmarks/results/moe_cpu.csv
"""

from __future__ import annotations

import dataclasses
import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from moe_align.modules import DeepseekMoE, MoEConfig  # noqa: E402
from moe_align.ops import grouped_topk, moe_align_block_size  # noqa: E402
from moe_align.ops._native import has_cuda_kernels  # noqa: E402
from moe_align.ops.moe_align_block_size import moe_align_block_size_torch  # noqa: E402

ALIGN_TOKENS = 16384  # the moe_align target is measured at T=16384, top-8 of 256
BLOCK_SIZE = 64  # row block of the grouped GEMM that consumes moe_align_block_size's layout


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    experts: int
    top_k: int
    shared: int
    n_group: int = 1
    topk_group: int = 1
    v3: bool = False

    def config(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden, moe_intermediate_size=self.inter, n_routed_experts=self.experts,
            num_experts_per_tok=self.top_k, n_shared_experts=self.shared, n_group=self.n_group,
            topk_group=self.topk_group, norm_topk_prob=self.v3, routed_scaling_factor=2.5 if self.v3 else 1.0,
            topk_method="noaux_tc" if self.v3 else "greedy",
        )

    def describe(self) -> str:
        groups = f", groups {self.topk_group}/{self.n_group}" if self.n_group > 1 else ""
        gate = "sigmoid+bias" if self.v3 else "softmax"
        return (f"H={self.hidden}, I={self.inter}, E={self.experts}, top-{self.top_k}, "
                f"{self.shared} shared, {gate}{groups}")


SHAPES = {
    "v2-lite": Shape(2048, 1408, 64, 6, 2),
    "v3": Shape(7168, 2048, 256, 8, 1, 8, 4, v3=True),
    # The V3 router (256 experts, top-8, 8 groups keep 4) with hidden and intermediate / 8: CPU-sized.
    "v3-mini": Shape(896, 256, 256, 8, 1, 8, 4, v3=True),
    "tiny-v3": Shape(64, 32, 16, 4, 1, 4, 2, v3=True),
}
DEFAULTS = {  # device type -> (shapes, tokens)
    "cuda": (["v2-lite", "v3"], [1, 64, 4096, 16384]),
    "cpu": (["v2-lite", "v3-mini"], [1, 16, 64, 256]),
}
QUICK = (["tiny-v3"], [1, 16])

COLUMNS = ["section", "shape", "tokens", "provider", "mode", "dtype", "ms", "TFLOP/s", "peak MiB",
           "x torch", "x ref"]


# --------------------------------------------------------------------------- baselines


def plain_gate(logits: torch.Tensor, bias: torch.Tensor | None, shape: Shape):
    """transformers' DeepseekV2/V3 router after the linear layer, in plain PyTorch."""
    scores = logits.sigmoid() if shape.v3 else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    if shape.n_group > 1:
        grouped = choice.view(-1, shape.n_group, shape.experts // shape.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1) if shape.v3 else grouped.amax(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(shape.topk_group, dim=-1).indices, 1)
        choice = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).view(-1, shape.experts)
    ids = choice.topk(shape.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if shape.v3:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * (2.5 if shape.v3 else 1.0), ids


def loop_experts(x, topk_ids, topk_weights, gate_up, down):
    """Per-expert loop, as transformers' DeepseekV3Experts: gather each expert's tokens, two GEMMs.

    One change makes it a stronger baseline: the weights are unbound once. transformers indexes
    ``gate_up_proj[e]`` per expert, whose backward writes a zero-filled gradient of the whole
    ``[E, 2I, H]`` tensor per expert hit (``--transformers`` times that module as it is).
    """
    num_experts = gate_up.shape[0]
    gate_up, down = gate_up.unbind(0), down.unbind(0)
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(topk_ids.long(), num_classes=num_experts).permute(2, 1, 0)  # [E, K, T]
        hit = (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
    for e in hit:
        k_pos, token = torch.where(mask[e])
        g, u = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, down[e]) * topk_weights[token, k_pos, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def grouped_mm_experts(x, topk_ids, topk_weights, gate_up, down):
    """torch._grouped_mm: sort (token, k) pairs by expert, two grouped GEMMs, SwiGLU, combine."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    token = order // top_k
    offs = torch.bincount(flat, minlength=gate_up.shape[0]).cumsum(0).to(torch.int32)
    gu = torch._grouped_mm(x[token], gate_up.transpose(-2, -1), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
    y = y.float() * topk_weights.reshape(-1)[order, None]
    return torch.zeros(num_tokens, x.shape[1], device=x.device).index_add_(0, token, y).to(x.dtype)


def moe_with(moe: DeepseekMoE, experts_fn) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's gate and shared experts around another implementation of the routed experts."""

    def forward(x):
        _, weights, ids = moe.gate(x)
        out = experts_fn(x, ids, weights, moe.experts.gate_up_proj, moe.experts.down_proj)
        return out + moe.shared_experts(x) if moe.shared_experts is not None else out

    return forward


def moe_flops(shape: Shape, tokens: int) -> float:
    """Forward FLOPs: router + routed experts (3 GEMMs of H x I per (token, k)) + shared experts."""
    per_token = 2 * shape.hidden * shape.experts + 6 * shape.hidden * shape.inter * (shape.top_k + shape.shared)
    return float(per_token * tokens)


def with_backend(backend: str | None, fn: Callable) -> Callable:
    """``fn`` run with ``MOE_ALIGN_BACKEND=backend`` (None: as set)."""

    def run():
        with common.forced_backend(backend):
            return fn()

    return run


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    section: str
    shape: str
    tokens: int
    run: Callable[[], list[dict]]


class Bench:
    def __init__(self, args, device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        self.quick = args.quick
        self._moe_key, self._moe = None, None

    def timed_rows(self, section, shape, tokens, fns, dtype) -> list[dict]:
        times, errors = common.time_interleaved(fns, self.device, quick=self.quick)
        for provider, err in errors.items():
            print(f"\n{section} {shape} T={tokens} {provider}: {type(err).__name__}: {err}", file=sys.stderr)
        return [self.row(section, shape, tokens, p if p in times else p + " (failed)", "fwd", times.get(p), dtype=dtype)
                for p in fns]

    def row(self, section, shape, tokens, provider, mode, ms, dtype=None, flops=None, peak=None):
        tflops = flops / (ms * 1e-3) / 1e12 if flops and ms else None
        return dict(section=section, shape=shape, tokens=tokens, provider=provider, mode=mode,
                    dtype=str(dtype or self.dtype).replace("torch.", ""), ms=ms, **{"TFLOP/s": tflops},
                    **{"peak MiB": peak})

    # gate ----------------------------------------------------------------
    def gate_case(self, name: str, tokens: int) -> list[dict]:
        shape = SHAPES[name]
        g = torch.Generator(device=self.device).manual_seed(tokens)
        logits = torch.randn(tokens, shape.experts, device=self.device, generator=g)
        bias = torch.randn(shape.experts, device=self.device, generator=g) * 0.01 if shape.v3 else None
        kwargs = dict(n_group=shape.n_group, topk_group=shape.topk_group,
                      scoring_func="sigmoid" if shape.v3 else "softmax", correction_bias=bias,
                      renormalize=shape.v3, routed_scaling_factor=2.5 if shape.v3 else 1.0)
        backends = ["torch"]
        if self.device.type == "cuda" and has_cuda_kernels():
            backends.insert(0, "cuda")
        fns = {f"grouped_topk[{b}]": with_backend(b, lambda: grouped_topk(logits, shape.top_k, **kwargs))
               for b in backends}
        fns["plain torch gate"] = lambda: plain_gate(logits, bias, shape)
        return self.timed_rows("gate", name, tokens, fns, dtype=torch.float32)

    # align ---------------------------------------------------------------
    def align_case(self, name: str, tokens: int) -> list[dict]:
        shape = SHAPES[name]
        g = torch.Generator(device=self.device).manual_seed(tokens)
        ids = torch.rand(tokens, shape.experts, device=self.device, generator=g).topk(shape.top_k, dim=-1)
        ids = ids.indices.to(torch.int32)
        native = "cuda" if self.device.type == "cuda" else "cpp"
        fns = {
            f"moe_align[{native}]": with_backend(native, lambda: moe_align_block_size(ids, shape.experts, BLOCK_SIZE)),
            "moe_align[torch]": lambda: moe_align_block_size_torch(ids, shape.experts, BLOCK_SIZE),
        }
        return self.timed_rows("align", name, tokens, fns, dtype=torch.int32)

    # moe -----------------------------------------------------------------
    def module(self, name: str) -> DeepseekMoE:
        if self._moe_key != name:
            self._moe = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            torch.manual_seed(0)
            # Built on the meta device and filled with uniform noise: the module's normal init
            # of gigabytes of expert weights takes longer on a CPU than the runs themselves.
            moe = DeepseekMoE(SHAPES[name].config(), device="meta", dtype=self.dtype)
            moe = moe.to_empty(device=self.device).train()
            with torch.no_grad():  # a decisive router and O(1) activations, like a trained layer
                for param in moe.parameters():
                    bound = math.sqrt(3 / param.shape[-1])
                    param.uniform_(-bound, bound)
                if moe.gate.e_score_correction_bias is not None:
                    moe.gate.e_score_correction_bias.uniform_(-0.01, 0.01)
                moe.gate.tokens_per_expert.zero_()
            self._moe_key, self._moe = name, moe
        return self._moe

    def moe_providers(self, moe: DeepseekMoE) -> list[tuple[str, str | None, Callable]]:
        """(name, forced backend, forward) per provider."""
        providers = [("DeepseekMoE", None, moe)]
        if self.device.type == "cuda":
            providers.append(("DeepseekMoE[torch]", "torch", moe))
        providers.append(("per-expert loop", None, moe_with(moe, loop_experts)))
        if self.device.type == "cuda" and hasattr(torch, "_grouped_mm") and self.dtype == torch.bfloat16:
            providers.append(("torch._grouped_mm", None, moe_with(moe, grouped_mm_experts)))
        if self.args.transformers:
            providers.append(("transformers", None, self.transformers_module(moe)))
        return providers

    def transformers_module(self, moe: DeepseekMoE):
        from transformers import DeepseekV2Config, DeepseekV3Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        c = moe.config
        fields = dict(hidden_size=c.hidden_size, moe_intermediate_size=c.moe_intermediate_size,
                      n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok,
                      n_shared_experts=c.n_shared_experts, routed_scaling_factor=c.routed_scaling_factor,
                      num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1)
        if c.is_v3:
            config = DeepseekV3Config(n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                                      **fields)
            ref = DeepseekV3MoE(config)
        else:
            ref = DeepseekV2Moe(DeepseekV2Config(topk_method=c.topk_method, **fields))
        ref.config._experts_implementation = "eager"  # its own per-expert loop, as in a model
        ref.to(device=self.device, dtype=self.dtype)
        ref.load_state_dict(moe.state_dict(), strict=True)
        return ref

    def moe_case(self, name: str, tokens: int) -> list[dict]:
        shape = SHAPES[name]
        moe = self.module(name)
        g = torch.Generator(device=self.device).manual_seed(tokens)
        x = torch.randn(tokens, shape.hidden, device=self.device, generator=g).to(self.dtype).requires_grad_(True)
        grad_out = torch.randn(tokens, shape.hidden, device=self.device, generator=g).to(self.dtype)
        params = [x] + list(moe.parameters())
        flops = moe_flops(shape, tokens)
        providers = self.moe_providers(moe)
        fwd = {p: with_backend(b, lambda fn=fn: fn(x)) for p, b, fn in providers}
        fwd_bwd = {p: with_backend(b, lambda fn=fn: fn(x).backward(grad_out)) for p, b, fn in providers}
        ms_fwd, errors = common.time_interleaved(fwd, self.device, quick=self.quick)
        ms_full, errors_bwd = common.time_interleaved(fwd_bwd, self.device, grad_to_none=params, quick=self.quick)
        errors.update(errors_bwd)
        rows = []
        for provider, _, _ in providers:
            if provider in errors:
                err = errors[provider]
                print(f"\n{name} T={tokens} {provider}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                      file=sys.stderr)
                rows.append(self.row("moe", name, tokens, provider + " (failed)", "fwd+bwd", None))
                continue
            peak = common.peak_memory_mib(fwd_bwd[provider], self.device)
            for p in params:
                p.grad = None
            full, forward = ms_full[provider], ms_fwd[provider]
            rows.append(self.row("moe", name, tokens, provider, "fwd", forward, flops=flops))
            rows.append(self.row("moe", name, tokens, provider, "bwd", full - forward if full > forward else None,
                                 flops=2 * flops))
            rows.append(self.row("moe", name, tokens, provider, "fwd+bwd", full, flops=3 * flops, peak=peak))
        return rows

    def cases(self, shapes: list[str], tokens: list[int]) -> list[Case]:
        out = []
        for name in shapes:
            for t in tokens:
                out.append(Case("gate", name, t, lambda n=name, t=t: self.gate_case(n, t)))
        for name in shapes:
            for t in sorted(set(tokens) | {ALIGN_TOKENS}):
                out.append(Case("align", name, t, lambda n=name, t=t: self.align_case(n, t)))
        for name in shapes:
            for t in tokens:
                out.append(Case("moe", name, t, lambda n=name, t=t: self.moe_case(n, t)))
        return out


# --------------------------------------------------------------------------- ratios and targets


TORCH_BASELINE = {"gate": "grouped_topk[torch]", "align": "moe_align[torch]", "moe": "DeepseekMoE[torch]"}
REF_BASELINE = {"gate": "plain torch gate", "moe": "per-expert loop"}


def add_ratios(rows: list[dict], device: torch.device) -> None:
    """x torch / x ref: the baseline's time over this row's time (> 1: this row is faster)."""
    by_key = {(r["section"], r["shape"], r["tokens"], r["mode"], r["provider"]): r["ms"] for r in rows}
    torch_baseline = dict(TORCH_BASELINE)
    if device.type != "cuda":
        torch_baseline["moe"] = "DeepseekMoE"  # on the CPU the module's default is the PyTorch path
    for r in rows:
        key = (r["section"], r["shape"], r["tokens"], r["mode"])
        for column, baselines in (("x torch", torch_baseline), ("x ref", REF_BASELINE)):
            base = by_key.get(key + (baselines.get(r["section"]),))
            r[column] = base / r["ms"] if base and r["ms"] else None


def find(rows, **match) -> float | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r["ms"]
    return None


def targets(rows: list[dict], device: torch.device) -> list[str]:
    lines = []

    def verdict(ok: bool | None, text: str) -> None:
        lines.append(f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    moe_rows = [r for r in rows if r["section"] == "moe" and r["mode"] == "fwd+bwd"]
    if device.type != "cuda":
        shape = "v2-lite"
        tokens = sorted({r["tokens"] for r in moe_rows if r["shape"] == shape})
        for t in tokens:
            ours = find(moe_rows, shape=shape, tokens=t, provider="DeepseekMoE")
            loop = find(moe_rows, shape=shape, tokens=t, provider="per-expert loop")
            if ours is None or loop is None:
                verdict(None, f"CPU {shape} T={t}: DeepseekMoE fwd+bwd vs per-expert loop (not measured)")
                continue
            need = 2.0 if t <= 64 else 1.0
            verdict(loop / ours >= need, f"CPU {shape} T={t}: DeepseekMoE fwd+bwd {ours:.2f} ms vs per-expert "
                                         f"loop {loop:.2f} ms = {loop / ours:.2f}x (target >= {need:g}x)")
        if not tokens:
            verdict(None, f"CPU {shape}: DeepseekMoE fwd+bwd vs per-expert loop (shape not run)")
        align = [r for r in rows if r["section"] == "align" and r["tokens"] == ALIGN_TOKENS
                 and SHAPES[r["shape"]].experts == 256 and SHAPES[r["shape"]].top_k == 8]
        cpp = find(align, provider="moe_align[cpp]")
        torch_path = find(align, provider="moe_align[torch]")
        if cpp is None or torch_path is None:
            verdict(None, f"CPU moe_align T={ALIGN_TOKENS} top-8 of 256: C++ >= 10x the PyTorch path (not measured)")
        else:
            verdict(torch_path / cpp >= 10,
                    f"CPU moe_align T={ALIGN_TOKENS} top-8 of 256: C++ {cpp * 1e3:.0f} us vs "
                    f"PyTorch {torch_path * 1e3:.0f} us = {torch_path / cpp:.1f}x (target >= 10x)")
    else:
        align = [r for r in rows if r["section"] == "align" and r["tokens"] == 4096
                 and SHAPES[r["shape"]].experts == 256 and SHAPES[r["shape"]].top_k == 8]
        cuda = find(align, provider="moe_align[cuda]")
        if cuda is None:
            verdict(None, "GPU moe_align T=4096 top-8 of 256 < 20 us (not measured: run --tokens with 4096)")
        else:
            verdict(cuda * 1e3 < 20, f"GPU moe_align T=4096 top-8 of 256: {cuda * 1e3:.1f} us (target < 20 us)")
        for mode in ("fwd", "bwd"):
            ours = find(rows, section="moe", shape="v3", tokens=16384, mode=mode, provider="DeepseekMoE")
            ref = find(rows, section="moe", shape="v3", tokens=16384, mode=mode, provider="torch._grouped_mm")
            if ours is None or ref is None:
                verdict(None, f"GPU v3 T=16384 bf16 {mode}: DeepseekMoE no slower than torch._grouped_mm "
                              "(not measured)")
            else:
                verdict(ours <= ref, f"GPU v3 T=16384 bf16 {mode}: DeepseekMoE {ours:.2f} ms vs torch._grouped_mm "
                                     f"{ref:.2f} ms = {ref / ours:.2f}x (target >= 1x)")
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = common.argument_parser(__doc__, "a tiny smoke run (seconds): shape tiny-v3, T in {1, 16}",
                               epilog="Shapes: " + "; ".join(f"{k}: {v.describe()}" for k, v in SHAPES.items()))
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: v2-lite v3 on CUDA, "
                   "v2-lite v3-mini on the CPU")
    p.add_argument("--tokens", nargs="+", type=int, help="default: 1 64 4096 16384 on CUDA, 1 16 64 256 on the CPU")
    p.add_argument("--sections", nargs="+", choices=["gate", "align", "moe"], default=["gate", "align", "moe"])
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--transformers", action="store_true", help="also time transformers' DeepseekV2Moe/V3MoE")
    common.add_output_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.bench_device(args.device)
    default_shapes, default_tokens = QUICK if args.quick else DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    shapes = args.shapes or default_shapes
    tokens = sorted(set(args.tokens or default_tokens))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32

    from tqdm import tqdm

    meta = common.run_metadata(device)
    bench = Bench(args, device, dtype)
    cases = [c for c in bench.cases(shapes, tokens) if c.section in args.sections]
    rows: list[dict] = []
    deadline = common.Deadline(args.time_limit)
    with tqdm(cases, desc="bench_moe", unit="case", file=sys.stderr) as progress:
        for case in progress:
            if deadline.skip():
                continue
            progress.set_postfix_str(f"{case.section} {case.shape} T={case.tokens}")
            rows.extend(case.run())
    bench._moe = None
    ceiling = common.matmul_tflops(device, dtype)
    add_ratios(rows, device)

    notes = [f"{name}: {SHAPES[name].describe()}" for name in shapes] + deadline.notes()
    notes += [
        f"dense {dtype_name} matmul ceiling measured in this run: {ceiling:.3g} TFLOP/s",
        "ms: median time; TFLOP/s from counted FLOPs (router + 3 GEMMs per routed and shared expert; "
        "bwd = 2x fwd); peak MiB: CUDA peak allocation of one fwd+bwd ('-' on the CPU: not measured)",
        "x torch: the PyTorch path's time / this row's time; x ref: the plain gate's or the per-expert "
        "loop's time / this row's time (> 1: faster)",
        f"align: block size {BLOCK_SIZE}; bwd rows = fwd+bwd - fwd",
    ]
    if device.type != "cuda":
        notes.append("CPU: DeepseekMoE's default already is the PyTorch path (fused_experts has no C++ "
                     "kernel), so its x torch is 1 by definition")
    common.report("DeepSeekMoE benchmarks (benchmarks/bench_moe.py)", meta, notes, rows, COLUMNS,
                  targets(rows, device), args.markdown, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
