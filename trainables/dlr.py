"""The Difference of Logits Ratio loss (Croce and Hein, ICML 2020, Section 4, Eq. 5 and 6).

DLR is invariant to shifting and to positive scaling of the logits, so a model cannot escape it by
inflating its logit scale (which flattens the cross-entropy and stalls PGD on it).
"""
from __future__ import annotations

import torch

# Guards the division when the top logits tie (a constant model).
_TINY = 1e-12


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR, (N, C) logits and (N,) labels → (N,): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3),
    π the classes sorted by logit in decreasing order. Positive exactly when the model is fooled.
    Needs C ≥ 3."""
    sorted_z, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = logits.argmax(1) == y
    best_other = torch.where(top_is_y, sorted_z[:, 1], sorted_z[:, 0])
    return -(z_y - best_other) / (sorted_z[:, 0] - sorted_z[:, 2] + _TINY)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR toward class `target` (N,): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2). Needs C ≥ 4."""
    sorted_z, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (sorted_z[:, 0] - 0.5 * (sorted_z[:, 2] + sorted_z[:, 3]) + _TINY)
