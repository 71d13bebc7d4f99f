"""The robustness curve (accuracy against ε_test) and the corruption grid, as `EvalRecord`s.

Adversarial rows carry norm/eps_test and leave corruption/severity empty, corruption rows the other
way round. Robustness rows (clean at ε 0 and each attacked ε) carry in `correct` which test
examples were still classified correctly there (trainables.correct_bits). A test-time defence is a
curve of its own (trainables.defence): the same attack loop with the defended classifier and the
defence-aware objective passed in. `trainables.evaluate_model` assembles every record of a trial.
"""
from __future__ import annotations

import json
from typing import Callable

import torch

from .attack_inputs import check_attack_input
from .attacks import Objective, cross_entropy_objective, pgd, random_delta
from .autoattack import APGD_ONLY, STANDARD, autoattack
from .corruptions import corruption_accuracy
from .correct_bits import pack_correct
from .device import autocast, full_precision
from .fab import FabSearches
from .records import EvalRecord

EVAL_ATTACKS = ("pgd", "apgd", "autoattack")
# classify(images (N, C, H, W), ε they were attacked within, 0 for clean) -> (N,) predicted labels
Classify = Callable[[torch.Tensor, float], torch.Tensor]


def fraction(correct: torch.Tensor) -> float:
    """The share of True in a bool tensor as an exact Python float (float64): a count over n, e.g.
    734/1000 -> 0.734, where a float32 mean would give 0.734000027."""
    n = correct.numel()
    return int(correct.sum().item()) / n if n else float("nan")


