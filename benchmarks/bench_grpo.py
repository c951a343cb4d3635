"""One GRPO iteration (rollout + update): rollout and update tokens/s and peak memory, side by side.

Providers (one row each per shape):
  ours           moe_align.train.grpo.GRPOTrainer.train_step on one batch of prompts of the
                 built-in arithmetic task: paged-cache generation, rewards, old (and reference)
                 log-probs and the update through the fused LM head; phase times are the
                 trainer's own metrics (time/rollout_s, time/update_s, ...)
  transformers   the same GRPO step written the way TRL computes it, on transformers'
                 DeepseekV3ForCausalLM / DeepseekV2ForCausalLM holding our weights: model.generate
                 (dynamic cache), rewards, then every log-prob from full logits
                 (forward -> [B, S, V] logits -> log_softmax -> gather) and the same loss
                 (moe_align.train.grpo.grpo_step_loss), gradient clipping and AdamW step
  trl            TRL's GRPOTrainer on the same transformers model and prompts, where TRL is
                 installed (a step's wall time and peak memory only)

The prompts, group size, completion length, loss and optimizer settings are the same for every
provider. With random weights the policy rarely samples eos, so completions run to
max_new_tokens and every provider processes the same number of tokens.

    python benchmarks/bench_grpo.py --threads 1        # CPU-sized defaults (a few minutes on 2 cores)
    python benchmarks/bench_grpo.py --quick            # a smoke run for CI
    python benchmarks/bench_grpo.py --device cuda      # bf16 autocast, V2-Lite with its vocabulary
    python benchmarks/bench_grpo.py --threads 1 --markdown benchmarks/results/grpo_cpu.md
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_train import (STEADY_MMAP_THRESHOLD, PeakMemory, _malloc_trim, _mmap_threshold, describe,  # noqa: E402
                         hf_model, shape_fields, state_gib)

from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM  # noqa: E402
from moe_align.ops.grpo import TRL_LOSS_TYPES  # noqa: E402
from moe_align.train.grpo import (  # noqa: E402
    GRPOConfig,
    GRPOTrainer,
    PromptLoader,
    builtin_prompt_records,
    encode_prompts,
    grpo_step_loss,
    masked_group_advantages,
    reward_columns,
)
from moe_align.train.rewards import RewardMix  # noqa: E402
from moe_align.train.tokenizer import CharTokenizer  # noqa: E402

PROVIDERS = ["ours", "transformers", "trl"]
BASELINE = "transformers"
SHAPES = ["small", "v2-lite", "tiny-v2"]


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: int  # P prompts per step
    group: int  # G outputs per prompt
    new_tokens: int  # max_new_tokens
    beta: float  # KL coefficient (0: no reference model)


DEFAULTS = {  # device type -> shape -> workload
    "cpu": {"small": Workload(4, 8, 32, 0.04),
            # V2-Lite-shaped at 2 layers is ~0.8 B parameters: without the reference copy the step
            # fits next to other jobs on a 24 GB machine
            "v2-lite": Workload(2, 4, 16, 0.0)},
    "cuda": {"small": Workload(16, 8, 128, 0.04), "v2-lite": Workload(16, 8, 128, 0.04)},
}
QUICK = {"small": Workload(2, 4, 8, 0.04), "tiny-v2": Workload(2, 4, 8, 0.04)}
LR = 1e-6


def grpo_config(w: Workload, device: torch.device, output_dir: str) -> GRPOConfig:
    return GRPOConfig(
        model="small", output_dir=output_dir, device=str(device), prompts_per_step=w.prompts, group_size=w.group,
        max_new_tokens=w.new_tokens, max_seq_len=w.new_tokens + 64, beta=w.beta, lr=LR, temperature=1.0,
        batch_tokens=1 << 30,  # one micro-batch per pass: the same batch the transformers provider runs
        max_steps=1, progress=False, log_entropy=True, seed=0)


def make_model(fields: dict, device: torch.device) -> DeepseekForCausalLM:
    torch.manual_seed(0)
    return DeepseekForCausalLM(DeepseekConfig(**fields), device=device)


class Phases:
    """Wall time per phase: ``with phases("rollout"): ...`` sets ``times["time/rollout_s"]``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        common.sync(self.device)
        start = time.perf_counter()
        yield
        common.sync(self.device)
        self.times[f"time/{name}_s"] = time.perf_counter() - start


