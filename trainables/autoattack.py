"""AutoAttack (Croce and Hein, ICML 2020, Section 5), standard version: APGD-CE, APGD-T (targeted
DLR), FAB-T and Square, each run only on the examples that the attacks before it did not fool.
RobustBench reports the resulting accuracy as `autoattack_acc`.
"""
from __future__ import annotations

import torch

from .apgd import apgd, apgd_targeted
from .attack_inputs import check_attack_input
from .attacks import batchnorm_mode
from .device import full_precision
from .fab import FabSearches, fab_targeted
from .folding import folded_for_eval
from .square import square

STANDARD = ("apgd_ce", "apgd_t", "fab_t", "square")
APGD_ONLY = ("apgd_ce", "apgd_t")  # eval_attack "apgd"


def autoattack(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    attacks: tuple[str, ...] = STANDARD,
    steps: int = 100,
    n_target_classes: int = 9,
    n_queries: int = 5000,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    fold_bn: bool = True,
    fab_searches: FabSearches | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `attacks` in order, each on the examples still classified correctly.

    x: (N, ...) images in [0, 1]; y: (N,) labels; eps in pixel units of `norm`. `steps`: APGD and
    FAB iterations (100 in the standard version); `n_target_classes`: targets of APGD-T and FAB-T
    (9); `n_queries`: Square's budget (5000); `init`: APGD's starting δ (N, ...);
    `fab_searches` (one row per row of x): FAB-T's searches kept across the ε of a curve
    (trainables.fab.FabSearches).
    Returns (x_adv (N, ...), fooled_by (N,) int64): fooled_by[i] is the index in `attacks` of the
    first attack that fooled example i, −1 where none did or the clean image is already
    misclassified (x_adv = x there). Raises ValueError for images outside [0, 1], ε < 0, NaN.
    """
    check_attack_input(x, eps, "autoattack")
    unknown = set(attacks) - set(STANDARD)
    if unknown:
        raise ValueError(f"autoattack: unknown attacks {sorted(unknown)}; use some of {', '.join(STANDARD)}")
    x = x.detach()
    model = folded_for_eval(model) if fold_bn else model
    out = x.clone()
    fooled_by = torch.full((len(x),), -1, dtype=torch.long, device=x.device)

    def predict(images):
        with torch.no_grad(), batchnorm_mode(model, "eval"), full_precision(images.device):
            return model(images).argmax(1)

    robust = predict(x) == y
    if eps == 0:
        return out, fooled_by
    for k, name in enumerate(attacks):
        idx = robust.nonzero().flatten()
        if len(idx) == 0:
            break
        xs, ys = x[idx], y[idx]
        start = None if init is None else init[idx]
        if name == "apgd_ce":
            x_adv = apgd(model, xs, ys, "ce", norm, eps, steps, init=start, generator=generator, fold_bn=False)
        elif name == "apgd_t":
            x_adv = apgd_targeted(model, xs, ys, norm, eps, steps, n_target_classes, init=start,
                                  generator=generator, fold_bn=False)
        elif name == "fab_t":
            x_adv = fab_targeted(model, xs, ys, norm, eps, steps, n_target_classes, fold_bn=False,
                                 searches=None if fab_searches is None else fab_searches.select(idx))
        else:
            x_adv = square(model, xs, ys, norm, eps, n_queries, generator=generator, fold_bn=False)
        fooled = predict(x_adv) != ys
        out[idx[fooled]] = x_adv[fooled]
        fooled_by[idx[fooled]] = k
        robust[idx[fooled]] = False
    return out, fooled_by
