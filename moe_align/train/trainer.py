"""What every trainer shares: configuration, processes, optimisation, logging and checkpoints.

A trainer subclasses :class:`Trainer` and supplies its data (:meth:`Trainer.build_loader`) and
its loss on one micro-batch (:meth:`Trainer.compute_loss`); :meth:`Trainer.train` runs the loop::

    for each step:  zero grads
                    for each of grad_accum micro-batches:  loss = compute_loss(mb) ; loss.backward()
                    clip grads ; AdamW step ; LR schedule step ; (V3) correction-bias update
                    progress bar, metrics.jsonl, checkpoint every save_every steps

Losses are normalised by a count over the whole global batch (all micro-batches of all ranks;
see :meth:`Trainer.global_sum`), so the gradient of a step is the same whether it is computed
by one process accumulating ``N`` micro-batches or by ``N`` processes under torchrun.

Under ``torchrun --nproc_per_node=N`` the trainer joins the process group (gloo on the CPU,
nccl on GPUs) and wraps the model's log-prob computation in DistributedDataParallel;
``--fsdp`` shards each decoder layer with FSDP2 (``fully_shard``) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import json
import math
import os
import random
import time
import typing
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from moe_align.models.deepseek import PRESETS, DeepseekConfig, DeepseekForCausalLM
from moe_align.modules.moe import update_correction_biases_
from moe_align.train import checkpoint as ckpt
from moe_align.train.data import IGNORE_INDEX, PackedBatch
from moe_align.train.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class TrainConfig:
    """Options common to every trainer (each is also a ``--flag``; ``--config file.json`` sets many)."""

    model: str = "small"  # a preset name, or a model/checkpoint directory to start from
    tokenizer: str = "char"  # "char" (built in) or a transformers tokenizer name/path
    data: str = ""  # JSONL dataset; empty = the built-in demo data
    output_dir: str = ""  # default runs/<trainer>
    max_seq_len: int = 256  # longest example (longer ones are an error)
    batch_tokens: int = 2048  # tokens per packed micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps (0: after `epochs`)
    lr: float = 1e-5
    schedule: str = "constant"  # constant | cosine | linear (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine/linear schedule's floor, as a fraction of lr
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0: no clipping)
    bias_update_speed: float = 0.0  # DeepSeek-V3 auxiliary-loss-free balancing gamma (0: off)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: str = "auto"  # bf16 autocast: auto (on GPUs) | on | off
    fsdp: bool = False  # shard the model with FSDP2 (under torchrun)
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    resume: str = ""  # a checkpoint directory, or "auto" (the latest under output_dir)
    progress: bool = True


# ---- configuration from flags and files -----------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One ``--flag`` per dataclass field (bools as ``--flag/--no-flag``) plus ``--config``."""
    parser.add_argument("--config", default=None, help="JSON file of options (flags override it)")
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = hints[field.name]
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {default})")
        elif typing.get_origin(kind) in (list, tuple) or isinstance(default, (list, dict)):
            parser.add_argument(flag, type=json.loads, default=None, help=f"JSON (default {json.dumps(default)})")
        else:
            parser.add_argument(flag, type=kind if kind in (int, float, str) else str, default=None,
                                help=f"(default {default!r})")


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """Defaults, then the ``--config`` file, then explicit flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        with open(args.config) as f:
            values.update(json.load(f))
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"--config {args.config}: unknown option(s) {sorted(unknown)}")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return config_class(**values)


# ---- processes ------------------------------------------------------------------------------------


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the process group was created by init(), not by the caller

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, device_type: str) -> DistInfo:
        """Join torchrun's process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA),
        creating it unless the caller already has."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU if there is one, else the CPU. ``"cuda"`` without an index
    means the process's own GPU (``LOCAL_RANK`` under torchrun), as ``torch.cuda.set_device`` and
    DDP need an index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(spec: str, tokenizer: Tokenizer, device: torch.device, **overrides: Any) -> DeepseekForCausalLM:
    """A preset name (its vocabulary resized to the tokenizer's) or a model directory."""
    if os.path.isdir(spec):
        model, _ = ckpt.load_model(spec, device)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model in {spec!r} only "
                             f"{model.config.vocab_size}")
        return model
    if spec not in PRESETS:
        raise ValueError(f"model={spec!r} is neither a preset ({sorted(PRESETS)}) nor a model directory")
    fields = dict(PRESETS[spec], vocab_size=tokenizer.vocab_size, **overrides)
    return DeepseekForCausalLM(DeepseekConfig(**fields), device=device)