# --------------------------------------------------------------------------- ours


def ours_runner(fields: dict, w: Workload, device: torch.device, tmp: str):
    tokenizer = CharTokenizer()
    config = grpo_config(w, device, tmp)
    trainer = GRPOTrainer(config, model=make_model(fields, device), tokenizer=tokenizer)
    # the trainer's own fused AdamW, as for the other providers; the schedule stays constant
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    prompts = next(iter(trainer.loader))

    def step() -> dict:
        # train_step leaves trainer.step at 0: every call samples with the same seed
        m = trainer.train_step(prompts)
        out = {"rollout": m["time/rollout_s"], "reward": m["time/reward_s"],
               "logp": m["time/policy_logp_s"] + m.get("time/ref_logp_s", 0.0), "update": m["time/update_s"],
               "generated": m["rollout_tokens_per_s"] * m["time/rollout_s"], "update_tokens": m["update_tokens"]}
        mem = [v for k, v in m.items() if k.startswith("mem/")]
        if mem:  # CUDA: the trainer resets the peak per phase; its per-phase peaks (GiB) are the record
            out["cuda_peak_mib"] = max(mem) * 1024
        return out

    return step


# --------------------------------------------------------------------------- transformers, as TRL computes it


def first_batch(w: Workload, tokenizer, max_prompt_len: int, seed: int = 0):
    """The prompts of the GRPO trainer's first step (the same loader, seed and encoding)."""
    items = encode_prompts(builtin_prompt_records(), tokenizer, max_prompt_len)
    return next(iter(PromptLoader(items, w.prompts, seed=seed)))


def full_logit_logps(model, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int,
                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, L] of the completion tokens ids[:, prompt_len:] from full logits (TRL's
    selective_log_softmax is this gather; the [B, S, V] logits are materialised either way)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_len - 1:-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if entropy else None
    return logp, ent


def transformers_runner(fields: dict, w: Workload, device: torch.device, bf16: bool):
    import copy

    config = DeepseekConfig(**fields)
    model = hf_model(config, make_model(fields, device).state_dict(), device)
    model.train()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if w.beta > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    tokenizer = CharTokenizer()
    gconf = grpo_config(w, device, "")
    prompts = first_batch(w, tokenizer, gconf.max_seq_len - w.new_tokens)
    mix = RewardMix(gconf.rewards)
    G, eos, pad = w.group, tokenizer.eos_id, tokenizer.pad_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # the prompts left-padded, each repeated G times (as TRL's generation batch)
    width = max(len(p.prompt_ids) for p in prompts)
    rows = [[pad] * (width - len(p.prompt_ids)) + p.prompt_ids for p in prompts for _ in range(G)]
    prompt_ids = torch.tensor(rows, device=device)
    prompt_mask = (torch.arange(width, device=device) >= torch.tensor(
        [width - len(p.prompt_ids) for p in prompts for _ in range(G)], device=device).unsqueeze(1)).long()

    def step() -> dict:
        phase = Phases(device)
        torch.manual_seed(0)
        with phase("rollout"), torch.no_grad(), autocast:
            model.eval()
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=w.new_tokens, eos_token_id=eos,
                                 pad_token_id=pad)
            model.train()
        completion = out[:, width:]
        # tokens after the first eos are padding
        is_eos = completion == eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion.shape[1])
        cmask = (torch.arange(completion.shape[1], device=device).unsqueeze(0) <= first.unsqueeze(1)).float()
        lengths = cmask.sum(1).long().tolist()
        with phase("reward"):
            records = [p.record for p in prompts]
            texts = [tokenizer.decode(c[:n].tolist()) for c, n in zip(completion, lengths)]
            scores = mix([r["prompt"] for r in records for _ in range(G)], texts, **reward_columns(records, G))
            advantages = masked_group_advantages(scores.total, scores.valid, G).to(device)
        ids = torch.cat([prompt_ids, completion], 1)
        mask = torch.cat([prompt_mask, cmask.long()], 1)
        cmask = cmask * scores.valid.to(device).unsqueeze(1)
        with phase("logp"), torch.no_grad(), autocast:
            old_logp, _ = full_logit_logps(model, ids, mask, width, entropy=True)
            ref_logp = full_logit_logps(reference, ids, mask, width)[0] if reference is not None else None
        with phase("update"):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logp, _ = full_logit_logps(model, ids, mask, width)
            loss, _ = grpo_step_loss(logp, advantages, cmask, old_logp, ref_logp,
                                     num_sequences=float(scores.valid.sum()), num_tokens=float(cmask.sum()),
                                     eps_low=gconf.eps_low, eps_high=gconf.eps_high, beta=w.beta,
                                     loss_type=gconf.loss_type, max_len=w.new_tokens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), gconf.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t = phase.times
        return {"rollout": t["time/rollout_s"], "reward": t["time/reward_s"], "logp": t["time/logp_s"],
                "update": t["time/update_s"], "generated": float(sum(lengths)),
                "update_tokens": float(sum(width_i + n for width_i, n in
                                           zip([len(p.prompt_ids) for p in prompts for _ in range(G)], lengths)))}

    return step


