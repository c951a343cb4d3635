"""Thin trainers on moe_align's model, ops and kernels: SFT, DPO, ESFT, reward models, GRPO.

Each trainer is a :class:`~moe_align.train.trainer.Trainer` subclass with a dataclass config; the
``moe-align`` command line (:mod:`moe_align.train.cli`) builds one from flags.
"""
