"""Training throughput and peak memory of one optimizer step: our model vs transformers', side by side.

One step = zero grads, forward, loss, backward, AdamW step, on a batch of N tokens made of several
sequences of different lengths (the same token ids for every provider). Providers:

  ours                    DeepseekForCausalLM on the packed batch (ids [N], cu_seqlens):
                          token_logprobs (fused LM head) -> mean NLL over the targets -> backward
  transformers            transformers' DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for the V2
                          shapes) built from the same config and loaded with our state dict
                          (strict): a right-padded [B, S] batch, attention mask, its own loss
                          via labels (-100 on padding)
  transformers+patch      the same model after moe_align.integrations.hf.patch_model (our MLA,
                          MoE and fused loss inside transformers' model)

The loss of the first step (the same weights for all) is printed for each provider: equal losses
are the check that the models are the same. When the providers of a shape fit in memory together
(``--interleave-gib``) they are built at once and timed round-robin, one step each per round, so
that load from other jobs slows them alike; otherwise they run one after the other, each in a
fresh subprocess (``--isolate auto``): a clean heap for each CPU memory reading, which in a
process that has run other shapes was seen to vary by a few hundred MiB with the heap's history.

    python benchmarks/bench_train.py                   # CPU-sized defaults (a few minutes on 2 cores)
    python benchmarks/bench_train.py --quick           # a smoke run for CI
    python benchmarks/bench_train.py --device cuda     # bf16 autocast, N = 8192, V2-Lite with its vocabulary
    python benchmarks/bench_train.py --threads 1 --markdown benchmarks/results/train_cpu.md

On a CPU shared with other jobs, two OpenMP threads per process can be many times slower than
one (threads wait for each other's descheduled partner): ``--threads 1`` there.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from moe_align.models.deepseek import PRESETS, DeepseekConfig, DeepseekForCausalLM  # noqa: E402

PROVIDERS = ["ours", "transformers", "transformers+patch"]
BASELINE = "transformers"
RESULT_TAG = "BENCH_TRAIN_RESULT "
SPEED_TARGET = 1.5  # issue 5: >= 1.5x transformers' tokens/s at the same shape on a GPU


# --------------------------------------------------------------------------- shapes


def shape_fields(name: str, device_type: str, v2_lite_layers: int = 2) -> dict:
    """DeepseekConfig fields of a benchmark shape."""
    if name in ("small", "medium"):
        return dict(PRESETS[name])
    if name == "v2-lite":
        # V2-Lite's layer shapes (MLA without q_lora, 64 experts top-6 + 2 shared, dense first
        # layer), fewer layers; on the CPU also a smaller vocabulary (102400 on a GPU).
        return dict(PRESETS["deepseek-v2-lite"], num_hidden_layers=v2_lite_layers,
                    vocab_size=102400 if device_type == "cuda" else 32000)
    if name == "tiny-v2":  # quick runs: the V2 code path of transformers (softmax router, greedy)
        return dict(PRESETS["tiny"], model_type="deepseek_v2", topk_method="greedy", norm_topk_prob=False)
    raise ValueError(f"unknown shape {name!r}")


SHAPES = ["small", "medium", "v2-lite", "tiny-v2"]
DEFAULTS = {  # device type -> shapes, tokens per step, longest sequence
    "cpu": (["small", "medium", "v2-lite"], {"small": 2048, "medium": 2048, "v2-lite": 512}, 256),
    "cuda": (["small", "medium", "v2-lite"], {"small": 8192, "medium": 8192, "v2-lite": 8192}, 1024),
}
QUICK = (["small", "tiny-v2"], {"small": 256, "tiny-v2": 256}, 64)


def describe(fields: dict) -> str:
    c = DeepseekConfig(**fields)
    q = f"q_lora {c.q_lora_rank}" if c.q_lora_rank else "no q_lora"
    gate = "sigmoid" if c.model_type == "deepseek_v3" else "softmax"
    return (f"{c.model_type}, {c.num_hidden_layers} layers ({c.first_k_dense_replace} dense), H={c.hidden_size}, "
            f"{c.num_attention_heads} heads, {q}, kv_lora {c.kv_lora_rank}, {c.n_routed_experts} experts top-"
            f"{c.num_experts_per_tok} + {c.n_shared_experts} shared, I={c.moe_intermediate_size}, {gate}, "
            f"V={c.vocab_size}")


def hf_config(config: DeepseekConfig):
    """transformers' DeepseekV3Config / DeepseekV2Config with the fields of ``config``."""
    import transformers

    fields = dataclasses.asdict(config)
    v2 = fields.pop("model_type") == "deepseek_v2"
    rope_theta, rope_scaling = fields.pop("rope_theta"), fields.pop("rope_scaling")
    fields["rope_parameters"] = dict(rope_scaling or {"rope_type": "default"}, rope_theta=rope_theta)
    if v2:
        fields.pop("rope_interleave")  # V2's rotary layout is fixed (complex pairs)
        return transformers.DeepseekV2Config(**fields)
    return transformers.DeepseekV3Config(**fields)


