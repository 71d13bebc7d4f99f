"""The training/evaluation config of one trial: every key, its default and its allowed values.

A trial config is a flat dict of plain values (so it can be hashed, logged as MLflow params and
stored in Parquet unchanged). This module is the single source of truth for its keys; the study
specs and the command line validate against it.
"""
from __future__ import annotations

import math
from typing import Any

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn")
ARCHS = ("small_cnn", "preact_resnet18", "wrn")
SSL_TASKS = ("none", "rotation", "contrastive", "inpainting")
# Tasks a model can train with at once (`ssl_tasks: {task: weight}`) and use in the defence.
MULTI_SSL_TASKS = ("rotation", "contrastive", "inpainting")
DEFENCES = ("none", "ssl_reverse")
# Default radius ε_r of the test-time SSL reversal defence (trainables.defence).
DEFAULT_DEFENCE_EPS = {"mnist_family": 0.1, "cifar": 8 / 255}
ATTACK_VARIANTS = ("ce", "joint", "ssl", "repr")
NORMS = ("linf", "l2")
TRAIN_ATTACKS = ("pgd", "fgsm")
INITS = ("scratch", "ssl_pretrained")
SCHEDULES = ("cosine", "constant", "piecewise")
OPTIMIZERS = ("sgd", "adam")
ROTATIONS = ("all", "one")
SSL_PERTURBATIONS = ("shared", "independent")
BN_MODES = ("train", "eval")
DEVICES = ("auto", "cpu", "cuda")
# Which weights a trial is evaluated with: the last epoch's, or the epoch with the best robust
# accuracy on the held-out validation split (early stopping against robust overfitting, Rice,
# Wong and Kolter, ICML 2020).
CHECKPOINT_SELECTIONS = ("last", "best_robust_val")
PRECISIONS = ("auto", "bf16", "fp32")  # trainables.device.uses_bf16
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "contrast",
    "brightness",
    "jpeg",
)
# Out-of-distribution sets (trainables.ood) and the scores that rank test images against them.
OOD_SETS = ("gaussian", "rademacher", "blobs", "mnist")
OOD_SCORES = ("msp", "rotation")

MNIST_FAMILY = ("fashion_mnist", "mnist")

# Default ε_test grids (pixels in [0, 1]).
DEFAULT_EPS_GRIDS = {
    "mnist_family": {
        "linf": [0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3],
        "l2": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0],
    },
    "cifar": {
        "linf": [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255],
        "l2": [0.0, 0.125, 0.25, 0.5, 1.0, 1.5],
    },
}

