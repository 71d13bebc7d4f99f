"""Checks every evaluation attack runs on its input before attacking: a wrong input otherwise gives a
robust accuracy that looks plausible and means nothing."""
from __future__ import annotations

import math

import torch


def check_attack_input(x: torch.Tensor, eps: float, attack: str) -> None:
    """Raise ValueError (one line: what, how to fix) for images outside [0, 1], NaN images or ε < 0."""
    if not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
        raise ValueError(f"{attack}: eps must be a number >= 0, got {eps!r}; pass the radius of the "
                         "threat model in [0, 1] pixel units (e.g. 8/255)")
    if torch.isnan(x).any():
        raise ValueError(f"{attack}: the images contain NaN; check the data loading "
                         "(attacks need finite images in [0, 1])")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"{attack}: images must lie in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                         "pass unnormalised pixels and put the normalisation inside the model")


def check_logits(logits: torch.Tensor, attack: str) -> None:
    """Raise ValueError when the model's output has NaN or infinite entries."""
    if not torch.isfinite(logits).all():
        raise ValueError(f"{attack}: the model's output contains NaN or inf; check the model's "
                         "weights (e.g. a diverged training run) before evaluating it")