class TokenLogprobs(nn.Module):
    """``model.token_logprobs`` as a module's forward, so DDP / FSDP hooks see the whole
    computation (hidden states and the fused head): packed batch -> ``logp [T]`` float32."""

    def __init__(self, model: DeepseekForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, cu_seqlens, max_seqlen: int, labels) -> torch.Tensor:
        logp = self.model.token_logprobs(input_ids, cu_seqlens, max_seqlen, labels)[0]
        return logp.clone() if logp._is_view() else logp  # FSDP's backward hook needs a non-view output


class MetricsLogger:
    """Appends one JSON object per call to ``path`` (main process only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def lr_factor(step: int, total: int, schedule: str, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then constant / cosine / linear decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    raise ValueError(f"schedule={schedule!r} must be constant, cosine or linear")


# ---- the trainer ----------------------------------------------------------------------------------


class Trainer:
    """Base trainer. Subclasses set :attr:`name`, :attr:`config_class` and implement
    :meth:`build_loader` and :meth:`compute_loss`."""

    name = "train"
    config_class: type = TrainConfig

    def __init__(self, config: TrainConfig, model: DeepseekForCausalLM | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        if config.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"schedule={config.schedule!r} must be constant, cosine or linear")
        if config.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16={config.bf16!r} must be auto, on or off")
        for name in ("batch_tokens", "grad_accum", "max_seq_len", "log_every"):
            if getattr(config, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
        self.output_dir = config.output_dir or os.path.join("runs", self.name)
        device_type = "cuda" if config.device.startswith("cuda") or (
            config.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.dist = DistInfo.init(device_type)
        self.device = resolve_device(config.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.autocast_dtype = torch.bfloat16 if (
            config.bf16 == "on" or (config.bf16 == "auto" and self.device.type == "cuda")) else None

        seed_everything(config.seed)  # the same initial weights on every rank
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        self.model = model if model is not None else build_model(config.model, self.tokenizer, self.device)
        self.model.to(self.device)
        self.setup_model()
        self.loader = self.build_loader()
        self.objective = self.wrap(self.build_objective())
        # after wrapping: FSDP replaces the parameters by sharded ones
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("no parameter of the model requires a gradient")
        # The fused kernel: one pass over each parameter's state (6.6x the default foreach step
        # on a 1.5 GB expert weight on 2 CPU cores). FSDP's sharded DTensors keep the default.
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                           weight_decay=config.weight_decay, fused=not self.sharded)
        self.total_steps = self.compute_total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, config.schedule, config.warmup_steps,
                                                config.min_lr_ratio))
        self.step = 0
        self.metrics = MetricsLogger(os.path.join(self.output_dir, "metrics.jsonl") if self.dist.is_main else None)
        seed_everything(config.seed + 7919 * self.dist.rank)  # per-rank streams from here on (sampling)
        if config.resume:
            path = ckpt.latest_checkpoint(self.output_dir) if config.resume == "auto" else config.resume
            if path is not None:
                self.load_checkpoint(path)

    # ---- hooks for subclasses --------------------------------------------------------------------

    def setup_model(self) -> None:
        """Called after the model is on its device, before the optimizer is built (freeze here)."""

    def process_gradients(self) -> None:
        """Called once the step's gradients are complete (reduced over ranks, sharded under FSDP),
        before clipping and the optimizer step: mask or rescale ``p.grad`` in place here."""

    def build_objective(self) -> nn.Module:
        """The module whose forward carries the gradient (wrapped by DDP / FSDP): log-probs by default."""
        return TokenLogprobs(self.model)

    def build_loader(self) -> Any:
        """An iterable of steps, each this rank's list of micro-batches, with state_dict()."""
        raise NotImplementedError

    def count_units(self, micro_batch: Any) -> int:
        """How many of the units a step's loss is a mean over (targets, pairs, ...) one micro-batch holds."""
        raise NotImplementedError

    def loss_denominator(self, micro_batches: Sequence[Any]) -> float:
        """The step's units over all its micro-batches and ranks, divided by the world size (DDP
        averages gradients over ranks), so that per-micro-batch loss sums divided by it add up to
        the mean over the global batch."""
        local = sum(self.count_units(mb) for mb in micro_batches)
        return max(self.global_sum(local), 1.0) / self.dist.world_size

    def compute_loss(self, micro_batch: Any, denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch, its sum over units divided by ``denominator``
        (:meth:`loss_denominator`), and its metrics (summed over micro-batches and ranks, then
        divided by the step's ``"_count"`` metric if present)."""
        raise NotImplementedError

    def compute_total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        return self.config.epochs * self.loader.steps_per_epoch()

    def extra_state(self) -> dict[str, Any]:
        """Anything more a subclass needs in a checkpoint (JSON-serialisable)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---- processes -------------------------------------------------------------------------------

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.dist.world_size == 1:
            return module
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.model.layers:
                fully_shard(layer)
            fully_shard(module)
            return module
        from torch.nn.parallel import DistributedDataParallel

        # The gate's token counters are buffers that differ per rank (summed explicitly when used):
        # never overwrite them with rank 0's in forward.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       **no_buffer_sync)

    def global_sum(self, value: float | torch.Tensor) -> float:
        """Sum of a number over all ranks."""
        if self.dist.world_size == 1:
            return float(value)
        return float(self.all_reduce_(torch.tensor([float(value)], dtype=torch.float64)))

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size > 1:
            on_cpu = tensor.device.type == "cpu" and dist.get_backend() == "nccl"
            buf = tensor.to(self.device) if on_cpu else tensor
            dist.all_reduce(buf)
            if on_cpu:
                tensor.copy_(buf)
        return tensor

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this trainer created; every rank calls it once training is
        over (the command line does, after :meth:`train`). The trainer cannot train after it.

        Without it the group lives until the interpreter tears down, and gloo's worker threads,
        still holding tensors then, can abort a finished run at exit ("terminate called without
        an active exception", SIGABRT), which torchrun reports as a failure: 5 of 20 two-process
        runs whose rank 0 saved a file after the last step, 0 of 40 with this call. The DDP
        wrapper is released first, and collected (it sits in reference cycles), because its
        reducer keeps the group alive past ``destroy_process_group`` (the same runs with a plain
        barrier and destroy: 1 of 30 aborted). A group the caller created is left to the caller.
        """
        if not self.dist.owns_group or not dist.is_initialized():
            return
        self.objective = None
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        if last or not hasattr(self.objective, "no_sync"):
            return contextlib.nullcontext()
        return self.objective.no_sync()

    # ---- the loop --------------------------------------------------------------------------------

    def token_logprobs(self, batch: PackedBatch) -> torch.Tensor:
        """``logp [T]`` of the batch's next tokens through the (possibly wrapped) model."""
        with self.autocast():
            return self.objective(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.labels)

    def train_step(self, micro_batches: Sequence[Any]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's metrics."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        denominator = self.loss_denominator(micro_batches)
        for i, mb in enumerate(micro_batches):
            with self.no_sync(last=i == len(micro_batches) - 1):
                loss, metrics = self.compute_loss(mb, denominator)
                loss.backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        if self.config.bias_update_speed:
            update_correction_biases_(self.model, self.config.bias_update_speed, reduce=self.all_reduce_)
        out = {k: self.global_sum(v) for k, v in sorted(sums.items())}
        count = out.pop("_count", None)
        if count:
            out = {k: (v / count if not k.startswith("num_") else v) for k, v in out.items()}
        out["grad_norm"] = grad_norm
        return out

    def clip_gradients(self) -> float:
        """After a step's backward passes: :meth:`process_gradients`, then clip the gradients to
        ``grad_clip`` (0: no clipping); returns their total norm before clipping."""
        self.process_gradients()
        if self.config.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip))
        return float(torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None]))

    def train(self) -> dict[str, float]:
        """Run to ``total_steps``; returns the last step's metrics."""
        from tqdm.auto import tqdm

        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   disable=not (config.progress and self.dist.is_main))
        last: dict[str, float] = {}
        steps = iter(self.loader)
        tick = time.perf_counter()
        while self.step < self.total_steps:
            micro_batches = next(steps)
            lr = self.scheduler.get_last_lr()[0]
            metrics = self.train_step(micro_batches)
            self.step += 1
            now = time.perf_counter()
            metrics["lr"] = lr
            if "num_tokens" in metrics:
                metrics["tokens_per_s"] = metrics["num_tokens"] / max(now - tick, 1e-9)
            tick = now
            if self.device.type == "cuda":
                # the step's peak: a trainer that resets the counter per phase reports each as mem/<phase>_gb
                metrics["peak_mem_gb"] = max([torch.cuda.max_memory_allocated(self.device) / 2**30]
                                             + [v for k, v in metrics.items() if k.startswith("mem/")])
            last = metrics
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                self.metrics.log({"step": self.step, **metrics})
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "reward", "accuracy", "tokens_per_s", "lr")
                                if k in metrics})
            bar.update(1)
            if config.save_every and self.step % config.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        return last

    # ---- checkpoints -----------------------------------------------------------------------------

    def checkpoint_dir(self, step: int | None = None) -> str:
        return os.path.join(self.output_dir, f"checkpoint-{self.step if step is None else step}")

    @property
    def sharded(self) -> bool:
        return self.config.fsdp and self.dist.world_size > 1

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state dict; all ranks call it."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The full optimizer state (gathered from the shards under FSDP); all ranks call it."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, directory: str | None = None) -> str:
        """Write the model, optimizer, schedule, step, data position and every RNG (all ranks call it)."""
        directory = directory or self.checkpoint_dir()
        tmp = directory.rstrip("/") + ".tmp"
        model_state = self.model_state_dict()
        optimizer_state = self.optimizer_state_dict()
        if self.dist.is_main:
            ckpt.begin_checkpoint(directory)
            ckpt.save_model(self.model, tmp, self.config.tokenizer, model_state)
            torch.save({"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()},
                       os.path.join(tmp, ckpt.OPTIMIZER_NAME))
            state = {"trainer": self.name, "step": self.step, "loader": self.loader.state_dict(),
                     "world_size": self.dist.world_size, "config": dataclasses.asdict(self.config),
                     "extra": self.extra_state()}
            with open(os.path.join(tmp, ckpt.STATE_NAME), "w") as f:
                json.dump(state, f, indent=2)
        self.barrier()
        torch.save(ckpt.rng_state(), os.path.join(tmp, f"rng_{self.dist.rank}.pt"))
        self.barrier()
        if self.dist.is_main:
            ckpt.commit_checkpoint(directory)
        self.barrier()
        return directory

    def load_checkpoint(self, directory: str) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; the next step is the one that followed."""
        state = ckpt.read_trainer_state(directory)
        if state["trainer"] != self.name:
            raise ValueError(f"{directory!r} is a {state['trainer']!r} checkpoint, not {self.name!r}")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"{directory!r} was written by {state['world_size']} processes; resume with as many")
        target = torch.device("cpu") if self.sharded else self.device
        weights = load_file(os.path.join(directory, ckpt.WEIGHTS_NAME), device=str(target))
        opt = torch.load(os.path.join(directory, ckpt.OPTIMIZER_NAME), map_location=target, weights_only=False)
        if self.sharded:  # scatter the full tensors into this rank's shards
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, opt["optimizer"], options=options)
        else:
            self.model.load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.load_extra_state(state.get("extra", {}))
        ckpt.set_rng_state(torch.load(os.path.join(directory, f"rng_{self.dist.rank}.pt"), weights_only=False))


__all__ = ["TrainConfig", "Trainer", "TokenLogprobs", "MetricsLogger", "DistInfo", "build_model",
           "add_config_arguments", "config_from_args", "lr_factor", "IGNORE_INDEX"]