# key -> (default, kind, constraint). kind is used for type checking and for parsing `--set`.
# constraint: a tuple of allowed values, or "nonneg", "pos", "prob" for numbers ("fraction": in [0, 1)).
SCHEMA: dict[str, tuple[Any, str, Any]] = {
    # data
    "dataset": ("fashion_mnist", "str", DATASETS),
    "train_subset": (None, "int?", "pos"),
    "test_subset": (1000, "int?", "pos"),
    # a fraction p of the training labels replaced by a uniformly random other class (fixed by the
    # seed; test labels are never corrupted): trainables.label_noise
    "label_noise": (0.0, "float", "fraction"),
    # model
    "arch": ("small_cnn", "str", ARCHS),
    "depth": (40, "int", "pos"),
    "width": (2, "int", "pos"),
    # optimisation
    "epochs": (2, "int", "pos"),
    "batch_size": (128, "int", "pos"),
    "optimizer": ("sgd", "str", OPTIMIZERS),
    "lr": (0.05, "float", "pos"),
    "momentum": (0.9, "float", "nonneg"),
    "nesterov": (True, "bool", None),
    "weight_decay": (5e-4, "float", "nonneg"),
    "schedule": ("cosine", "str", SCHEDULES),
    "augment": (True, "bool", None),
    # robust-overfitting control: val_subset training images held out (drawn by a seed of their
    # own, never trained on), robust accuracy on them each epoch (PGD at ε_train in norm_train,
    # val_attack_steps steps), and which epoch's weights the trial is evaluated with
    "val_subset": (None, "int?", "pos"),
    "val_attack_steps": (5, "int", "pos"),
    "checkpoint_selection": ("last", "str", CHECKPOINT_SELECTIONS),
    # self-supervision
    "ssl_task": ("rotation", "str", SSL_TASKS),
    "ssl_weight": (0.5, "float", "nonneg"),
    "rotations": ("one", "str", ROTATIONS),
    "ssl_perturbation": ("shared", "str", SSL_PERTURBATIONS),
    # several SSL tasks at once, {task: weight}: the SSL loss is Σ w_t·SSL_t (ssl_task and
    # ssl_weight are then not used); empty: the single ssl_task with ssl_weight
    "ssl_tasks": ({}, "dict[str,float]", MULTI_SSL_TASKS),
    "contrastive_temperature": (0.2, "float", "pos"),  # NT-Xent temperature of the contrastive task
    # adversarial training
    "attack_variant": ("joint", "str", ATTACK_VARIANTS),
    "norm_train": ("linf", "str", NORMS),
    "eps_train": (0.1, "float", "nonneg"),
    "train_attack": ("pgd", "str", TRAIN_ATTACKS),
    "train_attack_steps": (3, "int", "pos"),
    "train_step_size_factor": (2.5, "float", "pos"),  # PGD step = factor·ε/steps; FGSM uses 1.25·ε
    "train_random_start": (True, "bool", None),
    "train_bn_mode": ("train", "str", BN_MODES),
    # autocast of the training forward/backward passes (attack and update; evaluation has
    # eval_precision): "auto" bf16 on CUDA, fp32 on CPU; "bf16" also on CPUs that compute bf16 natively
    # (AVX512-BF16 or AMX; small_cnn trains ~1.4x faster), fp32 on other CPUs, where emulated bf16
    # is slower than fp32; "fp32" everywhere. trainables.device.autocast
    "train_precision": ("auto", "str", PRECISIONS),
    # SSL pre-training (init=ssl_pretrained)
    "init": ("scratch", "str", INITS),
    "pretrain_epochs": (2, "int", "pos"),
    "pretrain_lr": (0.05, "float", "pos"),
    # evaluation
    "eval_norms": (["linf"], "list[str]", NORMS),
    "eval_eps_linf": (None, "list[float]?", "nonneg"),  # None: the dataset's default grid
    "eval_eps_l2": (None, "list[float]?", "nonneg"),
    "eval_attack_steps": (20, "int", "pos"),
    "eval_step_size_factor": (2.5, "float", "pos"),  # step = factor·ε/steps
    "eval_restarts": (1, "int", "pos"),
    # count an example as fooled at the first PGD iterate that fools it, and stop attacking it
    # (attack "pgd_any_iterate"): cheaper and never weaker than the last iterate; false: the
    # last-iterate PGD of the seed papers (attack "pgd")
    "eval_stop_on_success": (True, "bool", None),
    "eval_batch_size": (500, "int", "pos"),
    # the evaluation attack (trainables.evaluate): "pgd" (eval_attack_steps, eval_step_size_factor,
    # eval_restarts, eval_stop_on_success), "apgd" (APGD-CE then APGD-T) or "autoattack" (standard
    # version: APGD-CE, APGD-T, FAB-T, Square; Croce and Hein 2020). The shipped studies set apgd at
    # their default scale and autoattack at the paper scale; "pgd" overstates robustness.
    "eval_attack": ("pgd", "str", ("pgd", "apgd", "autoattack")),
    # autocast of the evaluation attacks' passes, with train_precision's choices: "auto" bf16 on
    # CUDA, fp32 on CPU; "bf16" also on CPUs with native bf16 (~2x faster attacks there). Only the
    # search runs in it: clean accuracy and every "is this example fooled?" are the fp32 model's
    # (trainables.attacks.misclassified), and FAB-T searches in fp32 (its answers lie on the
    # decision boundary). bf16 APGD was a little weaker on the default weight_sweep models (two
    # images above AutoAttack on 2 of 12, fp32 on none; benchmarks/RESULTS.md §8c), so the shipped
    # studies leave it at "auto".
    "eval_precision": ("auto", "str", PRECISIONS),
    "eval_apgd_steps": (100, "int", "pos"),  # APGD (and FAB-T) iterations per run (AutoAttack: 100)
    "eval_target_classes": (9, "int", "pos"),  # target classes of APGD-T and FAB-T (AutoAttack: 9)
    "eval_square_queries": (5000, "int", "pos"),  # Square's queries per example (AutoAttack: 5000)
    "corruptions": ([], "list[str]", CORRUPTIONS),
    "corruption_severities": ([1, 2, 3, 4, 5], "list[int]", (1, 2, 3, 4, 5)),
    # test-time defence (trainables.defence): ssl_reverse = before classifying, find r with
    # ‖r‖∞ ≤ defence_eps minimising the weighted SSL losses of defence_tasks on x + r (PGD,
    # defence_steps steps of defence_eps/4). Evaluated against the plain PGD (attack "pgd") and an
    # adaptive PGD through the defence itself (BPDA: the full reversal forward, the identity backward;
    # EOT over eval_adaptive_eot draws of its random views), maximising
    # CE(f(defended x')) − eval_adaptive_weight·SSL(x') (attack "pgd_adaptive"; a negative weight
    # gives CE + |w|·SSL, which raises the loss the reversal undoes and so helps the defence).
    "defence": ("none", "str", DEFENCES),
    "defence_eps": (None, "float?", "nonneg"),  # None: 0.1 for the MNIST family, 8/255 otherwise
    "defence_steps": (10, "int", "pos"),
    "defence_tasks": ([], "list[str]", MULTI_SSL_TASKS),  # empty: every task the model trains with
    "eval_adaptive_weight": (1.0, "float", None),  # λ_S of the adaptive attack (CE − λ_S·SSL)
    "eval_adaptive_eot": (1, "int", "pos"),  # draws of the defence's random views averaged per attack step
    # out-of-distribution detection (trainables.ood): records only when ood_sets is non-empty
    "ood_sets": ([], "list[str]", OOD_SETS),
    "ood_scores": (["msp", "rotation"], "list[str]", OOD_SCORES),
    "ood_examples": (None, "int?", "pos"),  # OOD images per set; None: as many as test images
    # label-free robustness of the representation (trainables.label_free, trainables.smoothing):
    # records only when label_free_eval is true
    "label_free_eval": (False, "bool", None),
    "label_free_eps": (None, "float?", "nonneg"),  # l∞ budget; None: 0.1 (MNIST family) or 8/255
    "label_free_steps": (10, "int", "pos"),  # PGD steps of the representation attacks
    "label_free_examples": (None, "int?", "pos"),  # test images used; None: all of test_subset
    "smoothing_sigma": (0.25, "float", "pos"),  # randomized smoothing noise σ
    "smoothing_n0": (20, "int", "pos"),  # selection samples (Cohen et al.: 100)
    "smoothing_n": (100, "int", "pos"),  # estimation samples (Cohen et al.: 100,000; CPU default)
    "smoothing_alpha": (0.001, "float", "pos"),  # failure probability of the certificate
    "smoothing_radii": ([0.0, 0.25, 0.5, 0.75, 1.0], "list[float]", "nonneg"),
    # certified robustness of the representation by center smoothing (trainables.center_smoothing,
    # Kumar and Goldstein 2021): a certified bound on how far the smoothed representation moves
    # for each l2 input radius in center_smoothing_eps (empty: not run)
    "center_smoothing_eps": ([0.05, 0.1, 0.2], "list[float]", "pos"),
    "center_smoothing_sigma": (0.25, "float", "pos"),  # noise σ (Petrov and Kwiatkowska: 0.25)
    "center_smoothing_n0": (100, "int", "pos"),  # samples for the centre, and again for its check
    "center_smoothing_n": (1000, "int", "pos"),  # samples for the certified radius (paper: 10^6)
    "center_smoothing_alpha": (0.01, "float", "pos"),  # failure probability α1 + α2 (paper: 0.005 each)
    "center_smoothing_delta": (0.25, "float", "pos"),  # the paper's Δ (0.05), in (0, 0.5)
    "center_smoothing_examples": (100, "int?", "pos"),  # test images certified; None: every label-free one
    # run
    "seed": (0, "int", "nonneg"),
}

