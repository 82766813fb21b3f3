"""Optimizers and learning-rate schedules of the papers' recipes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("sgd", "rmsprop_tf")
SCHEDULES = ("multistep", "exponential", "plateau", "constant")


def param_groups(model: nn.Module, weight_decay: float, no_decay_depthwise: bool, no_decay_bn_bias: bool
                 ) -> list[dict[str, Any]]:
    """Split parameters into decayed and non-decayed groups (depthwise filters, BN and biases as asked)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
            norm_or_bias = isinstance(module, nn.modules.batchnorm._BatchNorm) or name == "bias"
            skip = (no_decay_depthwise and depthwise and name == "weight") or (no_decay_bn_bias and norm_or_bias)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: Any, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or TF-style RMSProp (timm's RMSpropTF: epsilon inside the root)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"recipe.optimizer.name={cfg.name!r} is not valid; choose one of {list(OPTIMIZERS)}")
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_depthwise, cfg.no_decay_bn_bias)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    from timm.optim import RMSpropTF

    return RMSpropTF(groups, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum)


class LRSchedule:
    """The recipe's learning rate at each optimizer step, its shape stretched to the run's length.

    Step s of a run of S steps sits at recipe time t = s / S * length (in the recipe's unit), so milestones
    and decay periods keep their place when a run is shortened. Plateau decays on validation error;
    the warm-up (ResNet-110) holds `warmup_lr` until the training error falls below a threshold.
    """

    def __init__(self, cfg: Any, base_lr: float, total_steps: int, length: float) -> None:
        if cfg.name not in SCHEDULES:
            raise ValueError(f"recipe.schedule.name={cfg.name!r} is not valid; choose one of {list(SCHEDULES)}")
        self.cfg, self.base_lr, self.total_steps, self.length = cfg, base_lr, total_steps, length
        self.decays = 0  # plateau: how many times the lr was divided
        self.best = math.inf
        self.bad_evals = 0
        self.warming = cfg.warmup_lr > 0

    def recipe_time(self, step: int) -> float:
        """Where step `step` falls in the recipe's own units (epochs or iterations)."""
        return step / self.total_steps * self.length

    def lr(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        c = self.cfg
        if self.warming:
            return c.warmup_lr
        t = self.recipe_time(step)
        if c.name == "multistep":
            factor = c.gamma ** sum(t >= m for m in c.milestones)
        elif c.name == "exponential":
            factor = c.gamma ** math.floor(t / c.every + 1e-9)
        elif c.name == "plateau":
            factor = c.gamma ** self.decays
        else:
            factor = 1.0
        return max(self.base_lr * factor, c.min_lr)

    def observe_val(self, err: float) -> None:
        """Plateau: count evaluations without improvement; decay after `patience` of them."""
        if err < self.best - 1e-9:
            self.best, self.bad_evals = err, 0
            return
        self.bad_evals += 1
        if self.cfg.name == "plateau" and self.bad_evals >= self.cfg.patience:
            self.decays += 1
            self.bad_evals = 0

    def observe_train(self, step: int, train_err: float) -> bool:
        """Warm-up: end it once the running training error (%) is below the threshold; True when it ends."""
        c = self.cfg
        done = train_err < c.warmup_until_train_err or (c.warmup_max_steps and step >= c.warmup_max_steps)
        if self.warming and done:
            self.warming = False
            return True
        return False

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's lr for `step`; returns it."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs."""
        return {"decays": self.decays, "best": self.best, "bad_evals": self.bad_evals, "warming": self.warming}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.decays, self.best = state["decays"], state["best"]
        self.bad_evals, self.warming = state["bad_evals"], state["warming"]
