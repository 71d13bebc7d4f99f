"""`python -m orchestrator.evaluate NAME --set KEY=VALUE ...`: evaluate a study's kept models again.

Examples:
  python -m orchestrator.evaluate weight_sweep --set eval_attack_steps=100 --set eval_restarts=5
  python -m orchestrator.evaluate smoke --scale smoke --set eval_stop_on_success=false
  python -m orchestrator.evaluate ablation --scale paper --set 'eval_norms=[linf, l2]' \\
      --storage s3://bucket/sslrobust --tracking-uri http://127.0.0.1:5000

Nothing is trained. Every model the study kept (orchestrator.models_store; the cells of the grid at
--scale, or every kept model of a search study) is evaluated in this process with its own config
plus the given evaluation settings (only those: eval_*, test_subset, corruptions, OOD, label-free
and defence settings, trainables.config.EVALUATION_KEYS). The rows go to a Parquet file per model
beside its own, `{config_hash}.eval-{eval_hash}.parquet`, marked by `eval_hash` (the hash of the
settings given), so no earlier result is replaced; their metrics go to the model's existing MLflow
child run as `reeval/<eval_hash>/<metric>`, with the settings in the tag `sslrobust.reeval.<eval_hash>`
and the file as an artifact; the report of this evaluation is written to reports/NAME/eval-<eval_hash>/
and the study's own report is rebuilt to point at it. Running the same settings again evaluates
only the models that do not have them yet.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from .errors import UserError

METRIC_PREFIX = "reeval"
TAG_PREFIX = "sslrobust.reeval."


@dataclass
class EvaluationOutcome:
    eval_hash: str
    evaluated: list[str] = field(default_factory=list)  # config hashes
    skipped: list[str] = field(default_factory=list)  # "<hash>: why"
    tracking_errors: list[str] = field(default_factory=list)
    report_path: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.evaluate",
        description="Evaluate a study's kept models again with other evaluation settings (a stronger "
                    "attack, more ε, corruptions, ...), without training; the new rows go beside the old.",
        epilog="examples:" + __doc__.split("Examples:", 1)[1].split("\n\n", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help="study name (a file studies/NAME.yaml)")
    parser.add_argument("--scale", default="default", help="the scale the study ran at (its grid's cells "
                        "are the models evaluated): smoke, default or paper")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="an evaluation setting to change, e.g. --set eval_attack_steps=100; "
                             "training settings cannot change (the models are trained)")
    parser.add_argument("--storage", default=os.environ.get("SSLROBUST_STORAGE", "runs"),
                        help="the study's storage: a path or a URI such as s3://bucket/prefix (default: ./runs)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="the study's MLflow tracking store (default: sqlite:///mlflow.db in this directory)")
    parser.add_argument("--data-dir", default=os.environ.get("SSLROBUST_DATA_DIR"),
                        help="where datasets are found or downloaded (env SSLROBUST_DATA_DIR)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the models are evaluated (default: a GPU if torch sees one)")

    def one_line_error(message: str):
        print(f"error: {message} (see python -m orchestrator.evaluate --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    return parser


def evaluation_overrides(sets: list[str]) -> dict:
    """The `--set` items as checked evaluation settings (UserError, one line, for anything else)."""
    from trainables.config import EVALUATION_KEYS, SCHEMA, ConfigError, check_value, parse_cli_value

    from .spec import closest, parse_overrides

    if not sets:
        raise UserError("give the evaluation settings to change with --set, e.g. --set eval_attack_steps=100")
    out = {}
    for key, text in parse_overrides(sets):
        if key not in SCHEMA and key != "seeds":
            raise UserError(f"--set: unknown setting '{key}'{closest(key, EVALUATION_KEYS)}; the evaluation "
                            f"settings are in trainables/config.py (EVALUATION_KEYS)")
        if key not in EVALUATION_KEYS:
            raise UserError(f"--set {key}: '{key}' is a training setting and the kept models are already trained; "
                            f"re-evaluation changes only evaluation settings (eval_*, test_subset, corruptions, "
                            f"ood_*, label_free_*, defence*); to train with it run python -m orchestrator.study")
        try:
            out[key] = check_value(key, parse_cli_value(key, text), f"--set {key}")
        except ConfigError as err:
            raise UserError(str(err)) from None
    return dict(sorted(out.items()))


def evaluation_hash(overrides: dict) -> str:
    """The identity of a re-evaluation: its checked settings, hashed (without the settings that
    change only its speed, trainables.config.NON_SEMANTIC_KEYS, as in config hashes)."""
    from trainables.config import NON_SEMANTIC_KEYS

    from .spec import settings_hash

    return settings_hash({k: v for k, v in overrides.items() if k not in NON_SEMANTIC_KEYS})


def _plan(spec, storage: str, overrides: dict, eval_hash: str, out) -> tuple[list[tuple[str, dict, dict]], list[str]]:
    """(models to evaluate as (config hash, trained config, config to evaluate with), skips)."""
    from trainables.config import ConfigError, resolve

    from . import models_store, results
    from .spec import config_hash

    kept = models_store.kept_hashes(storage, spec.name)
    grid = {t.config_hash for t in spec.trials()}
    if grid:
        outside = [h for h in kept if h not in grid]
        if outside:
            print(f"note: {len(outside)} kept model(s) of {spec.name} are not cells of its {spec.scale} scale; "
                  f"not evaluated (pass --scale to choose)", file=out)
        kept = [h for h in kept if h in grid]
    if not kept:
        raise UserError(f"study '{spec.name}' ({spec.scale} scale) has no kept models in "
                        f"{models_store.models_dir(storage, spec.name)}; run it first (python -m orchestrator.study "
                        f"{spec.name} --scale {spec.scale}) or pass the study's --storage")
    plan, skips = [], []
    for chash in kept:
        trained = models_store.read_meta(storage, spec.name, chash)["config"]
        try:
            config = resolve({**trained, **overrides}, where=f"--set (model {chash})")
        except ConfigError as err:
            raise UserError(str(err)) from None
        if config_hash(config) == chash:
            skips.append(f"{chash}: these are the settings it was evaluated with after training")
        elif results.evaluation_exists(storage, spec.name, chash, eval_hash):
            skips.append(f"{chash}: already evaluated with these settings "
                         f"({results.file_name(chash, eval_hash)}; delete it to evaluate again)")
        else:
            plan.append((chash, trained, config))
    return plan, skips


def run_evaluation(spec, storage: str, tracking_uri: str | None, sets: list[str], data_dir: str | None = None,
                   device: str = "auto", out=sys.stdout) -> EvaluationOutcome:
    """Evaluate the kept models of `spec`'s study with the `--set` evaluation settings (see the
    module docstring). Checks the input before writing anything; raises UserError (one line)."""
    from . import results, storage as storage_mod, tracking
    from .preflight import check_datasets
    from .spec import Trial

    storage = storage_mod.normalize(storage)
    overrides = evaluation_overrides(sets)
    eval_hash = evaluation_hash(overrides)
    own = results.own_evaluation(results.load(spec.name, storage))  # a corrupt file is named now
    plan, skips = _plan(spec, storage, overrides, eval_hash, out)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    check_datasets([Trial(config, chash, {}) for chash, _, config in plan], spec.fixed, data_dir)
    outcome = EvaluationOutcome(eval_hash, skipped=skips)
    described = ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    print(f"re-evaluating {len(plan)} kept model(s) of {spec.name} with {described} (eval_hash {eval_hash}); "
          f"{len(skips)} skipped", file=out)
    for skip in skips:
        print(f"  skipped {skip}", file=out)
    written: dict[str, tuple[dict, list[dict], bytes]] = {}
    for chash, _, config in plan:
        records = evaluate_kept_model(spec.name, storage, chash, config, data_dir, device)
        rows = _rows(spec.name, chash, config, records, own[own["config_hash"] == chash], eval_hash)
        encoded = results.encode_trial(spec.name, chash, rows, eval_hash=eval_hash)
        results.write_encoded(storage, spec.name, chash, encoded, eval_hash=eval_hash)
        written[chash] = (config, records, encoded)
        outcome.evaluated.append(chash)
        print(f"  {chash}: {len(rows)} rows -> {results.file_name(chash, eval_hash)}", file=out)
    if written:
        outcome.tracking_errors = _log_to_mlflow(uri, spec.name, eval_hash, overrides, written, own)
    _finish(spec, storage, overrides, eval_hash, outcome, out)
    return outcome


def evaluate_kept_model(study: str, storage: str, chash: str, config: dict, data_dir: str | None,
                        device: str = "auto") -> list:
    """The records (trainables.records.EvalRecord) `trainables.evaluate_model.evaluate_model` gives for the kept model `chash` evaluated
    with `config`, on the test images its trial used (same subset and seed)."""
    from trainables.evaluate_model import evaluate_model
    from trainables.train import DATA_SELECTION_SEED, load_split

    from .models_store import load_model

    model, _ = load_model(study, chash, storage, device=device)
    target = next(model.parameters()).device
    data = load_split(config["dataset"], False, data_dir, config["test_subset"], DATA_SELECTION_SEED, target)
    return evaluate_model(model, data.images.float() / 255, data.labels, config, data_dir=data_dir)


def _rows(study: str, chash: str, config: dict, records: list, own, eval_hash: str) -> list[dict]:
    from .result_schema import CONFIG_COLUMNS
    from .tracking import provenance_tags

    first = own.iloc[0] if len(own) else None
    run_id = first["mlflow_run_id"] if first is not None else None
    shared = {
        **{c: config[c] for c in CONFIG_COLUMNS}, "study": study, "config_hash": chash,
        "trial_id": str(first["trial_id"]) if first is not None else chash,
        "node_id": f"evaluate@{socket.gethostname()}",  # this command's machine, not a Ray node
        "mlflow_run_id": run_id if isinstance(run_id, str) else None,
        "git_sha": provenance_tags().get("sslrobust.git_sha"),
        "finished_at": dt.datetime.now(dt.timezone.utc), "config_json": json.dumps(config, sort_keys=True),
        "eval_hash": eval_hash,
    }
    return [{**shared, **record.to_row()} for record in records]


def _log_to_mlflow(uri: str, study: str, eval_hash: str, overrides: dict,
                   written: dict[str, tuple[dict, list[dict], bytes]], own) -> list[str]:
    """Log each re-evaluation to its model's existing MLflow child run (found by the run id in the
    model's rows, else by its config-hash tag). Returns one line per model that could not be logged."""
    import tempfile

    from . import tracking
    from .metrics import trial_metrics

    sqlite_path = uri.split(":///", 1)[1].split("?", 1)[0] if uri.lower().startswith("sqlite:///") else None
    if sqlite_path and not os.path.exists(sqlite_path):  # MLflow would create an empty store
        return [f"no MLflow database at {sqlite_path}: nothing logged (pass the study's --tracking-uri)"]
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    errors = []
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(study)
    except Exception as exc:  # noqa: BLE001 - the results are in Parquet; say what was not logged
        return [f"MLflow at {uri}: {_reason(exc)}"]
    if experiment is None:
        return [f"MLflow at {uri} has no experiment '{study}': nothing logged"]
    settings = json.dumps(overrides, sort_keys=True)
    for chash, (config, records, encoded) in written.items():
        try:
            run_id = _child_run(client, experiment.experiment_id, chash, own)
            if run_id is None:
                errors.append(f"{chash}: no MLflow run with tag {tracking.HASH_TAG}={chash}")
                continue
            now = int(time.time() * 1000)  # the same metrics (and ε-step curves) a trial's run gets
            client.log_batch(run_id, metrics=[
                Metric(f"{METRIC_PREFIX}/{eval_hash}/{name}", float(value), now, step)
                for name, value, step in trial_metrics(config, records) if value is not None and value == value
            ], tags=[RunTag(TAG_PREFIX + eval_hash, settings)], synchronous=True)
            with tempfile.TemporaryDirectory() as folder:
                from .results import file_name

                path = os.path.join(folder, file_name(chash, eval_hash))
                with open(path, "wb") as f:
                    f.write(encoded)
                client.log_artifact(run_id, path, METRIC_PREFIX)
        except Exception as exc:  # noqa: BLE001 - one line per model; the Parquet rows are written
            errors.append(f"{chash}: {_reason(exc)}")
    return errors


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _child_run(client, experiment_id: str, chash: str, own) -> str | None:
    from . import tracking

    ids = [i for i in own.loc[own["config_hash"] == chash, "mlflow_run_id"].dropna().unique() if i]
    for run_id in ids:
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run id of another store: search by tag instead
            continue
        if run.data.tags.get(tracking.HASH_TAG) == chash:
            return run_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.HASH_TAG}` = '{chash}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    finished = [r for r in runs if r.info.status == "FINISHED"] or runs
    return finished[0].info.run_id if finished else None


def _finish(spec, storage: str, overrides: dict, eval_hash: str, outcome: EvaluationOutcome, out) -> None:
    from . import results
    from .report.build import build_report
    from .summary import robustness_table

    table = results.load(spec.name, storage)
    expected = {t.config_hash: t.config for t in spec.trials()} or None
    described = ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    try:
        files = build_report(spec.name, storage, spec_text=spec.text, expected_hashes=expected, table=table,
                             evaluation=eval_hash, evaluation_note=(
                                 f"Re-evaluation {eval_hash} of the kept models (python -m orchestrator.evaluate): "
                                 f"their own settings with {described}; nothing was trained again."))
        outcome.report_path = str(files.html)
        build_report(spec.name, storage, spec_text=spec.text, expected_hashes=expected, table=table)
    except UserError as err:
        print(f"report not written: {err}", file=out)
    print("", file=out)
    print(f"robust accuracy against ε_test ({spec.name}, re-evaluation {eval_hash}: {described}):", file=out)
    print(robustness_table(spec, results.evaluation_rows(table, eval_hash)), file=out)
    print("", file=out)
    print(f"models evaluated now: {len(outcome.evaluated)}, skipped: {len(outcome.skipped)}", file=out)
    if outcome.tracking_errors:
        print(f"MLflow logging failed for {len(outcome.tracking_errors)} model(s); their rows are in Parquet:",
              file=out)
        for error in outcome.tracking_errors:
            print(f"  {error}", file=out)
    print(f"results:  {results.study_dir(storage, spec.name)}  (rows with eval_hash = '{eval_hash}')", file=out)
    if outcome.report_path:
        print(f"report:   {outcome.report_path}", file=out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .spec import load_study

        spec = load_study(args.study, args.scale, [])
        evaluation_overrides(args.sets)  # bad settings are named before anything is read
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu")
        outcome = run_evaluation(spec, args.storage, args.tracking_uri, args.sets, data_dir=args.data_dir,
                                 device=args.device)
        return 1 if outcome.tracking_errors else 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the models evaluated so far have their rows. Run the same command again to "
              "evaluate the rest.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