# Keys that change where or how fast a trial runs but not its result; excluded from config hashes.
NON_SEMANTIC_KEYS = frozenset({"eval_batch_size"})
# Keys added after results existed: left out of config hashes while they hold their default, so
# every earlier configuration keeps its identity (and its results are not run again).
HASH_NEUTRAL_DEFAULTS = frozenset({
    "label_noise", "ood_sets", "ood_scores", "ood_examples",
    "ssl_tasks", "contrastive_temperature", "defence", "defence_eps", "defence_steps", "defence_tasks",
    "eval_adaptive_weight", "eval_adaptive_eot", "eval_stop_on_success",
})

# The label-free evaluation keys (trainables.label_free), added later still: hashed only when changed.
HASH_NEUTRAL_DEFAULTS = HASH_NEUTRAL_DEFAULTS | frozenset({
    "label_free_eval", "label_free_eps", "label_free_steps", "label_free_examples", "smoothing_sigma",
    "smoothing_n0", "smoothing_n", "smoothing_alpha", "smoothing_radii",
    "eval_attack", "eval_apgd_steps", "eval_target_classes", "eval_square_queries",
})
# Validation split and checkpoint selection, added later again: hashed only when changed.
HASH_NEUTRAL_DEFAULTS = HASH_NEUTRAL_DEFAULTS | frozenset({"val_subset", "val_attack_steps", "checkpoint_selection"})
# Training and evaluation precision, added after those: hashed only when changed.
HASH_NEUTRAL_DEFAULTS = HASH_NEUTRAL_DEFAULTS | frozenset({"train_precision", "eval_precision"})
# Center smoothing (trainables.center_smoothing), added after the label-free keys: hashed only when changed.
HASH_NEUTRAL_DEFAULTS = HASH_NEUTRAL_DEFAULTS | frozenset({
    "center_smoothing_eps", "center_smoothing_sigma", "center_smoothing_n0", "center_smoothing_n",
    "center_smoothing_alpha", "center_smoothing_delta", "center_smoothing_examples",
})