# --------------------------------------------------------------------------- TRL (where installed)


def char_hf_tokenizer(tokenizer: CharTokenizer):
    """Our character tokenizer as a transformers PreTrainedTokenizerFast (the same ids), for TRL."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(tokenizer.SPECIALS)} | {c: i + len(tokenizer.SPECIALS)
                                                                for i, c in enumerate(tokenizer.alphabet)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def trl_runner(fields: dict, w: Workload, device: torch.device, bf16: bool, tmp: str, reps: int,
               budget_s: float) -> dict:
    """TRL's GRPOTrainer for up to 2 + reps steps (warm-up, memory, then timed ones until budget_s
    seconds have passed): the median step time, the memory step's peak and the generated tokens
    of a step."""
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    config = DeepseekConfig(**fields)
    model = hf_model(config, make_model(fields, device).state_dict(), device)
    if w.beta > 0:  # TRL builds its reference model from the policy's name_or_path: give it a saved copy
        model.save_pretrained(f"{tmp}/model")
        model.config._name_or_path = f"{tmp}/model"
    gconf = grpo_config(w, device, tmp)
    records = builtin_prompt_records()
    mix = RewardMix(gconf.rewards)

    def reward(prompts, completions, **columns):
        cols = {k: v for k, v in columns.items() if k in ("answer", "response")}
        return mix(prompts, completions, **cols).total.tolist()

    reward.__name__ = "reward_mix"
    # The loss ours computes: by default eq. 32's aggregation (TRL's "grpo"; its default is "dapo")
    # and eq. 33's KL (TRL 1.x weights it by the ratio unless use_bias_correction_kl=False).
    same_loss = {"loss_type": TRL_LOSS_TYPES[gconf.loss_type], "epsilon_high": gconf.eps_high}
    if "use_bias_correction_kl" in {f.name for f in dataclasses.fields(trl.GRPOConfig)}:
        same_loss["use_bias_correction_kl"] = gconf.unbiased_kl
    args = trl.GRPOConfig(output_dir=tmp, per_device_train_batch_size=w.prompts * w.group, num_generations=w.group,
                          max_completion_length=w.new_tokens, max_steps=2 + reps, beta=w.beta, learning_rate=LR,
                          adam_beta2=0.95, max_grad_norm=gconf.grad_clip, temperature=1.0, top_p=1.0,
                          epsilon=gconf.eps_low, logging_steps=1, report_to="none", save_strategy="no",
                          bf16=bf16, use_cpu=device.type == "cpu", seed=0, **same_loss)

    class Timer(TrainerCallback):
        """Step 0: warm-up; step 1: inside a PeakMemory reading; the others timed."""

        def __init__(self):
            self.times, self.step, self.peak, self.start = [], 0, PeakMemory(device), 0.0

        def on_step_begin(self, *a, **k):
            if self.step == 1:
                self.peak.__enter__()
            common.sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            common.sync(device)
            if self.step == 1:
                self.peak.__exit__(None, None, None)
            elif self.step > 1:
                self.times.append(time.perf_counter() - self.start)
                if sum(self.times) >= budget_s:
                    control.should_training_stop = True
            self.step += 1

    timer = Timer()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list(records),
                              processing_class=char_hf_tokenizer(CharTokenizer()), callbacks=[timer])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step": statistics.median(timer.times), "peak_mib": timer.peak.mib, "total_mib": timer.peak.total_mib,
            "generated": float(lengths[-1]) * w.prompts * w.group if lengths else None,
            "info": f"TRL {trl.__version__}, loss_type {args.loss_type}, "
                    f"optim {getattr(args.optim, 'value', args.optim)}"}


# --------------------------------------------------------------------------- measuring


class Measured:
    """A provider's step function: one warm-up call, one call inside a :class:`PeakMemory`
    reading (untimed), then :meth:`timed_step` times one more call."""

    def __init__(self, step, device: torch.device, reps: int, budget_s: float) -> None:
        self.step, self.device, self.reps, self.budget_s = step, device, reps, budget_s
        step()
        with PeakMemory(device) as peak:
            result = step()
        phase_peak = result.get("cuda_peak_mib")
        if phase_peak is not None and peak.total_mib is not None:
            # CUDA, ours: the trainer resets the peak at each phase; its per-phase peaks are the record
            peak.total_mib = max(peak.total_mib, phase_peak)
            peak.mib = peak.total_mib - peak.before_mib
        self.peak = peak
        self.results: list[dict] = []

    def wants_more(self) -> bool:
        """At least one timed step, at most reps, until budget_s seconds of them have passed."""
        return len(self.results) < self.reps and (not self.results
                                                  or sum(r["step"] for r in self.results) < self.budget_s)

    def timed_step(self) -> None:
        common.sync(self.device)
        start = time.perf_counter()
        result = self.step()
        common.sync(self.device)
        result["step"] = time.perf_counter() - start
        result.pop("cuda_peak_mib", None)
        self.results.append(result)

    def result(self) -> dict:
        out = {k: statistics.median(r[k] for r in self.results) for k in self.results[0]}
        out["peak_mib"], out["total_mib"] = self.peak.mib, self.peak.total_mib
        return out


def build(provider: str, fields: dict, w: Workload, device: torch.device, bf16: bool, tmp: str):
    if provider == "ours":
        return ours_runner(fields, w, device, tmp)
    return transformers_runner(fields, w, device, bf16)


def run_trl(fields: dict, w: Workload, device: torch.device, bf16: bool, reps: int, budget_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return trl_runner(fields, w, device, bf16, tmp, reps, budget_s)


def _error(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _malloc_trim()


def run_shape(providers: list[str], fields: dict, w: Workload, device: torch.device, bf16: bool, reps: int,
              budget_s: float, interleave: bool) -> list[dict]:
    """Each provider's result (or {"error": ...}). ``interleave``: all providers built at once and
    timed round-robin, one step each per round; else one after the other, each freed first."""
    results: dict[str, dict] = {}

    def make(provider: str, tmp: str) -> Measured | None:
        try:
            return Measured(build(provider, fields, w, device, bf16, tmp), device, reps, budget_s)
        except Exception as err:  # one failing provider must not lose the table
            results[provider] = _error(err)
            return None

    def drive(measured: dict[str, Measured]) -> None:
        while any(m.wants_more() for m in measured.values()):
            for provider, m in list(measured.items()):
                if m.wants_more():
                    try:
                        m.timed_step()
                    except Exception as err:
                        results[provider] = _error(err)
                        del measured[provider]
        for provider, m in measured.items():
            results[provider] = m.result()

    local = [p for p in providers if p != "trl"]
    groups = [local] if interleave else [[p] for p in local]
    for group in groups:
        with tempfile.TemporaryDirectory() as tmp:
            measured = {p: m for p in group if (m := make(p, tmp)) is not None}
            drive(measured)
            del measured
        free(device)
    if "trl" in providers:
        try:
            results["trl"] = run_trl(fields, w, device, bf16, reps, budget_s)
        except Exception as err:
            results["trl"] = _error(err)
        free(device)
    return [results[p] for p in providers]


RESULT_TAG = "BENCH_GRPO_RESULT "


def run_shape_isolated(providers: list[str], fields: dict, w: Workload, device: torch.device, bf16: bool,
                       reps: int, budget_s: float, timeout: float) -> list[dict]:
    """:func:`run_shape` with each provider in a fresh Python process (a clean heap for the CPU
    memory reading)."""
    out = []
    for provider in providers:
        spec = dict(provider=provider, fields=fields, workload=dataclasses.asdict(w), device=str(device), bf16=bf16,
                    reps=reps, budget_s=budget_s)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(torch.get_num_threads()),
               "--worker", json.dumps(spec)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            out.append({"error": f"timed out after {timeout:.0f} s"})
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if lines:
            out.append(json.loads(lines[-1][len(RESULT_TAG):]))
        else:
            tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            out.append({"error": f"exit code {proc.returncode}: " + (tail[-1] if tail else "no output")})
    return out


def run_worker(spec: dict) -> dict:
    return run_shape([spec["provider"]], spec["fields"], Workload(**spec["workload"]), torch.device(spec["device"]),
                     spec["bf16"], spec["reps"], spec["budget_s"], interleave=False)[0]


COLUMNS = ["shape", "provider", "P x G", "new tok", "beta", "rollout s", "rollout tok/s", "reward s", "logp s",
           "update s", "update tok/s", "step s", "x tf rollout", "x tf update", "x tf step", "peak MiB", "mem ratio"]


def add_ratios(rows: list[dict]) -> None:
    """x tf *: transformers' time over this row's (> 1: faster); mem ratio: peak over transformers'."""
    base = {r["shape"]: r for r in rows if r["provider"] == BASELINE}
    for r in rows:
        b = base.get(r["shape"])
        if b is None:
            continue
        for col, key in (("x tf rollout", "rollout s"), ("x tf update", "update s"), ("x tf step", "step s")):
            if r.get(key) and b.get(key):
                r[col] = b[key] / r[key]
        if r.get("peak MiB") and b.get("peak MiB"):
            r["mem ratio"] = r["peak MiB"] / b["peak MiB"]


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ours = next((r for r in rows if r["shape"] == shape and r["provider"] == "ours"), None)
        base = next((r for r in rows if r["shape"] == shape and r["provider"] == BASELINE), None)
        if not ours or not base or not ours.get("step s") or not base.get("step s"):
            lines.append(f"info  {shape}: ours vs transformers not measured")
            continue
        lines.append(f"info  {shape}: rollout {ours['rollout tok/s']:.0f} vs {base['rollout tok/s']:.0f} tokens/s "
                     f"({ours['x tf rollout']:.2f}x), update {ours['update tok/s']:.0f} vs "
                     f"{base['update tok/s']:.0f} tokens/s ({ours['x tf update']:.2f}x), step "
                     f"{ours['x tf step']:.2f}x")
        if ours.get("mem ratio") is not None:
            ok = ours["mem ratio"] < 1
            lines.append(f"{'PASS' if ok else 'FAIL'}  {shape}: GRPO step peak {ours['peak MiB']:.0f} MiB vs "
                         f"transformers {base['peak MiB']:.0f} MiB = {ours['mem ratio']:.2f}x (lower is the target)")
        trl = next((r for r in rows if r["shape"] == shape and r["provider"] == "trl"), None)
        if trl and trl.get("step s"):
            mem = (f", peak {ours['peak MiB']:.0f} vs {trl['peak MiB']:.0f} MiB"
                   if ours.get("peak MiB") and trl.get("peak MiB") else "")
            lines.append(f"info  {shape}: step {ours['step s']:.2f} s vs TRL's GRPOTrainer {trl['step s']:.2f} s "
                         f"({trl['step s'] / ours['step s']:.2f}x){mem}")
    return lines


