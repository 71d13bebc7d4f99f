"""Study wall time against the ideal: what a user waits for, set against the work the trials did.

Runs a study (default: `weight_sweep` at its default scale) through the real command line,
`python -m orchestrator.study`, in a temporary folder (storage, MLflow sqlite store), and times the
whole command. Each trial reports its own work, `train_seconds` + `eval_seconds` (building the
Trainer and its epochs, and `Trainer.evaluate`: orchestrator/trainable.py); the ideal wall time is
the sum of that work over all trials divided by the trials that run at once (the study's CPUs per
trial into this machine's CPUs, at most the number of trials or --max-concurrent). Everything else a
user waits on (starting Ray and the MLflow store, Tune, checkpoints, Parquet, the report, and slots
left idle by an uneven last round) is in the ratio.

    python benchmarks/bench_study_wall.py [--study weight_sweep] [--scale default] [--set KEY=VALUE ...]
        [--show-end LINES] [--keep DIR]

Target: wall / ideal <= 1.08. Run it on an otherwise idle machine: other processes slow the
trials, which the ideal absorbs, and the driver's work, which it does not.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.trainable import EVAL_SECONDS, TRAIN_SECONDS  # noqa: E402 - after the path is set


def trial_work(storage: Path) -> list[tuple[float, float]]:
    """(train_seconds, eval_seconds) of every trial, from the last result line of each trial's Tune
    result file (`<storage>/tune/<invocation>/<trial>/result.json`)."""
    work = []
    for path in sorted(storage.glob("tune/*/*/result.json")):
        finals = [r for r in map(json.loads, path.read_text().splitlines()) if TRAIN_SECONDS in r]
        if finals:
            work.append((float(finals[-1][TRAIN_SECONDS]), float(finals[-1][EVAL_SECONDS])))
    return work


def trial_spans(storage: Path) -> list[tuple[float, float]]:
    """(start, end) of every trial in seconds since the epoch, whole seconds (Tune's `timestamp`):
    the first report's time less the trial's time by then, and the last report's time."""
    spans = []
    for path in sorted(storage.glob("tune/*/*/result.json")):
        reports = [json.loads(line) for line in path.read_text().splitlines()]
        if reports:
            spans.append((reports[0]["timestamp"] - reports[0]["time_total_s"], float(reports[-1]["timestamp"])))
    return spans


def slots(study: str, scale: str, sets: list[str], max_concurrent: int | None) -> tuple[int, int]:
    """(trials in the study, trials that run at once on this machine's local Ray)."""
    from orchestrator.spec import load_study

    spec = load_study(study, scale, sets)
    trials = len(spec.trials())
    at_once = max(1, int((os.cpu_count() or 1) // spec.resources["cpu"])) if spec.resources["cpu"] else trials
    return trials, min(trials, at_once, max_concurrent or trials)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", default="weight_sweep")
    parser.add_argument("--scale", default="default")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--show-end", type=int, default=0, metavar="LINES",
                        help="also print the last LINES lines the study printed (its end-of-run tables)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR (a new folder) and keep its results, models and MLflow store")
    args = parser.parse_args()
    trials, at_once = slots(args.study, args.scale, args.sets, args.max_concurrent)
    if args.keep is not None:
        if args.keep.exists():  # its earlier results would be reused, not measured
            parser.error(f"--keep {args.keep}: already exists; give a new folder")
        args.keep.mkdir(parents=True)
    with (contextlib.nullcontext(str(args.keep)) if args.keep else
          tempfile.TemporaryDirectory(prefix="bench-study-wall-")) as folder:
        work_dir = Path(folder).resolve()
        command = [sys.executable, "-m", "orchestrator.study", args.study, "--scale", args.scale,
                   "--storage", str(work_dir / "runs"), "--tracking-uri", f"sqlite:///{work_dir}/mlflow.db",
                   *[f"--set={s}" for s in args.sets],
                   *(["--max-concurrent", str(args.max_concurrent)] if args.max_concurrent else [])]
        load_before = os.getloadavg()
        start, started_at = time.perf_counter(), time.time()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall, ended_at = time.perf_counter() - start, time.time()
        load_after = os.getloadavg()
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        work = trial_work(work_dir / "runs")
        spans = trial_spans(work_dir / "runs")
        if args.show_end:
            print("\n".join(done.stdout.splitlines()[-args.show_end:]))
    if len(work) != trials:
        print(f"expected {trials} trials' results, found {len(work)}", file=sys.stderr)
        return 1
    train, evaluate = sum(w[0] for w in work), sum(w[1] for w in work)
    ideal = (train + evaluate) / at_once
    rounds = math.ceil(trials / at_once)
    print(f"{args.study} ({args.scale} scale{', ' + ' '.join(args.sets) if args.sets else ''}): {trials} trials, "
          f"{at_once} at once ({rounds} rounds); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"trials' own work: training {train:.1f} s + evaluation {evaluate:.1f} s = {train + evaluate:.1f} s "
          f"(per trial {min(sum(w) for w in work):.1f}-{max(sum(w) for w in work):.1f} s)")
    print(f"study wall time {wall:.1f} s (the whole command), ideal {ideal:.1f} s (work / {at_once})")
    print(f"wall / ideal = {wall / ideal:.3f} (target <= 1.08)")
    # Where the rest of the wall time went (±1 s: Tune's timestamps are whole seconds)
    before = min(s for s, _ in spans) - started_at
    after = ended_at - max(e for _, e in spans)
    inside = (sum(e - s for s, e in spans) - train - evaluate) / at_once
    print(f"beyond the ideal: {before:.0f} s before the first trial (Ray, MLflow, Tune, the trials' imports), "
          f"{after:.0f} s after the last (report, summary), {inside:.0f} s inside trials beyond their work "
          f"(per slot), {wall - ideal - before - after - inside:.0f} s of slots idle between and after trials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