# Keys that change only how a trained model is evaluated, never its weights: the settings a
# re-evaluation of kept models (orchestrator.evaluate) may change. Every eval_* key is one.
EVALUATION_KEYS = frozenset(k for k in SCHEMA if k.startswith("eval_")) | frozenset({
    "test_subset", "corruptions", "corruption_severities",
    "defence", "defence_eps", "defence_steps", "defence_tasks",
    "ood_sets", "ood_scores", "ood_examples",
    "label_free_eval", "label_free_eps", "label_free_steps", "label_free_examples",
    "smoothing_sigma", "smoothing_n0", "smoothing_n", "smoothing_alpha", "smoothing_radii",
    "center_smoothing_eps", "center_smoothing_sigma", "center_smoothing_n0", "center_smoothing_n",
    "center_smoothing_alpha", "center_smoothing_delta", "center_smoothing_examples",
})

# Which settings a trial uses: a key listed here applies only while its rule holds for the resolved
# config; every other key always applies. What is tracked per trial (`applicable`) follows this.
_SSL_SINGLE = lambda c: not c["ssl_tasks"]  # noqa: E731 - ssl_tasks replaces ssl_task/ssl_weight
_TASKS = lambda c: set(c["ssl_tasks"]) or {c["ssl_task"]}  # noqa: E731
_DEFENDED = lambda c: c["defence"] != "none"  # noqa: E731
_LABEL_FREE = lambda c: bool(c["label_free_eval"])  # noqa: E731
APPLIES_WHEN: dict[str, Any] = {
    "depth": lambda c: c["arch"] == "wrn",
    "width": lambda c: c["arch"] == "wrn",
    "momentum": lambda c: c["optimizer"] == "sgd",
    "nesterov": lambda c: c["optimizer"] == "sgd",
    "ssl_task": _SSL_SINGLE,
    "ssl_weight": _SSL_SINGLE,
    "ssl_tasks": lambda c: bool(c["ssl_tasks"]),
    "rotations": lambda c: "rotation" in _TASKS(c),
    "contrastive_temperature": lambda c: "contrastive" in _TASKS(c),
    "train_attack_steps": lambda c: c["train_attack"] == "pgd",
    "train_step_size_factor": lambda c: c["train_attack"] == "pgd",
    "train_random_start": lambda c: c["train_attack"] == "pgd",
    "pretrain_epochs": lambda c: c["init"] == "ssl_pretrained",
    "pretrain_lr": lambda c: c["init"] == "ssl_pretrained",
    "eval_eps_linf": lambda c: "linf" in c["eval_norms"],
    "eval_eps_l2": lambda c: "l2" in c["eval_norms"],
    "corruption_severities": lambda c: bool(c["corruptions"]),
    "defence_eps": _DEFENDED, "defence_steps": _DEFENDED, "defence_tasks": _DEFENDED,
    "eval_adaptive_weight": _DEFENDED, "eval_adaptive_eot": _DEFENDED,
    "ood_scores": lambda c: bool(c["ood_sets"]),
    "ood_examples": lambda c: bool(c["ood_sets"]),
    **{k: _LABEL_FREE for k in ("label_free_eps", "label_free_steps", "label_free_examples", "smoothing_sigma",
                                "smoothing_n0", "smoothing_n", "smoothing_alpha", "smoothing_radii")},
}