def hf_model(config: DeepseekConfig, state_dict: dict, device: torch.device):
    """transformers' causal LM of ``config`` holding ``state_dict`` (strict)."""
    import transformers
    from transformers.initialization import no_init_weights

    hc = hf_config(config)
    v2 = config.model_type == "deepseek_v2"
    cls = transformers.DeepseekV2ForCausalLM if v2 else transformers.DeepseekV3ForCausalLM
    with no_init_weights():  # the weights come from state_dict
        model = cls(hc)
    model.to(device)
    model.load_state_dict(state_dict, strict=True)
    return model


# --------------------------------------------------------------------------- the batch


def sequence_lengths(tokens: int, max_len: int, seed: int = 0) -> list[int]:
    """Lengths summing to ``tokens``: uniform in [max_len / 4, max_len], the last one what is left
    (at least 2 tokens: every sequence has a target)."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], tokens
    while left > 0:
        n = int(torch.randint(max(max_len // 4, 2), max_len + 1, (1,), generator=g))
        n = left if left - n < 2 else min(n, left)
        lengths.append(n)
        left -= n
    return lengths


@dataclasses.dataclass
class Batch:
    ids: torch.Tensor  # [N] packed
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int
    padded: torch.Tensor  # [B, S] right-padded with 0
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], -100 on padding

    @classmethod
    def make(cls, lengths: list[int], vocab: int, device: torch.device, seed: int = 1) -> Batch:
        g = torch.Generator().manual_seed(seed)
        seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
        ids, cu, mx = DeepseekForCausalLM.pack([s.tolist() for s in seqs], device=device)
        padded = torch.zeros(len(seqs), mx, dtype=torch.long)
        mask = torch.zeros(len(seqs), mx, dtype=torch.long)
        for i, s in enumerate(seqs):
            padded[i, :len(s)] = s
            mask[i, :len(s)] = 1
        labels = padded.masked_fill(mask == 0, -100)
        return cls(ids, cu, mx, padded.to(device), mask.to(device), labels.to(device))


# --------------------------------------------------------------------------- CPU memory


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
STEADY_MMAP_THRESHOLD = 32 << 20  # where glibc's dynamic threshold settles (its maximum on 64-bit)
EXACT_MMAP_THRESHOLD = 64 << 10


def _malloc_trim() -> None:
    """Give the allocator's free memory back to the OS (glibc), so that resident memory before a
    step counts live tensors only."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _mmap_threshold(nbytes: int) -> None:
    """Serve allocations of at least ``nbytes`` by mmap (glibc; a fixed threshold, with the heap
    trimmed at twice it, as glibc's dynamic setting does)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * nbytes)


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak memory of a block above the memory held when it starts, in MiB (``.mib`` after it;
    None where it cannot be read).

    CUDA: ``torch.cuda.max_memory_allocated`` (``.total_mib``: the absolute peak). CPU (Linux,
    glibc): resident memory. During the block every allocation of 64 KiB or more is served by
    mmap and returned to the OS when freed, so that resident memory follows the live tensors
    rather than where the heap happened to place them (this slows the block: do not time it);
    free heap memory is given back with malloc_trim, then the high-water mark VmHWM is reset by
    writing 5 to /proc/self/clear_refs. Afterwards the mmap threshold is fixed at 32 MiB, where
    glibc's dynamic threshold settles in a training loop.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self.total_mib: float | None = None
        self.before_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        common.sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            self.before_mib = self._before / 2**20
            return self
        _mmap_threshold(EXACT_MMAP_THRESHOLD)
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._before = _status_kb("VmRSS")
        except (OSError, AttributeError):
            self._before = None
        return self

    def __exit__(self, *exc) -> None:
        common.sync(self.device)
        if self.device.type == "cuda":
            total = torch.cuda.max_memory_allocated(self.device)
            self.mib, self.total_mib = (total - self._before) / 2**20, total / 2**20
            return
        if self._before is not None:
            self.mib = (_status_kb("VmHWM") - self._before) / 1024
        _mmap_threshold(STEADY_MMAP_THRESHOLD)


def cpu_step_peak_mib(fn) -> float | None:
    """Peak memory of one ``fn()`` above the memory before it, in MiB (see :class:`PeakMemory`)."""
    with PeakMemory(torch.device("cpu")) as peak:
        fn()
    return peak.mib


# --------------------------------------------------------------------------- one worker


class Runner:
    """One provider's model, batch and AdamW for one shape: ``warmup`` steps (the first one's loss
    kept), one step inside a :class:`PeakMemory` reading, then :meth:`timed_step` times one more."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.device = device = torch.device(spec["device"])
        config = DeepseekConfig(**spec["fields"])
        torch.manual_seed(0)
        model = DeepseekForCausalLM(config, device=device)
        batch = Batch.make(spec["lengths"], config.vocab_size, device)
        self.info: dict = {}
        if spec["provider"] == "ours":
            def loss_fn():
                logp, targets = model.token_logprobs(batch.ids, batch.cu_seqlens, batch.max_seqlen)
                return -logp.sum() / (targets != -100).sum()
        else:
            state = model.state_dict()
            model = hf_model(config, state, device)
            del state
            gc.collect()
            if spec["provider"] == "transformers+patch":
                from moe_align.integrations.hf import patch_model

                patch_model(model)
            self.info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            self.info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)

            def loss_fn():
                return model(input_ids=batch.padded, attention_mask=batch.attention_mask, labels=batch.labels).loss
        model.train()
        self.model, self.loss_fn = model, loss_fn
        # fused AdamW (CPU and CUDA): the unfused CPU default spends ~10x longer in the update
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if spec["bf16"]
                         else torch.autocast("cpu", enabled=False))
        self.first_loss = float(self.step())  # the weights every provider starts from
        for _ in range(spec["warmup"] - 1):
            self.step()
        self.optimizer.zero_grad(set_to_none=True)
        with PeakMemory(device) as peak:  # one step's memory, untimed
            self.step()
        self.peak = peak
        self.times: list[float] = []

    def step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def timed_step(self) -> None:
        common.sync(self.device)
        start = time.perf_counter()
        self.step()
        common.sync(self.device)
        self.times.append((time.perf_counter() - start) * 1e3)

    def wants_more(self) -> bool:
        """At least one timed step, at most reps, until budget_s seconds of them have passed."""
        return len(self.times) < self.spec["reps"] and (not self.times or sum(self.times) < self.spec["budget_s"] * 1e3)

    def result(self) -> dict:
        state_mib = sum(p.numel() * p.element_size() * 3 for p in self.model.parameters()) / 2**20  # + 2 moments
        return dict(loss=self.first_loss, ms=statistics.median(self.times), times=self.times,
                    peak_mib=self.peak.mib, total_mib=self.peak.total_mib, state_mib=state_mib, **self.info)