@torch.no_grad()
def predictions(model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The model's predicted labels (N,) for x (N, ...), in eval mode and full precision: every
    accuracy is the full-precision model's, whatever precision an attack searched in."""
    model.eval()
    with full_precision(x.device):
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def robust_accuracy_curve(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps_grid: list[float],
    steps: int = 20,
    step_size_factor: float = 2.5,
    restarts: int = 1,
    batch_size: int = 500,
    seed: int = 0,
    attack_all: bool = False,
    random_start: bool = True,
    stop_on_success: bool = False,
    attack: str = "pgd",
    apgd_steps: int = 100,
    target_classes: int = 9,
    square_queries: int = 5000,
    robust_masks: dict | None = None,
    classify: Classify | None = None,
    objective: Objective = cross_entropy_objective,
    precision: str = "auto",
) -> list[EvalRecord]:
    """Clean and robust accuracy at each ε of the grid, in the model's eval mode.

    `attack`: "pgd" (`steps` steps of step_size_factor·ε/steps, `restarts`), "apgd" (APGD-CE then
    APGD-T over `target_classes` targets, `apgd_steps` each) or "autoattack" (the standard
    version: APGD-CE, APGD-T, FAB-T, Square with `square_queries` queries; Croce and Hein 2020).
    For apgd and autoattack each record's `fooled_by` is a JSON object {attack: examples it took at
    this ε}, the examples the earlier attacks of the list (and smaller ε) left robust.

    ε is taken in ascending order and only the examples still classified correctly are attacked:
    an example fooled inside a small ball is fooled inside every larger one, so this is exact,
    makes the curve monotone and skips most of the work on weak models. FAB-T's search does not
    depend on ε, so it runs once per (example, target) for the whole curve (trainables.fab.FabSearches)
    and the curve's FAB-T gives each ε what a fresh FAB-T gives it. `attack_all=True` attacks
    every example at every ε (the reference the benchmark compares against).
    Each example gets the same random start whichever subset it is attacked in, so the two modes
    differ only by what they skip. `stop_on_success` counts an example as fooled at the first PGD
    iterate that fools it and stops attacking it there (attack "pgd_any_iterate"; the same logic
    as the ascending order, one level down: a misclassified point inside the ball is proof), which
    makes each attack cheaper and never reports a higher accuracy than the last-iterate PGD.
    `robust_masks`, when a dict, receives {ε: (N,) bool mask of the examples still robust}.
    `precision`: the autocast of the attacks' passes ("auto", "bf16", "fp32"; trainables.device.
    uses_bf16); whatever it is, clean accuracy and every "fooled?" verdict are the fp32 model's
    (trainables.attacks.misclassified), so it changes only how the search runs.

    The classifier under attack and the attack's loss are parameters (attack "pgd" without
    stop_on_success only, as the others read the model's own logits): `classify(images, ε)` gives
    the predicted labels whose accuracy is measured (default: the model's argmax; a test-time
    defence passes its defended classifier, trainables.defence), and `objective(model, x_adv, y)`
    the per-example loss PGD maximises (default: the model's cross-entropy; the defence's adaptive
    attack passes its own).
    Raises ValueError for images outside [0, 1], NaN images, a negative ε, or a classify/objective
    with another attack.
    """
    if attack not in EVAL_ATTACKS:
        raise ValueError(f"unknown eval attack {attack!r}; use one of {', '.join(EVAL_ATTACKS)}")
    custom = classify is not None or objective is not cross_entropy_objective
    if custom and (attack != "pgd" or stop_on_success):
        raise ValueError("classify and objective need attack 'pgd' without stop_on_success")
    for eps in eps_grid:
        check_attack_input(x, float(eps), "robust_accuracy_curve")
    if classify is None:
        def classify(images: torch.Tensor, eps: float) -> torch.Tensor:
            return predictions(model, images, batch_size)
    model.eval()
    x, y = x.detach(), y.detach()
    clean_correct = classify(x, 0.0) == y
    clean_acc = fraction(clean_correct)
    still_correct = clean_correct.clone()
    # FAB-T's search does not depend on ε: each (example, target) is searched once for the whole curve
    fab_searches = FabSearches.for_images(x) if attack == "autoattack" else None
    records = []
    for eps in sorted(float(e) for e in eps_grid):
        if eps == 0:
            records.append(curve_record(norm, 0.0, "none", 0, 0.0, 0, len(x), clean_acc, clean_acc,
                                        correct=clean_correct))
            continue
        step_size = step_size_factor * eps / steps
        generator = torch.Generator(device=x.device).manual_seed(attack_seed(seed, norm, eps))
        starts = random_delta(x.shape, norm, eps, x.device, generator) if random_start else None
        candidates = clean_correct if attack_all else still_correct
        index = candidates.nonzero().flatten()
        correct_now = torch.zeros_like(clean_correct)
        if attack != "pgd":
            members = STANDARD if attack == "autoattack" else APGD_ONLY
            taken = torch.zeros(len(members), dtype=torch.long)
            for i in range(0, len(index), batch_size):
                batch = index[i : i + batch_size]
                with autocast(x.device, precision):
                    _, fooled_by = autoattack(
                        model, x[batch], y[batch], norm, eps, members, apgd_steps, target_classes,
                        square_queries, init=None if starts is None else starts[batch], generator=generator,
                        fab_searches=None if fab_searches is None else fab_searches.select(batch),
                    )
                correct_now[batch] = fooled_by < 0
                taken += torch.bincount(fooled_by[fooled_by >= 0].cpu(), minlength=len(members))
            still_correct = correct_now if attack_all else still_correct & correct_now
            records.append(curve_record(norm, eps, attack, apgd_steps, 2 * eps, 1, len(x), clean_acc,
                                        fraction(still_correct), correct=still_correct,
                                        fooled_by=json.dumps(dict(zip(members, taken.tolist())))))
            if robust_masks is not None:
                robust_masks[eps] = still_correct.clone()
            continue
        adversarial = []
        for i in range(0, len(index), batch_size):
            batch = index[i : i + batch_size]
            with autocast(x.device, precision):
                adversarial.append(pgd(
                    model, x[batch], y[batch], objective, norm, eps, step_size, steps,
                    random_start=random_start, restarts=restarts, bn_mode="eval",
                    generator=generator, init=None if starts is None else starts[batch],
                    stop_on_success=stop_on_success,
                ))
        if adversarial:  # classified together: a randomised classifier draws once per ε, in one order
            correct_now[index] = classify(torch.cat(adversarial), eps) == y[index]
        still_correct = correct_now if attack_all else still_correct & correct_now
        if robust_masks is not None:
            robust_masks[eps] = still_correct.clone()
        records.append(
            curve_record(norm, eps, "pgd_any_iterate" if stop_on_success else "pgd", steps, step_size, restarts,
                         len(x), clean_acc, fraction(still_correct), correct=still_correct)
        )
    return records


def attack_seed(seed: int, norm: str, eps: float) -> int:
    """The seed of the attack's random starts at (norm, ε) for evaluation seed `seed`: stable, so an
    ε gets the same starts whatever else is in the grid (and defended evaluation the same as plain)."""
    return (seed * 1_000_003 + (0 if norm == "linf" else 7919) + int(round(eps * 1e6))) % (2**63)


def curve_record(norm, eps, attack, steps, step_size, restarts, n, clean_acc, robust_acc, correct=None,
                 fooled_by=None) -> EvalRecord:
    """One robustness-curve record (accuracies as fractions in [0, 1] over `n` examples).
    `correct`: the (N,) bool mask of the examples counted in robust_acc (packed into the `correct`
    column), or None; `fooled_by`: the JSON count of examples each attack took, or None."""
    return EvalRecord(
        norm=norm, eps_test=float(eps), attack=attack, attack_steps=int(steps),
        step_size=float(step_size), restarts=int(restarts), n_examples=int(n),
        clean_acc=float(clean_acc), robust_acc=float(robust_acc), fooled_by=fooled_by,
        correct=None if correct is None else pack_correct(correct),
    )


def corruption_records(model, x, y, names, severities, batch_size=500, seed=0, clean_acc=None) -> list[EvalRecord]:
    """One record per (corruption, severity): accuracy under it in robust_acc (no attack)."""
    if not names:
        return []
    if clean_acc is None:
        clean_acc = fraction(predictions(model, x, batch_size) == y)
    return [
        EvalRecord(attack="none", attack_steps=0, step_size=0.0, restarts=0, n_examples=int(row["n_examples"]),
                   clean_acc=float(clean_acc), robust_acc=float(row["accuracy"]), corruption=row["corruption"],
                   severity=int(row["severity"]))
        for row in corruption_accuracy(model, x, y, names, severities, batch_size=batch_size, seed=seed)
    ]