def applicable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a resolved config that the trial uses (`APPLIES_WHEN`), in SCHEMA order."""
    return {k: config[k] for k in SCHEMA if k in config and (k not in APPLIES_WHEN or APPLIES_WHEN[k](config))}


class ConfigError(ValueError):
    """A config value is wrong; the message is one line that says what, where and how to fix."""


def closest(word: str, options) -> str:
    """" (did you mean a, b?)" naming up to three of `options` close to a misspelt `word`, or ""
    when none is: the hint every unknown-name error ends with."""
    import difflib

    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _fraction(value: Any) -> Any:
    """Budgets are written as users write them: "8/255" means 8/255."""
    if isinstance(value, str) and value.count("/") == 1:
        num, den = value.split("/")
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return value
    return value


def _check_number(key: str, value: Any, kind: str, constraint: Any, where: str) -> Any:
    base = kind.rstrip("?")
    if base == "float":
        value = _fraction(value)
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be finite, got {value!r}")
    if constraint == "nonneg" and value < 0:
        raise ConfigError(f"{where}: '{key}' must be >= 0, got {value!r}")
    if constraint == "pos" and value <= 0:
        raise ConfigError(f"{where}: '{key}' must be > 0, got {value!r}")
    if constraint == "fraction" and not 0 <= value < 1:
        raise ConfigError(f"{where}: '{key}' must be a fraction in [0, 1), got {value!r}")
    return value


def check_value(key: str, value: Any, where: str = "config") -> Any:
    """Validate (and normalise) one value; raises ConfigError with a one-line message."""
    if key not in SCHEMA:
        raise ConfigError(f"{where}: unknown setting '{key}'{closest(key, SCHEMA)}")
    _, kind, constraint = SCHEMA[key]
    if value is None:
        if kind.endswith("?"):
            return None
        raise ConfigError(f"{where}: '{key}' must not be empty")
    if kind.startswith("dict["):  # {name: number}, names from the constraint tuple
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping like {{rotation: 0.5}}, got {value!r}")
        out = {}
        for name, weight in value.items():
            _check_scalar(key, name, "str", constraint, where)
            out[name] = _check_number(key, weight, "float", "nonneg", f"{where} {key}.{name}")
        return dict(sorted(out.items()))
    if kind.startswith("list["):
        elem = kind[5:].split("]")[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_check_scalar(key, v, elem, constraint, where) for v in value]
    return _check_scalar(key, value, kind, constraint, where)


def _check_scalar(key: str, value: Any, kind: str, constraint: Any, where: str) -> Any:
    base = kind.rstrip("?")
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        if isinstance(constraint, tuple) and value not in constraint:
            raise ConfigError(
                f"{where}: unknown {key} '{value}'{closest(value, constraint)}; "
                f"choose one of {', '.join(constraint)}"
            )
        return value
    value = _check_number(key, value, base, constraint if not isinstance(constraint, tuple) else None, where)
    if isinstance(constraint, tuple) and value not in constraint:
        raise ConfigError(f"{where}: '{key}' must be one of {constraint}, got {value!r}")
    return value


def resolve(config: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Return the full config: defaults filled in, every value checked, derived values set."""
    full = {key: default for key, (default, _, _) in SCHEMA.items()}
    for key, value in config.items():
        full[key] = check_value(key, value, where)
    for norm in NORMS:
        key = f"eval_eps_{norm}"
        if full[key] is None:
            full[key] = list(default_eps_grid(full["dataset"], norm))
        full[key] = sorted(set(float(e) for e in full[key]))
    if full["ssl_task"] == "none" and not full["ssl_tasks"] and full["attack_variant"] == "ssl":
        raise ConfigError(f"{where}: attack_variant 'ssl' needs an SSL task; set ssl_task: rotation")
    if full["ssl_tasks"] and full["attack_variant"] == "ssl" and not any(full["ssl_tasks"].values()):
        raise ConfigError(f"{where}: attack_variant 'ssl' needs an SSL task with a weight > 0 in ssl_tasks")
    full["defence_tasks"] = list(dict.fromkeys(full["defence_tasks"]))
    if full["defence"] != "none":
        trained = model_ssl_tasks(full)
        tasks = full["defence_tasks"] or trained
        if not tasks:
            raise ConfigError(f"{where}: defence '{full['defence']}' needs SSL heads; set ssl_task or ssl_tasks")
        missing = [t for t in tasks if t not in trained]
        if missing:
            raise ConfigError(
                f"{where}: defence task '{missing[0]}' is not one the model trains with "
                f"({', '.join(trained) or 'none'}); add it to ssl_tasks or drop it from defence_tasks"
            )
    if full["checkpoint_selection"] == "best_robust_val" and full["val_subset"] is None:
        raise ConfigError(
            f"{where}: checkpoint_selection 'best_robust_val' needs a validation split; set val_subset, e.g. 1000"
        )
    if not 0 < full["smoothing_alpha"] < 0.5:
        raise ConfigError(f"{where}: 'smoothing_alpha' must be in (0, 0.5), got {full['smoothing_alpha']!r}")
    if full["smoothing_radii"] != SCHEMA["smoothing_radii"][0]:  # one record per radius: no repeats
        full["smoothing_radii"] = sorted(set(float(r) for r in full["smoothing_radii"]))
    if full["center_smoothing_eps"] != SCHEMA["center_smoothing_eps"][0]:  # one record per ε: no repeats
        full["center_smoothing_eps"] = sorted(set(float(e) for e in full["center_smoothing_eps"]))
    for key in ("center_smoothing_alpha", "center_smoothing_delta"):
        if not 0 < full[key] < 0.5:
            raise ConfigError(f"{where}: '{key}' must be in (0, 0.5), got {full[key]!r}")
    if full["label_free_eval"] and full["center_smoothing_eps"]:
        need = center_smoothing_min_n0(full["center_smoothing_alpha"], full["center_smoothing_delta"])
        if full["center_smoothing_n0"] < need:
            raise ConfigError(
                f"{where}: 'center_smoothing_n0' is {full['center_smoothing_n0']}, too few samples for "
                f"center_smoothing_delta {full['center_smoothing_delta']:g} (every image would abstain); "
                f"set center_smoothing_n0 >= {need} or raise center_smoothing_delta"
            )
    if full["label_free_eval"] and full["label_free_examples"] == 1:
        raise ConfigError(f"{where}: 'label_free_examples' must be >= 2 (pairs of test images are compared)")
    for key in ("ood_sets", "ood_scores"):  # one record per set × score × measure: no repeats
        full[key] = list(dict.fromkeys(full[key]))
    if full["ood_sets"]:
        if "rotation" in full["ood_scores"] and full["ssl_task"] != "rotation":
            raise ConfigError(
                f"{where}: ood score 'rotation' needs the rotation head; set ssl_task: rotation "
                f"or ood_scores: [msp]"
            )
        if full["dataset"] in full["ood_sets"]:
            raise ConfigError(
                f"{where}: ood set '{full['dataset']}' is the training dataset itself; "
                f"drop it from ood_sets"
            )
    return full


