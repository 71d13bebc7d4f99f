"""Screenshots of a study in the MLflow UI, as a new user meets it (not part of CI).

Starts `mlflow ui` on 127.0.0.1 with the study's tracking store, takes headless-Chromium
screenshots, each in a fresh browser profile (what a first visit shows), and stops the UI again:

    experiment_plain_link.png  the experiment's plain link, without `workflowType=`: MLflow 3.17
                               opens it in its GenAI view whatever the experiment's tags say
    runs_table.png             the trial runs listed by name (λ and seed), the link the study prints
                               with the table instead of the charts
    one_run.png                the first trial's run page (overview: params, metrics, tags)
    one_run_metrics.png        that run's metric charts
    chart_view.png             the link the study prints: the chart view, the robustness curves of
                               all trial runs overlaid against ε (step = round(ε·10^4)) first

    .venv/bin/python scripts/mlflow_screenshots.py weight_sweep --tracking-uri sqlite:////tmp/runs/mlflow.db \\
        --out /tmp/screens

Needs `chromium` (Debian: apt-get install chromium). Every link but the plain one carries
`workflowType=machine_learning` (orchestrator.tracking_uri.TRIALS_VIEW).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow ui exited early (status {proc.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui at {url} did not answer within {timeout:g} s")


def screenshot(browser: str, url: str, path: Path, wait_ms: int, height: int = 1200) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as profile:  # no view choice or chart layout remembered
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size=2400,{height}",  # wide: charts get room
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    print(f"{path}  <- {url}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:////tmp/runs/mlflow.db")
    parser.add_argument("--out", default="mlflow_screenshots", help="folder for the PNG files")
    parser.add_argument("--wait-ms", type=int, default=60000, help="(virtual) time the page gets to render; "
                        "charts still loading show as spinners")
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("error: chromium not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.study)
    if experiment is None:
        print(f"error: no MLflow experiment '{args.study}' at {args.tracking_uri}", file=sys.stderr)
        return 2
    children = client.search_runs([experiment.experiment_id], "tags.`sslrobust.role` = 'trial'",
                                  order_by=["attributes.run_name ASC"], max_results=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_cli), "ui", "--backend-store-uri", args.tracking_uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(url, proc)
        from orchestrator.tracking_uri import trials_view_url

        base = f"{url}/#/experiments/{experiment.experiment_id}"
        view = "workflowType=machine_learning"
        trials = trials_view_url(url, experiment.experiment_id)
        screenshot(browser, base, out / "experiment_plain_link.png", args.wait_ms)
        screenshot(browser, trials.replace("compareRunsMode=CHART", "compareRunsMode=TABLE"),
                   out / "runs_table.png", args.wait_ms)
        if children:
            screenshot(browser, f"{base}/runs/{children[0].info.run_id}?{view}", out / "one_run.png", args.wait_ms,
                       height=2000)  # down to its metrics
            screenshot(browser, f"{base}/runs/{children[0].info.run_id}/model-metrics?{view}",
                       out / "one_run_metrics.png", args.wait_ms)
        screenshot(browser, trials, out / "chart_view.png", args.wait_ms, height=1400)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
