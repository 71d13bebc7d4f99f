"""Every record a trial reports, in order: a robustness curve per norm (trainables.evaluate, with
the gradient-masking checks that fired for it), the corruption grid, the OOD-detection measures
(trainables.ood), the label-free measures (trainables.label_free) and the defended curves
(trainables.defence). Each evaluation fills the columns of its kind of `EvalRecord` and leaves the
others empty.
"""
from __future__ import annotations

import json
from dataclasses import replace

import torch

from .defence import defended_records
from .evaluate import corruption_records, fraction, predictions, robust_accuracy_curve
from .label_free import label_free_records
from .masking import fired, masking_checks
from .ood import ood_records
from .records import EvalRecord


def evaluate_model(model, x: torch.Tensor, y: torch.Tensor, config: dict, data_dir=None) -> list[EvalRecord]:
    """Every record a trial reports for `model` on test images x (float in [0, 1], (N, C, H, W))
    and labels y (N,) under the resolved `config` (`data_dir`: where a held-out OOD dataset such as
    mnist is read)."""
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
            precision=config["eval_precision"],
        )
        flags = ",".join(_masking_flags(model, x, y, norm, config, curve, masks))
        records += [replace(record, masking_flags=flags) for record in curve]
    clean_acc = records[0].clean_acc if records else None
    records += corruption_records(
        model, x, y, config["corruptions"], config["corruption_severities"],
        batch_size=config["eval_batch_size"], seed=config["seed"], clean_acc=clean_acc,
    )
    if config.get("ood_sets") or config.get("label_free_eval"):
        if clean_acc is None:
            clean_acc = fraction(predictions(model, x, config["eval_batch_size"]) == y)
        records += ood_records(model, x, config, data_dir=data_dir, clean_acc=clean_acc)
        records += label_free_records(model, x, y, config, clean_acc=clean_acc)
    if config.get("defence", "none") != "none":
        records += defended_records(model, x, y, config)
    return records


def _masking_flags(model, x, y, norm, config, curve, masks) -> list[str]:
    """The gradient-masking checks (trainables.masking) that fire for this curve, at the grid's ε
    nearest ε_train (for the training norm) or the grid's median positive ε."""
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
