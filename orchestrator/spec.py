"""Study specs: the declarative `studies/NAME.yaml` files, validated strictly and expanded to trials.

A study file holds the `default` scale at its top level; `scales.smoke` and `scales.paper` (and
optionally `scales.default`) override parts of it:

    description: one line
    factors: {ssl_weight: [0.0, 0.5, 2.0]}     # grid axes: every combination is a cell
    seeds: [0, 1, 2]                            # every cell runs once per seed
    # or adaptive replication (orchestrator.replication): seeds 0..min-1 first, then one more
    # seed at a time for the cells whose interval is still wider than until_ci, up to max
    # seeds: {min: 3, max: 8, until_ci: 0.02, measure: robust_acc_at_eps_train}
    fixed: {eps_train: 0.1, ...}                # trial config keys (trainables.config.SCHEMA)
    resources: {cpu: 1, gpu: 0}                 # per trial; gpu may be fractional
    search: {...}                               # optional: an Optuna search instead of a grid
    scales: {smoke: {...}, paper: {...}}

The spec is the single source of truth for the grid; `config_hash` is the one place configs are
hashed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainables.config import NON_SEMANTIC_KEYS, SCHEMA, ConfigError, canonical, check_value, closest, parse_cli_value, resolve
from trainables.config import HASH_NEUTRAL_DEFAULTS

from .errors import UserError

SCALES = ("smoke", "default", "paper")
TOP_LEVEL_FIELDS = ("description", "factors", "seeds", "fixed", "resources", "search", "scales", "max_failures")
SCALE_FIELDS = ("factors", "seeds", "fixed", "resources", "search", "max_failures")
RESOURCE_FIELDS = ("cpu", "gpu")
SEARCH_FIELDS = ("algorithm", "space", "objectives", "num_samples", "max_concurrent")
SEARCH_OBJECTIVES = ("clean_acc", "robust_acc_above_eps_train")


def studies_dir() -> Path:
    """`SSLROBUST_STUDIES_DIR`, else ./studies, else the studies/ folder beside the package."""
    env = os.environ.get("SSLROBUST_STUDIES_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "studies"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[1] / "studies"


def available_studies() -> dict[str, Path]:
    folder = studies_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def config_hash(config: dict[str, Any]) -> str:
    """The identity of a configuration: its canonical (trainables.config.canonical) semantic
    settings, hashed, so two configurations of the same experiment share one hash."""
    full = canonical(config)
    semantic = {k: v for k, v in sorted(full.items()) if k not in NON_SEMANTIC_KEYS}
    for key in HASH_NEUTRAL_DEFAULTS:  # settings added later: hashed only when they are changed
        if key in semantic and semantic[key] == SCHEMA[key][0]:
            del semantic[key]
    return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]


def settings_hash(settings: dict[str, Any]) -> str:
    """Hash of an arbitrary settings dict (e.g. the SSL pre-training settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SearchSpec:
    space: dict[str, dict]  # key -> {low, high, log}
    objectives: list[str]
    num_samples: int
    max_concurrent: int


@dataclass
class Trial:
    config: dict[str, Any]  # the resolved full config
    config_hash: str
    factors: dict[str, Any]  # the values of the varying factors (and seed)
    # resolved configs of other cells of the grid that are the same experiment (same hash): run
    # once, as this trial, and shown under every name in the report
    aliases: list[dict[str, Any]] = field(default_factory=list)


REPLICATION_FIELDS = ("min", "max", "until_ci", "measure")
REPLICATION_MEASURES = ("robust_acc_at_eps_train", "robust_acc_above_eps_train", "clean_acc")


@dataclass
class Replication:
    """Adaptive replication: every cell gets `min` seeds, then cells whose 95% interval of
    `measure` (half-width over seeds) is wider than `until_ci` get one more seed a round, up to
    `max` seeds."""

    min: int
    max: int
    until_ci: float
    measure: str = "robust_acc_at_eps_train"


@dataclass
class StudySpec:
    name: str
    path: Path
    scale: str
    description: str
    factors: dict[str, list]
    seeds: list[int]
    fixed: dict[str, Any]
    resources: dict[str, float]
    max_failures: int
    search: SearchSpec | None
    text: str = field(repr=False, default="")
    replication: Replication | None = None
    # seeds some cells run beyond `seeds` (adaptive replication): cell key -> seeds
    extra_seeds: dict[str, list[int]] = field(default_factory=dict)

    def trials(self) -> list[Trial]:
        """Every cell × seed of the grid (for a search study: the fixed part only, no trials)."""
        if self.search is not None:
            return []
        names = list(self.factors)
        out: dict[str, Trial] = {}
        for values in itertools.product(*(self.factors[n] for n in names)):
            cell = cell_key(dict(zip(names, values)))
            for seed in self.seeds + [s for s in self.extra_seeds.get(cell, []) if s not in self.seeds]:
                raw = {**self.fixed, **dict(zip(names, values)), "seed": seed}
                config = resolve(raw, where=str(self.path))
                chash = config_hash(config)
                if chash in out:  # the same experiment: e.g. λ = 0 under 'ce' and 'joint'
                    first = out[chash]
                    if config != first.config and config not in first.aliases:
                        first.aliases.append(config)
                    continue
                out[chash] = Trial(config, chash, {**dict(zip(names, values)), "seed": seed})
        return list(out.values())

    def varying(self) -> list[str]:
        several_seeds = len(self.seeds) > 1 or self.replication is not None and self.replication.max > 1
        return [n for n, v in self.factors.items() if len(v) > 1] + (["seed"] if several_seeds else [])


def cell_key(factors: dict[str, Any]) -> str:
    """A grid cell (its factor values, without the seed) as a string key."""
    return json.dumps({k: v for k, v in factors.items() if k != "seed"}, sort_keys=True, default=str)


def _check_fields(mapping: Any, allowed, where: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping of fields, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise UserError(f"{where}: unknown field '{key}'{closest(str(key), allowed)}; allowed: {', '.join(allowed)}")
    return mapping


def _validated_factors(factors: Any, where: str) -> dict[str, list]:
    factors = _check_fields(factors, list(SCHEMA), f"{where} factors")
    out = {}
    for key, values in factors.items():
        if key == "seed":
            raise UserError(f"{where} factors: 'seed' is not a factor; list seeds under 'seeds'")
        if not isinstance(values, list):
            raise UserError(f"{where} factors.{key}: expected a list of values, got {values!r}")
        if not values:
            raise UserError(f"{where} factors.{key}: the list is empty, so the grid has no cells; give at least one value")
        try:
            out[key] = [check_value(key, v, f"{where} factors.{key}") for v in values]
        except ConfigError as err:
            raise UserError(str(err)) from None
    return out


def _validated_fixed(fixed: Any, where: str) -> dict[str, Any]:
    fixed = _check_fields(fixed, list(SCHEMA), f"{where} fixed")
    try:
        return {k: check_value(k, v, f"{where} fixed.{k}") for k, v in fixed.items()}
    except ConfigError as err:
        raise UserError(str(err)) from None


def _validated_replication(value: dict, where: str) -> Replication:
    body = _check_fields(value, REPLICATION_FIELDS, f"{where} seeds")
    example = "e.g. `seeds: {min: 3, max: 8, until_ci: 0.02}`"
    for key in ("min", "max", "until_ci"):
        if key not in body:
            raise UserError(f"{where} seeds: adaptive replication needs '{key}', {example}")
    low, high, target = body["min"], body["max"], body["until_ci"]
    for key, number in (("min", low), ("max", high)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise UserError(f"{where} seeds.{key}: expected an integer >= 1, got {number!r}")
    if high < low:
        raise UserError(f"{where} seeds: max ({high}) is below min ({low}); {example}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise UserError(f"{where} seeds.until_ci: expected a half-width > 0 (e.g. 0.02), got {target!r}")
    measure = body.get("measure", REPLICATION_MEASURES[0])
    if measure not in REPLICATION_MEASURES:
        raise UserError(f"{where} seeds.measure: unknown measure {measure!r}{closest(str(measure), REPLICATION_MEASURES)}; "
                        f"choose one of {', '.join(REPLICATION_MEASURES)}")
    return Replication(low, high, float(target), measure)


def _validated_seeds(seeds: Any, where: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"{where} seeds: expected a non-empty list of integers, e.g. [0, 1, 2]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise UserError(f"{where} seeds: {s!r} is not a non-negative integer")
    return list(dict.fromkeys(seeds))


def _validated_resources(resources: Any, where: str) -> dict[str, float]:
    resources = _check_fields(resources, RESOURCE_FIELDS, f"{where} resources")
    out = {"cpu": 1.0, "gpu": 0.0}
    for key, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
            raise UserError(f"{where} resources.{key}: expected a number >= 0, got {value!r}")
        out[key] = float(value)
    if out["cpu"] <= 0 and out["gpu"] <= 0:
        raise UserError(f"{where} resources: a trial needs some cpu or gpu")
    if out["gpu"] > 1 and not float(out["gpu"]).is_integer():
        raise UserError(f"{where} resources.gpu: fractions are only allowed below 1 (got {out['gpu']})")
    return out


def _validated_search(search: Any, where: str) -> SearchSpec | None:
    if search is None:
        return None
    search = _check_fields(search, SEARCH_FIELDS, f"{where} search")
    if search.get("algorithm", "optuna") != "optuna":
        raise UserError(f"{where} search.algorithm: only 'optuna' is supported, got {search['algorithm']!r}")
    space = _check_fields(search.get("space"), list(SCHEMA), f"{where} search.space")
    if not space:
        raise UserError(f"{where} search.space: give at least one range, e.g. ssl_weight: {{low: 0.0, high: 2.0}}")
    for key, rng in space.items():
        rng = _check_fields(rng, ("low", "high", "log"), f"{where} search.space.{key}")
        if SCHEMA[key][1] not in ("float", "int"):
            raise UserError(f"{where} search.space.{key}: only numeric settings can be searched")
        try:
            low = check_value(key, rng.get("low"), f"{where} search.space.{key}.low")
            high = check_value(key, rng.get("high"), f"{where} search.space.{key}.high")
        except ConfigError as err:
            raise UserError(str(err)) from None
        if not low < high:
            raise UserError(f"{where} search.space.{key}: low ({low}) must be below high ({high})")
        if rng.get("log") and low <= 0:
            raise UserError(f"{where} search.space.{key}: a log range needs low > 0")
    objectives = search.get("objectives", list(SEARCH_OBJECTIVES))
    if not isinstance(objectives, list) or not objectives:
        raise UserError(f"{where} search.objectives: expected a non-empty list from {', '.join(SEARCH_OBJECTIVES)}")
    for obj in objectives:
        if obj not in SEARCH_OBJECTIVES:
            raise UserError(f"{where} search.objectives: unknown objective {obj!r}{closest(str(obj), SEARCH_OBJECTIVES)}")
    num_samples = search.get("num_samples", 8)
    max_concurrent = search.get("max_concurrent", 2)
    for key, value in (("num_samples", num_samples), ("max_concurrent", max_concurrent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{where} search.{key}: expected a positive integer, got {value!r}")
    return SearchSpec(dict(space), list(objectives), num_samples, max_concurrent)


def load_study(name: str, scale: str = "default", overrides: list[str] | None = None) -> StudySpec:
    """Load, merge the scale and `--set key=value` overrides, validate; raises UserError."""
    studies = available_studies()
    if name not in studies:
        hint = closest(name, studies)
        listing = ", ".join(studies) or f"none found in {studies_dir()}"
        raise UserError(f"unknown study '{name}'{hint}; available: {listing} (python -m orchestrator.study --list)")
    if scale not in SCALES:
        raise UserError(f"unknown scale '{scale}'{closest(scale, SCALES)}; choose one of {', '.join(SCALES)}")
    path = studies[name]
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if raw is None:
        raise UserError(f"{path}: the study file is empty; give at least a grid, e.g. `factors: {{ssl_weight: "
                        f"[0.0, 0.5]}}` and `seeds: [0]` (studies/smoke.yaml is a small example)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study file is a mapping of fields ({', '.join(TOP_LEVEL_FIELDS)}), but this "
                        f"one is a {type(raw).__name__}; write `field: value` lines (studies/smoke.yaml is an example)")
    raw = _check_fields(raw, TOP_LEVEL_FIELDS, str(path))
    scales = _check_fields(raw.get("scales"), SCALES, f"{path} scales")
    for scale_name, body in scales.items():
        _check_fields(body, SCALE_FIELDS, f"{path} scales.{scale_name}")
    merged = {k: raw[k] for k in SCALE_FIELDS if k in raw}
    override = scales.get(scale) or {}
    for key in SCALE_FIELDS:
        if key not in override:
            continue
        if key in ("factors", "fixed", "resources") and isinstance(merged.get(key), dict) and isinstance(override[key], dict):
            merged[key] = {**merged[key], **override[key]}
        else:
            merged[key] = override[key]
    where = f"{path} ({scale} scale)"
    factors = _validated_factors(merged.get("factors"), where)
    fixed = _validated_fixed(merged.get("fixed"), where)
    replication = None
    if isinstance(merged.get("seeds"), dict):
        replication = _validated_replication(merged["seeds"], where)
        seeds = list(range(replication.min))
    else:
        seeds = _validated_seeds(merged.get("seeds", [0]), where)
    has_grid = any(k in merged for k in ("factors", "seeds", "search")) or \
        any(item.split("=", 1)[0].strip() == "seeds" for item in overrides or [])
    if not has_grid:
        raise UserError(f"{where}: the study has no grid; give factors (e.g. `factors: {{ssl_weight: [0.0, 0.5]}}`), "
                        f"seeds (e.g. `seeds: [0, 1, 2]`) or a search")
    for key, text_value in parse_overrides(overrides or []):
        if key == "seeds":
            value = parse_cli_value(key, text_value)
            if isinstance(value, dict):
                replication = _validated_replication(value, "--set seeds")
                seeds = list(range(replication.min))
            else:
                replication = None
                seeds = _validated_seeds(value if isinstance(value, list) else [value], "--set seeds")
            continue
        if key not in SCHEMA:
            raise UserError(f"--set: unknown setting '{key}'{closest(key, list(SCHEMA) + ['seeds'])}; "
                            f"see the settings in trainables/config.py")
        value = parse_cli_value(key, text_value)
        if key in factors:
            factors.update(_validated_factors({key: value if isinstance(value, list) else [value]}, "--set"))
        else:
            fixed.update(_validated_fixed({key: value}, "--set"))
    for key in list(fixed):
        if key in factors:
            del fixed[key]  # a factor decides this setting per cell
    max_failures = merged.get("max_failures", 2)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise UserError(f"{where} max_failures: expected an integer >= 0, got {max_failures!r}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{path} description: expected one line of text")
    spec = StudySpec(
        name=name, path=path, scale=scale, description=description.strip(), factors=factors,
        seeds=seeds, fixed=fixed, resources=_validated_resources(merged.get("resources"), where),
        max_failures=max_failures, search=_validated_search(merged.get("search"), where), text=text,
        replication=replication,
    )
    if replication is not None and spec.search is not None:
        raise UserError(f"{where} seeds: adaptive replication ({{min, max, until_ci}}) is for grids; a search "
                        f"samples its own trials (give seeds as a list)")
    try:
        trials = spec.trials()
        resolve(spec.fixed, where=where)
    except ConfigError as err:
        raise UserError(str(err)) from None
    if spec.search is None and not trials:
        raise UserError(f"{where}: the grid is empty; give factors or seeds")
    if spec.search is not None:
        _check_objectives_defined(spec.search, resolve(spec.fixed, where=where), where)
    return spec


def _check_objectives_defined(search: SearchSpec, config: dict, where: str) -> None:
    """Every objective must be a number for every trial the search can sample: robust accuracy at
    ε_test >= ε_train needs an evaluation in the training norm at such an ε_test (the highest
    ε_train the space allows, when ε_train is searched)."""
    if "robust_acc_above_eps_train" not in search.objectives:
        return
    norm = config["norm_train"]
    fix = "or drop robust_acc_above_eps_train from search.objectives"
    if norm not in config["eval_norms"]:
        raise UserError(f"{where} search: objective robust_acc_above_eps_train needs the trials evaluated in "
                        f"the training norm {norm}, but eval_norms is {config['eval_norms']}; add {norm} to "
                        f"eval_norms, {fix}")
    eps_train = float(search.space["eps_train"]["high"]) if "eps_train" in search.space else config["eps_train"]
    grid = config[f"eval_eps_{norm}"]
    if not grid or max(grid) < eps_train - 1e-12:
        raise UserError(f"{where} search: objective robust_acc_above_eps_train is undefined: no ε_test in "
                        f"eval_eps_{norm} {grid} is >= ε_train {eps_train:g}; add one, e.g. "
                        f"--set 'eval_eps_{norm}={sorted(set(grid) | {eps_train})}', {fix}")


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """`--set key=value` items as (key, value-text) pairs, spaces around both stripped; an item
    without "=" is a UserError (one line)."""
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set epochs=3")
        key, value = item.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out
