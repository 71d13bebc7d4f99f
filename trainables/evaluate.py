"""Robustness against ε_test and under natural corruptions, returned as plain records.

Every record has the same keys (`RECORD_KEYS`), so the orchestrator writes them to Parquet as they
are: adversarial rows carry norm/eps_test and leave corruption/severity empty, corruption rows the
other way round. Out-of-distribution rows (`trainables.ood`, when `ood_sets` is non-empty) leave
all four empty and carry ood_set, score, measure and value instead (robust_acc empty); the other
rows leave those four empty. Robustness rows (clean at ε 0 and each attacked ε) carry in `correct`
which test examples were still classified correctly there (trainables.correct_bits); every other
row leaves it empty. With a test-time defence (`defence` other than "none",
trainables.defence) the defended rows come last and carry one more key, `defence`; rows without it
are undefended.
"""
from __future__ import annotations

import torch

import json

from .attack_inputs import check_attack_input
from .attacks import cross_entropy_objective, pgd, random_delta
from .autoattack import APGD_ONLY, STANDARD, autoattack
from .corruptions import corruption_accuracy
from .correct_bits import pack_correct
from .device import autocast

RECORD_KEYS = (
    "norm", "eps_test", "attack", "attack_steps", "step_size", "restarts", "n_examples",
    "clean_acc", "robust_acc", "corruption", "severity", "ood_set", "score", "measure", "value",
    "fooled_by", "masking_flags", "correct",
)
EVAL_ATTACKS = ("pgd", "apgd", "autoattack")


def fraction(correct: torch.Tensor) -> float:
    """The share of True in a bool tensor as an exact Python float (float64): a count over n, e.g.
    734/1000 -> 0.734, where a float32 mean would give 0.734000027."""
    n = correct.numel()
    return int(correct.sum().item()) / n if n else float("nan")


@torch.no_grad()
def predictions(model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    with autocast(x.device):
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
) -> list[dict]:
    """Clean and robust accuracy at each ε of the grid, in the model's eval mode.

    `attack`: "pgd" (`steps` steps of step_size_factor·ε/steps, `restarts`), "apgd" (APGD-CE then
    APGD-T over `target_classes` targets, `apgd_steps` each) or "autoattack" (the standard
    version: APGD-CE, APGD-T, FAB-T, Square with `square_queries` queries; Croce and Hein 2020).
    For apgd and autoattack each record's `fooled_by` is a JSON object {attack: examples it took at
    this ε}, the examples the earlier attacks of the list (and smaller ε) left robust.

    ε is taken in ascending order and only the examples still classified correctly are attacked:
    an example fooled inside a small ball is fooled inside every larger one, so this is exact,
    makes the curve monotone and skips most of the work on weak models. `attack_all=True` attacks
    every example at every ε (the reference the benchmark compares against).
    Each example gets the same random start whichever subset it is attacked in, so the two modes
    differ only by what they skip. `stop_on_success` counts an example as fooled at the first PGD
    iterate that fools it and stops attacking it there (attack "pgd_any_iterate"; the same logic
    as the ascending order, one level down: a misclassified point inside the ball is proof), which
    makes each attack cheaper and never reports a higher accuracy than the last-iterate PGD.
    `robust_masks`, when a dict, receives {ε: (N,) bool mask of the examples still robust}.
    Raises ValueError for images outside [0, 1], NaN images or a negative ε.
    """
    if attack not in EVAL_ATTACKS:
        raise ValueError(f"unknown eval attack {attack!r}; use one of {', '.join(EVAL_ATTACKS)}")
    for eps in eps_grid:
        check_attack_input(x, float(eps), "robust_accuracy_curve")
    model.eval()
    x, y = x.detach(), y.detach()
    clean_correct = predictions(model, x, batch_size) == y
    clean_acc = fraction(clean_correct)
    still_correct = clean_correct.clone()
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
                with autocast(x.device):
                    _, fooled_by = autoattack(
                        model, x[batch], y[batch], norm, eps, members, apgd_steps, target_classes,
                        square_queries, init=None if starts is None else starts[batch], generator=generator,
                    )
                correct_now[batch] = fooled_by < 0
                taken += torch.bincount(fooled_by[fooled_by >= 0].cpu(), minlength=len(members))
            still_correct = correct_now if attack_all else still_correct & correct_now
            record = curve_record(norm, eps, attack, apgd_steps, 2 * eps, 1, len(x), clean_acc,
                             fraction(still_correct), correct=still_correct)
            record["fooled_by"] = json.dumps(dict(zip(members, taken.tolist())))
            records.append(record)
            if robust_masks is not None:
                robust_masks[eps] = still_correct.clone()
            continue
        for i in range(0, len(index), batch_size):
            batch = index[i : i + batch_size]
            with autocast(x.device):
                x_adv = pgd(
                    model, x[batch], y[batch], cross_entropy_objective, norm, eps, step_size, steps,
                    random_start=random_start, restarts=restarts, bn_mode="eval",
                    generator=generator, init=None if starts is None else starts[batch],
                    stop_on_success=stop_on_success,
                )
            correct_now[batch] = predictions(model, x_adv, batch_size) == y[batch]
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