# The training attack's settings: moot when ε_train = 0 (standard training runs no attack).
TRAIN_ATTACK_KEYS = ("attack_variant", "norm_train", "train_attack", "train_attack_steps",
                     "train_step_size_factor", "train_random_start", "train_bn_mode")


def canonical(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config with every setting that cannot change the trained model (nor its
    evaluation) in this configuration put to its default, so that two configurations of one
    experiment are one cell (orchestrator.spec.config_hash hashes this). Written toward the
    defaults so configurations that were already canonical keep their identity. Moot are:

    - at ε_train = 0 (no training attack, trainables.train.Trainer._adversarial): the training
      attack's settings (TRAIN_ATTACK_KEYS), except attack_variant 'ssl' with an SSL weight of 0,
      whose zero-weight SSL batch still passes through the network (batch-norm statistics);
    - with no SSL loss (ssl_task none, or ssl_weight 0, single task): 'joint' and 'ce', whose
      attacks are then both plain CE (trainables.objectives.attack_objective).

    ValueError (ConfigError) as `resolve`."""
    full = resolve(config)
    weight = 1.0 if full["ssl_tasks"] else (0.0 if full["ssl_task"] == "none" else full["ssl_weight"])
    default = {key: SCHEMA[key][0] for key in TRAIN_ATTACK_KEYS}
    if full["eps_train"] == 0 and not (full["attack_variant"] == "ssl" and weight == 0):
        full.update(default)
    elif weight == 0 and full["attack_variant"] in ("ce", "joint"):
        full["attack_variant"] = default["attack_variant"]
    return full


def center_smoothing_min_n0(alpha: float, delta: float) -> int:
    """The fewest centre samples n0 with Δ1 = sqrt(ln(2/α1)/(2·n0)) <= Δ, α1 = α/2 (Kumar and
    Goldstein's check, trainables.center_smoothing): with fewer, center smoothing always abstains."""
    return math.ceil(math.log(4.0 / alpha) / (2.0 * delta * delta))


def model_ssl_tasks(config: dict[str, Any]) -> list[str]:
    """The SSL tasks (heads) a resolved config trains: the keys of ssl_tasks, else ssl_task."""
    if config.get("ssl_tasks"):
        return [t for t in MULTI_SSL_TASKS if t in config["ssl_tasks"]]
    return [] if config["ssl_task"] == "none" else [config["ssl_task"]]


def default_defence_eps(dataset: str) -> float:
    return DEFAULT_DEFENCE_EPS["mnist_family" if dataset in MNIST_FAMILY else "cifar"]


def default_eps_grid(dataset: str, norm: str) -> list[float]:
    family = "mnist_family" if dataset in MNIST_FAMILY else "cifar"
    return DEFAULT_EPS_GRIDS[family][norm]


def parse_cli_value(key: str, text: str, where: str = "--set") -> Any:
    """Parse `--set key=value` text into a typed value (YAML scalars and lists)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot parse value {text!r} for '{key}'") from None
    return value
