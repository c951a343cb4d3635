"""Model directories and training checkpoints.

A model directory holds ``config.json`` (the :class:`DeepseekConfig` fields and the tokenizer
name) and ``model.safetensors``. A training checkpoint is a model directory plus
``optimizer.pt`` (optimizer and learning-rate schedule), ``trainer_state.json`` (step, data
position, the training config) and ``rng_{rank}.pt`` (every random generator of each rank), so
that a resumed run takes exactly the steps the uninterrupted one would have taken.

Checkpoints are written into ``<dir>.tmp`` and renamed into place when complete: an interrupted
save never leaves a half-written checkpoint behind, and an earlier one is never overwritten
before the new one is whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moe_align.models.deepseek import DeepseekConfig, DeepseekForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "trainer_state.json"


def save_model(model: DeepseekForCausalLM, directory: str, tokenizer: str = "char",
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (state dict names of transformers)."""
    os.makedirs(directory, exist_ok=True)
    config = dataclasses.asdict(model.config) | {"tokenizer": tokenizer}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    state_dict = model.state_dict() if state_dict is None else state_dict
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, os.path.join(directory, WEIGHTS_NAME))


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def load_model(directory: str, device: torch.device | str = "cpu",
               model_class: type = DeepseekForCausalLM) -> tuple[Any, str]:
    """``(model, tokenizer name)`` from a directory written by :func:`save_model` (strict load);
    ``model_class(config, device=...)`` builds the model (e.g. a reward model)."""
    if not is_model_dir(directory):
        raise FileNotFoundError(f"{directory!r} is not a model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        fields = json.load(f)
    tokenizer = fields.pop("tokenizer", "char")
    # Built on the device rather than on "meta": the rotary tables are non-persistent buffers that
    # the state dict does not carry.
    model = model_class(DeepseekConfig(**fields), device=device)
    model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device)), strict=True)
    return model, tokenizer


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-<step>`` directory of ``output_dir`` with the highest step, if any."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isfile(os.path.join(path, STATE_NAME)):
            steps.append((int(name[11:]), path))
    return max(steps)[1] if steps else None


def begin_checkpoint(directory: str) -> str:
    """A fresh ``<directory>.tmp`` to write a checkpoint into (rank 0 calls this)."""
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_checkpoint(directory: str) -> None:
    """Move the complete ``<directory>.tmp`` into place (replacing an older ``directory``)."""
    tmp = directory.rstrip("/") + ".tmp"
    if os.path.isdir(directory):
        old = directory.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def read_trainer_state(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a training checkpoint (no {STATE_NAME})")
    with open(path) as f:
        return json.load(f)