def curve_record(norm, eps, attack, steps, step_size, restarts, n, clean_acc, robust_acc, correct=None) -> dict:
    """One robustness-curve result row (accuracies as fractions in [0, 1] over `n` examples; the
    columns of other evaluations, corruption to masking_flags, None). `correct`: the (N,) bool mask
    of the examples counted in robust_acc (packed into the `correct` column), or None."""
    return dict(
        norm=norm, eps_test=float(eps), attack=attack, attack_steps=int(steps),
        step_size=float(step_size), restarts=int(restarts), n_examples=int(n),
        clean_acc=float(clean_acc), robust_acc=float(robust_acc), corruption=None, severity=None,
        ood_set=None, score=None, measure=None, value=None, fooled_by=None, masking_flags=None,
        correct=None if correct is None else pack_correct(correct),
    )


def _masking_flags(model, x, y, norm, config, curve, masks) -> list[str]:
    """The gradient-masking checks (trainables.masking) that fire for this curve, at the grid's ε
    nearest ε_train (for the training norm) or the grid's median positive ε."""
    from .masking import fired, masking_checks

    positive = sorted(e for e in masks if e > 0)
    if not positive:
        return []
    if norm == config["norm_train"] and config["eps_train"] > 0:
        eps = min(positive, key=lambda e: abs(e - config["eps_train"]))
    else:
        eps = positive[len(positive) // 2]
    square_ran = config["eval_attack"] == "autoattack"
    result = masking_checks(model, x, y, norm, eps, None if square_ran else masks[eps],
                            pgd_steps=config["eval_attack_steps"], seed=config["seed"])
    names = fired(result)
    if square_ran:
        taken = sum(json.loads(r["fooled_by"]).get("square", 0) for r in curve if r.get("fooled_by"))
        if taken > 0.01 * len(x):
            names.append("square_beats_gradient")
    return names


def corruption_records(model, x, y, names, severities, batch_size=500, seed=0, clean_acc=None) -> list[dict]:
    if not names:
        return []
    if clean_acc is None:
        clean_acc = fraction(predictions(model, x, batch_size) == y)
    records = []
    for row in corruption_accuracy(model, x, y, names, severities, batch_size=batch_size, seed=seed):
        records.append(dict(
            norm=None, eps_test=None, attack="none", attack_steps=0, step_size=0.0, restarts=0,
            n_examples=int(row["n_examples"]), clean_acc=float(clean_acc),
            robust_acc=float(row["accuracy"]), corruption=row["corruption"], severity=int(row["severity"]),
            ood_set=None, score=None, measure=None, value=None,
        ))
    return records


def evaluate_model(model, x: torch.Tensor, y: torch.Tensor, config: dict, data_dir=None) -> list[dict]:
    """Every record a trial reports: a robustness curve per norm, then the corruption grid, then
    the OOD-detection measures (`data_dir`: where a held-out OOD dataset such as mnist is read)."""
    records = []
    for norm in config["eval_norms"]:
        masks: dict = {}
        curve = robust_accuracy_curve(
            model, x, y, norm, config[f"eval_eps_{norm}"],
            steps=config["eval_attack_steps"], step_size_factor=config["eval_step_size_factor"],
            restarts=config["eval_restarts"], batch_size=config["eval_batch_size"], seed=config["seed"],
            stop_on_success=config["eval_stop_on_success"], attack=config["eval_attack"],
            apgd_steps=config["eval_apgd_steps"], target_classes=config["eval_target_classes"],
            square_queries=config["eval_square_queries"], robust_masks=masks,
        )
        flags = _masking_flags(model, x, y, norm, config, curve, masks)
        for record in curve:
            record["masking_flags"] = ",".join(flags)
        records += curve
    clean_acc = records[0]["clean_acc"] if records else None
    records += corruption_records(
        model, x, y, config["corruptions"], config["corruption_severities"],
        batch_size=config["eval_batch_size"], seed=config["seed"], clean_acc=clean_acc,
    )
    if config.get("ood_sets"):
        from .ood import ood_records

        if clean_acc is None:
            clean_acc = fraction(predictions(model, x, config["eval_batch_size"]) == y)
        records += ood_records(model, x, config, data_dir=data_dir, clean_acc=clean_acc)
    if config.get("label_free_eval"):
        # label-free measure rows (trainables.label_free): measure/value, plus `radius` for the
        # certified accuracy of randomized smoothing; norm, eps_test, ood_set and robust_acc empty
        from .label_free import label_free_records

        if clean_acc is None:
            clean_acc = fraction(predictions(model, x, config["eval_batch_size"]) == y)
        records += label_free_records(model, x, y, config, clean_acc=clean_acc)
    if config.get("defence", "none") != "none":
        from .defence import defended_records

        records += defended_records(model, x, y, config)
    return records