def parse_args(argv=None):
    p = common.argument_parser(__doc__, "a smoke run: small and tiny-v2, 2 prompts x 4, 8 new tokens")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, help="default: small v2-lite")
    p.add_argument("--prompts", type=int, help="prompts per step (P)")
    p.add_argument("--group", type=int, help="outputs per prompt (G)")
    p.add_argument("--new-tokens", type=int, help="max_new_tokens")
    p.add_argument("--beta", type=float, help="KL coefficient (0: no reference model)")
    p.add_argument("--v2-lite-layers", type=int, default=2, help="decoder layers of the v2-lite shape (default 2)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    p.add_argument("--reps", type=int, help="at most this many timed steps after one warm-up step (default: "
                   "CPU 3, GPU 5; quick 1)")
    common.add_step_arguments(p, budget=15.0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    _mmap_threshold(STEADY_MMAP_THRESHOLD)  # the same allocator setting before and after memory readings
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    device = common.bench_device(args.device)
    workloads = QUICK if args.quick else DEFAULTS[device.type]
    shapes = args.shapes or list(workloads)
    reps = max(args.reps or (1 if args.quick else 3 if device.type == "cpu" else 5), 1)
    bf16 = device.type == "cuda"

    def workload(shape: str) -> Workload:
        w = workloads.get(shape) or next(iter(workloads.values()))
        return Workload(args.prompts or w.prompts, args.group or w.group, args.new_tokens or w.new_tokens,
                        w.beta if args.beta is None else args.beta)

    from tqdm import tqdm

    meta = common.run_metadata(device)
    providers = list(args.providers)
    skipped = []
    if "trl" in providers:
        try:  # the trainer and its dependencies, not only TRL's lazy package
            import datasets  # noqa: F401
            import trl.trainer.grpo_trainer  # noqa: F401
        except ImportError as err:
            providers.remove("trl")
            skipped.append(f"TRL's GRPOTrainer not importable ({err}): skipped")
            print(skipped[-1], file=sys.stderr)
    rows: list[dict] = []
    interleaved_shapes = []
    trl_info: set[str] = set()
    deadline = common.Deadline(args.time_limit)
    with tqdm(total=len(shapes) * len(providers), desc="bench_grpo", unit="run", file=sys.stderr) as progress:
        for shape in shapes:
            if deadline.skip():
                continue
            fields = shape_fields(shape, device.type, args.v2_lite_layers)
            w = workload(shape)
            # per provider: the policy with gradients and AdamW moments (+ the reference's weights)
            per_provider = state_gib(fields) * (1.25 if w.beta > 0 else 1.0)
            interleave = args.isolate != "all" and per_provider * len(providers) <= args.interleave_gib
            if interleave:
                interleaved_shapes.append(shape)
            progress.set_postfix_str(shape + (" (interleaved)" if interleave else ""))
            isolate = args.isolate == "all" or (args.isolate == "auto" and not interleave)
            if isolate:
                results = run_shape_isolated(providers, fields, w, device, bf16, reps, args.budget, args.timeout)
            else:
                results = run_shape(providers, fields, w, device, bf16, reps, args.budget, interleave)
            progress.update(len(providers))
            for provider, r in zip(providers, results):
                row = {"shape": shape, "provider": provider, "P x G": f"{w.prompts} x {w.group}", "beta": w.beta}
                if "error" in r:
                    print(f"\n{shape} {provider}: {r['error']}", file=sys.stderr)
                    row["provider"] = provider + " (failed)"
                elif provider == "trl":
                    trl_info.add(r.get("info", ""))
                    row.update({"step s": r["step"], "peak MiB": r["peak_mib"], "total MiB": r.get("total_mib"),
                                "new tok": None if r["generated"] is None else int(r["generated"])})
                else:
                    row.update({"new tok": int(r["generated"]), "rollout s": r["rollout"],
                                "rollout tok/s": r["generated"] / r["rollout"], "reward s": r["reward"],
                                "logp s": r["logp"], "update s": r["update"],
                                "update tok/s": r["update_tokens"] / r["update"], "step s": r["step"],
                                "peak MiB": r["peak_mib"], "total MiB": r.get("total_mib")})
                rows.append(row)
    add_ratios(rows)
    columns = COLUMNS + (["total MiB"] if device.type == "cuda" else [])
    memory_how = ("CUDA max_memory_allocated (ours: the trainer's per-phase peaks); total MiB: the absolute peak"
                  if device.type == "cuda" else
                  "CPU resident memory, with every allocation >= 64 KiB served by mmap during that step "
                  "(VmHWM reset via /proc/self/clear_refs after malloc_trim)")
    notes = [f"{s}: {describe(shape_fields(s, device.type, args.v2_lite_layers))}" for s in shapes]
    notes += deadline.notes()
    notes += [
        "one GRPO iteration: P prompts x G sampled outputs (temperature 1, top-p 1) of up to 'new tok' / (P x G) "
        "tokens, rewards exact_answer + 0.2 format, advantages (eq. 34), old log-probs (+ entropy) and, with "
        "beta > 0, reference log-probs, then one update (sequence-mean GRPO loss, clip 0.2, grad clip 1, AdamW "
        f"lr {LR:g}, betas 0.9/0.95, fused), all sequences in one micro-batch; "
        + ("bf16 autocast, fp32 weights" if bf16 else "fp32"),
        f"times: median of up to {reps} steps (fewer once {args.budget:g} s have passed) after a warm-up step and "
        "a memory step; "
        "step s: wall time of the whole step (the phases plus batching and bookkeeping); "
        "rollout tok/s: generated tokens / rollout s; update tok/s: prompt + completion tokens through the "
        "update's forward+backward / update s",
        "transformers: model.generate with its dynamic cache, log-probs from full [B, S, V] logits (log_softmax, "
        "gather), the same grpo_step_loss: the computation of TRL's GRPOTrainer without TRL's bookkeeping",
        "peak MiB: peak memory of one whole step (after the warm-up step, untimed) above the memory held before "
        "it (weights, reference, AdamW moments): " + memory_how,
        "x tf rollout / update / step: transformers' time over this row's (> 1: faster); mem ratio: peak MiB "
        "over transformers' (< 1: less)",
        "the models have random weights and a character tokenizer (ids >= 100 decode to nothing): rewards are "
        "mostly 0 and completions run to max_new_tokens; the work per step is that of a real step",
    ]
    notes += skipped
    notes += [f"trl: {info}; group size, completion length, beta, clip range, lr and betas as above"
              for info in sorted(trl_info) if info]
    sequential = [s for s in shapes if s not in interleaved_shapes]
    where = "each model freed before the next is built" if args.isolate == "none" else "each in a fresh process"
    notes.append("providers timed round-robin (one step each per round, all models built): "
                 + (", ".join(interleaved_shapes) or "no shape")
                 + (f"; one provider after the other ({where}): {', '.join(sequential)}" if sequential else ""))
    if device.type == "cpu":
        notes.append("the CPU is shared with other jobs: times vary from run to run, most where providers "
                     "run one after the other")
    common.report("GRPO iteration: ours vs transformers (benchmarks/bench_grpo.py)", meta, notes, rows, columns,
                  targets(rows), args.markdown, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
