"""Optimizer and learning-rate schedule for every Hearth training run.

Design choices:
- AdamW with two parameter groups: weight decay on matrices (dim >= 2: linear
  layers, embeddings), none on vectors (norm gains, biases). Decaying a norm
  gain towards zero only fights the model.
- On CPU the `foreach` (multi-tensor) implementation is used: one kernel per
  op over all tensors instead of a Python loop per parameter. `fused` is used
  where PyTorch has a fused kernel for the device (CUDA).
- The schedule is a pure function of the step (linear warmup, then cosine
  decay to `min_lr`), so the "scheduler state" of a checkpoint is the step
  number and resuming cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass
class Schedule:
    lr: float  # peak learning rate, reached at the end of warmup
    min_lr: float  # floor reached at max_steps (cosine decay)
    warmup_steps: int  # linear ramp from lr/warmup_steps to lr
    max_steps: int  # total optimizer steps of the run

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + cosine * (self.lr - self.min_lr)


def parameter_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (dim >= 2) and a non-decayed group."""
    decay, no_decay, seen = [], [], set()
    for _, param in named_params:
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    device_type: str = "cpu",
) -> torch.optim.AdamW:
    groups = parameter_groups(named_params, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters")
    fast_path = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **fast_path)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
