"""`python -m orchestrator.report NAME`: rebuild a study's report from its Parquet results."""
from __future__ import annotations

import argparse
import sys

from orchestrator.errors import UserError

from .build import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.report",
        description="Rebuild a study's report (figures, tables, report.html) from its Parquet results.",
    )
    parser.add_argument("study", metavar="NAME", help="study name")
    parser.add_argument("--storage", default="runs", help="results root: local path or URI (default: runs)")
    parser.add_argument("--out", default=None, help="output directory (default: STORAGE/reports/NAME)")
    parser.add_argument("--eval-hash", default=None, help="the report of that re-evaluation of the kept "
                        "models (python -m orchestrator.evaluate; default: the trials' own evaluation), "
                        "in STORAGE/reports/NAME/eval-HASH")
    args = parser.parse_args(argv)
    try:
        files = build_report(args.study, storage=args.storage, out_dir=args.out, evaluation=args.eval_hash)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(files.html)
    return 0