def run_worker(spec: dict) -> dict:
    """Build one provider's model for one shape and time its optimizer steps."""
    runner = Runner(spec)
    while runner.wants_more():
        runner.timed_step()
    return runner.result()


def _error(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    _malloc_trim()


def run_in_process(spec: dict) -> dict:
    """:func:`run_worker` here; its result, or {"error": ...} (the memory it used is freed)."""
    try:
        return run_worker(spec)
    except Exception as err:  # one failing provider must not lose the table
        return _error(err)
    finally:
        _free(spec["device"])


def run_interleaved(specs: list[dict]) -> list[dict]:
    """All providers of a shape built at once and timed round-robin (one step each per round), so
    that load from other processes on a shared machine slows them alike."""
    runners: list[Runner | None] = []
    results: list[dict | None] = []
    for spec in specs:
        try:
            runners.append(Runner(spec))
            results.append(None)
        except Exception as err:
            runners.append(None)
            results.append(_error(err))
    try:
        while any(r is not None and r.wants_more() for r in runners):
            for i, r in enumerate(runners):
                if r is not None and r.wants_more():
                    try:
                        r.timed_step()
                    except Exception as err:
                        runners[i], results[i] = None, _error(err)
        return [res if r is None else r.result() for r, res in zip(runners, results)]
    finally:
        del runners
        _free(specs[0]["device"])


def state_gib(fields: dict) -> float:
    """Parameters, gradients and AdamW moments of a shape in GiB (fp32)."""
    model = DeepseekForCausalLM(DeepseekConfig(**fields), device="meta")
    return sum(p.numel() for p in model.parameters()) * 16 / 2**30


def spawn_worker(spec: dict, timeout: float | None) -> dict:
    """Run :func:`run_worker` in a fresh Python process; its result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(torch.get_num_threads()),
           "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    return {"error": f"exit code {proc.returncode}: " + (tail[-1] if tail else "no output")}


# --------------------------------------------------------------------------- table and targets


COLUMNS = ["shape", "tokens", "seqs", "pad %", "provider", "loss", "ms/step", "tokens/s", "x transformers",
           "peak MiB", "mem ratio", "extra MiB", "extra ratio", "state MiB"]


def add_ratios(rows: list[dict]) -> None:
    """x transformers: this tokens/s over transformers' (> 1: faster); mem ratio / extra ratio: this
    peak / extra memory over transformers' (< 1: less memory)."""
    base = {r["shape"]: r for r in rows if r["provider"] == BASELINE and r.get("tokens/s")}
    for r in rows:
        b = base.get(r["shape"])
        if b is None or not r.get("tokens/s"):
            continue
        r["x transformers"] = r["tokens/s"] / b["tokens/s"]
        if r.get("peak MiB") and b.get("peak MiB"):
            r["mem ratio"] = r["peak MiB"] / b["peak MiB"]
        if r.get("extra MiB") and b.get("extra MiB"):
            r["extra ratio"] = r["extra MiB"] / b["extra MiB"]


def targets(rows: list[dict], device: torch.device) -> list[str]:
    lines = []

    def verdict(ok: bool | None, text: str) -> None:
        lines.append(f"{'info' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    gpu = device.type == "cuda"
    tolerance = 2e-2 if gpu else 1e-3  # bf16 autocast vs fp32
    for shape in dict.fromkeys(r["shape"] for r in rows):
        base = next((r for r in rows if r["shape"] == shape and r["provider"] == BASELINE), None)
        losses = {r["provider"]: r["loss"] for r in rows if r["shape"] == shape and r.get("loss") is not None}
        if len(losses) > 1:
            spread = max(losses.values()) - min(losses.values())
            verdict(spread <= tolerance, f"{shape}: the same model: first-step losses "
                    + ", ".join(f"{p} {v:.5f}" for p, v in losses.items()) + f" (spread {spread:.1e}, "
                    f"tolerance {tolerance:g})")
        for name in ("ours", "transformers+patch"):
            r = next((r for r in rows if r["shape"] == shape and r["provider"] == name), None)
            if r is None or base is None or not r.get("tokens/s") or not base.get("tokens/s"):
                if r is not None or name == "ours":
                    verdict(None, f"{shape}: {name} vs transformers not measured")
                continue
            speed = r["x transformers"]
            verdict(speed >= SPEED_TARGET if gpu and name == "ours" else None,
                    f"{shape} N={r['tokens']}: {name} {r['tokens/s']:.0f} tokens/s vs transformers "
                    f"{base['tokens/s']:.0f} = {speed:.2f}x (target >= {SPEED_TARGET:g}x on a GPU"
                    f"{'' if gpu else '; informational on the CPU'})")
            if r.get("mem ratio") is not None:
                extra = (f"; less the gradients {r['extra MiB']:.0f} vs {base['extra MiB']:.0f} MiB = "
                         f"{r['extra ratio']:.2f}x" if r.get("extra ratio") is not None else "")
                verdict(r["mem ratio"] < 1 if name == "ours" else None,
                        f"{shape} N={r['tokens']}: {name} peak {r['peak MiB']:.0f} MiB vs transformers "
                        f"{base['peak MiB']:.0f} MiB = {r['mem ratio']:.2f}x{extra} (target < 1x everywhere)")
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = common.argument_parser(__doc__, "a smoke run: small and tiny-v2 shapes, N=256, 1 timed step")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, help="default: small medium v2-lite")
    p.add_argument("--tokens", type=int, help="N, tokens per step (default per shape: CPU 2048 / 2048 / 512, GPU 8192)")
    p.add_argument("--max-seq-len", type=int, help="longest sequence of the batch (default: CPU 256, GPU 1024)")
    p.add_argument("--equal-lengths", action="store_true",
                   help="all sequences max-seq-len long (no padding for transformers)")
    p.add_argument("--v2-lite-layers", type=int, default=2, help="decoder layers of the v2-lite shape (default 2)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--reps", type=int, help="at most this many timed steps, median reported (default: CPU 5, "
                   "GPU 10; quick 1)")
    common.add_step_arguments(p, budget=12.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    _mmap_threshold(STEADY_MMAP_THRESHOLD)  # the same allocator setting before and after memory readings
    if args.worker:
        spec = json.loads(args.worker)
        print(RESULT_TAG + json.dumps(run_worker(spec)), flush=True)
        return 0
    device = common.bench_device(args.device)
    shapes, tokens, max_len = QUICK if args.quick else DEFAULTS[device.type]
    shapes = args.shapes or shapes
    max_len = args.max_seq_len or max_len
    warmup = max(args.warmup, 1)
    reps = max(args.reps or (1 if args.quick else 5 if device.type == "cpu" else 10), 1)
    bf16 = device.type == "cuda"

    from tqdm import tqdm

    meta = common.run_metadata(device)
    rows: list[dict] = []
    notes_impl: dict[str, str] = {}
    interleaved_shapes = []
    deadline = common.Deadline(args.time_limit)
    with tqdm(total=len(shapes) * len(args.providers), desc="bench_train", unit="run", file=sys.stderr) as progress:
        for shape in shapes:
            if deadline.skip():
                continue
            fields = shape_fields(shape, device.type, args.v2_lite_layers)
            n = args.tokens or tokens.get(shape, 2048)
            lengths = [max_len] * max(n // max_len, 1) if args.equal_lengths else sequence_lengths(n, max_len)
            n = sum(lengths)
            specs = [dict(device=str(device), fields=fields, lengths=lengths, provider=provider, bf16=bf16,
                          warmup=warmup, reps=reps, budget_s=args.budget) for provider in args.providers]
            interleave = args.isolate != "all" and state_gib(fields) * len(specs) <= args.interleave_gib
            isolate = args.isolate == "all" or (args.isolate == "auto" and not interleave)
            if interleave:
                interleaved_shapes.append(shape)
                progress.set_postfix_str(f"{shape} (all providers, interleaved)")
                results = run_interleaved(specs)
                progress.update(len(specs))
            else:
                results = []
                for spec in specs:
                    progress.set_postfix_str(f"{shape} {spec['provider']}")
                    results.append(spawn_worker(spec, args.timeout) if isolate else run_in_process(spec))
                    progress.update(1)
            for provider, result in zip(args.providers, results):
                row = {"shape": shape, "tokens": n, "seqs": len(lengths),
                       "pad %": 100.0 * (1 - n / (len(lengths) * max(lengths))), "provider": provider}
                if "error" in result:
                    print(f"\n{shape} {provider}: {result['error']}", file=sys.stderr)
                    row["provider"] = provider + " (failed)"
                else:
                    row.update({"loss": result["loss"], "ms/step": result["ms"],
                                "tokens/s": n / (result["ms"] * 1e-3), "peak MiB": result["peak_mib"],
                                "state MiB": result["state_mib"]})
                    if result["peak_mib"] is not None:  # less the gradients (a third of the state)
                        row["extra MiB"] = result["peak_mib"] - result["state_mib"] / 3
                    if result.get("total_mib") is not None:
                        row["total MiB"] = result["total_mib"]
                    if result.get("experts_implementation"):
                        notes_impl[provider] = (f"attention {result['attn_implementation']}, "
                                                f"experts {result['experts_implementation']}")
                rows.append(row)
    add_ratios(rows)
    columns = COLUMNS + (["total MiB"] if device.type == "cuda" else [])

    if device.type == "cuda":
        memory_how = "CUDA max_memory_allocated; total MiB: the absolute peak"
    else:
        memory_how = ("CPU resident memory, with every allocation >= 64 KiB served by mmap during that step, "
                      "VmHWM reset via /proc/self/clear_refs after malloc_trim")

    notes = [f"{s}: {describe(shape_fields(s, device.type, args.v2_lite_layers))}" for s in shapes]
    notes += deadline.notes()
    notes += [
        f"one step = zero_grad, forward, loss, backward, AdamW step (lr 1e-5, fused=True); "
        f"{'bf16 autocast, fp32 weights' if bf16 else 'fp32'}; {warmup} warm-up step(s) and one memory step, "
        f"then the median of up to {reps} timed steps (fewer once {args.budget:g} s of steps have passed)"
        + ("; glibc's mmap threshold fixed at 32 MiB (its steady state) for the timed steps"
           if device.type == "cpu" else ""),
        "batch: sequences of random lengths in [S/4, S] (S = max-seq-len "
        f"{max_len}{', all S with --equal-lengths' if args.equal_lengths else ''}) summing to N tokens; ours "
        "packs them (cu_seqlens), transformers right-pads them to [B, S_max] (pad %: padding share of its "
        "batch); tokens/s counts the N real tokens",
        "loss: mean next-token NLL of the first step (the same weights for every provider: equal losses check "
        "that the models are the same)",
        "peak MiB: the peak memory of one step (after the warm-up, untimed) above the memory held before it "
        "(parameters and AdamW moments; gradients set to None): " + memory_how,
        "extra MiB: peak MiB less the gradients (activations, logits and temporaries); state MiB: parameters + "
        "AdamW moments (the same for every provider)",
        "x transformers: tokens/s over transformers' (> 1: faster); mem ratio, extra ratio: peak MiB, extra MiB "
        "over transformers' (< 1: less)",
    ]
    notes += [f"{p}: transformers {impl}" for p, impl in notes_impl.items()]
    sequential = [s for s in shapes if s not in interleaved_shapes]
    where = {"auto": "each in a fresh process", "all": "each in a fresh process",
             "none": "each model freed before the next is built"}[args.isolate]
    notes.append("providers timed round-robin (one step each per round, all models built): "
                 + (", ".join(interleaved_shapes) or "no shape")
                 + (f"; one provider after the other ({where}): {', '.join(sequential)}" if sequential else ""))
    if device.type == "cpu":
        notes.append("the CPU is shared with other jobs: times vary from run to run, most where providers "
                     "run one after the other")
    common.report("Training step: ours vs transformers (benchmarks/bench_train.py)", meta, notes, rows, columns,
                  targets(rows, device), args.markdown, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
