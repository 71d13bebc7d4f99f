"""`python -m orchestrator.study NAME`: run a study's grid of trials on Ray Tune.

Examples:
  python -m orchestrator.study --list
  python -m orchestrator.study weight_sweep                      # default scale, local Ray
  python -m orchestrator.study weight_sweep --dry-run            # what would run
  python -m orchestrator.study smoke --scale smoke
  python -m orchestrator.study ablation --scale paper --address auto \\
      --storage s3://bucket/sslrobust --tracking-uri http://127.0.0.1:5000
  python -m orchestrator.study weight_sweep --set 'ssl_weight=[0, 0.5, 1, 2, 4]'   # only new cells run
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

from .errors import UserError


def _parse_resources(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("cpu", "gpu"):
            raise UserError(f"--resources: unknown resource {key!r}; use e.g. --resources cpu=1,gpu=0.25")
        try:
            out[key] = float(value)
        except ValueError:
            raise UserError(f"--resources: {part!r} is not key=number, e.g. cpu=1,gpu=0.25") from None
        if not out[key] >= 0:
            raise UserError(f"--resources: {key} must be >= 0")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.study",
        description="Run a self-supervised adversarial-robustness study: one Ray Tune trial per cell of "
                    "the study's grid, an MLflow child run per trial, Parquet results and an HTML report.",
        epilog="examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", nargs="?", help="study name (a file studies/NAME.yaml); see --list")
    parser.add_argument("--list", action="store_true", help="list the studies, one line each")
    parser.add_argument("--scale", default="default", help="smoke (CI, seconds), default (a CPU machine, "
                        "minutes) or paper (CIFAR-10 with the seed papers' models, GPU clusters)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set epochs=3; for a factor give a list: "
                             "--set 'ssl_weight=[0,1]'; --set 'seeds=[0,1,2]'")
    parser.add_argument("--address", help="an existing Ray cluster: 'auto' or ray://HOST:10001 "
                        "(default: start a local Ray on this machine)")
    parser.add_argument("--storage", default=os.environ.get("SSLROBUST_STORAGE", "runs"),
                        help="where results, checkpoints, pre-trained backbones and reports go: a path "
                             "or a URI such as s3://bucket/prefix (default: ./runs)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking store (default: sqlite:///mlflow.db in this directory)")
    parser.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    parser.add_argument("--resources", metavar="cpu=N,gpu=M",  # parsed in main: errors are one line
                        help="override the study's per-trial resources, e.g. cpu=1,gpu=0")
    parser.add_argument("--data-dir", default=os.environ.get("SSLROBUST_DATA_DIR"),
                        help="where datasets are found or downloaded (env SSLROBUST_DATA_DIR)")
    parser.add_argument("--resume", action="store_true", help="continue the last interrupted run of "
                        "this study from its checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="print the trials the grid expands to "
                        "(and which are done); run nothing")
    parser.add_argument("--tune-output", action="store_true", help="show Ray Tune's own per-trial "
                        "status tables instead of the compact progress line")
    parser.add_argument("--backfill-tracking", action="store_true", help="log results that exist in "
                        "Parquet but not in MLflow (after a tracking outage); train nothing")

    def one_line_error(message: str):  # argparse's default prints the whole usage first
        print(f"error: {message} (see python -m orchestrator.study --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    return parser


def list_studies(out=sys.stdout) -> None:
    import yaml

    from .spec import available_studies

    for name, path in available_studies().items():
        try:
            description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            description = "(invalid YAML)"
        print(f"{name:<22} {str(description).strip().splitlines()[0] if description else ''}", file=out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list:
            list_studies()
            return 0
        if not args.study:
            raise UserError("name a study, e.g. `python -m orchestrator.study weight_sweep`; "
                            "`--list` shows them all")
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise UserError("--max-concurrent must be at least 1")
        resources = _parse_resources(args.resources) if args.resources else None
        from .spec import load_study

        spec = load_study(args.study, args.scale, args.sets)
        if args.backfill_tracking:
            from .backfill import backfill

            backfill(spec, args.storage, args.tracking_uri)
            return 0
        from .replication import run_replicated
        from .runner import RunOptions, run_study

        run = run_replicated if spec.replication is not None else run_study
        outcome = run(spec, RunOptions(
            storage=args.storage, tracking_uri=args.tracking_uri, address=args.address,
            max_concurrent=args.max_concurrent, resume=args.resume, dry_run=args.dry_run,
            data_dir=args.data_dir, resources=resources, verbose=2 if args.tune_output else 1,
        ), out=sys.stdout)  # the stdout of now, not of import time (Tune pickles what prints)
        return 1 if outcome.failed or outcome.missing else 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished trials are saved. Continue with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    # The interpreter's exit would collect the ~600,000 objects Ray Tune, MLflow, pandas and
    # matplotlib leave behind, one by one: ~2 s of every study's end (benchmarks/RESULTS.md §10).
    # Frozen, they go with the process; atexit handlers (Ray's shutdown, flushing) still run.
    gc.freeze()
    sys.exit(code)
