"""Trials that fit the nodes: every shipped study's paper-scale trial packs a whole number of times
onto each GPU worker type of cluster.yaml with no GPU fraction idle by design, docs/cluster.md's
packing table says the same, and the paper scale retries spot preemptions generously."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import available_studies, load_study

REPO = Path(__file__).resolve().parents[1]
SPOT_RETRIES = 10  # a 100-epoch trial on spot may be preempted several times; each retry resumes


def worker_types() -> dict[str, dict[str, float]]:
    types = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    return {name: t["resources"] for name, t in types.items() if t["resources"].get("GPU", 0) > 0}


def paper_studies() -> list[str]:
    return sorted(name for name, path in available_studies().items()
                  if "paper" in (yaml.safe_load(path.read_text()).get("scales") or {}))


def trials_per_node(trial: dict[str, float], node: dict[str, float]) -> int:
    asked = {"CPU": trial.get("cpu", 0), "GPU": trial.get("gpu", 0)}
    return min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in asked.items() if v > 0)


def test_every_study_but_smoke_has_a_paper_scale():
    assert set(available_studies()) - set(paper_studies()) == {"smoke"}
    assert len(worker_types()) == 2


@pytest.mark.parametrize("study", paper_studies())
def test_paper_trials_fill_every_worker_type(study):
    spec = load_study(study, "paper")
    assert spec.resources["gpu"] > 0, "a paper-scale trial runs on a GPU"
    assert (1 / spec.resources["gpu"]).is_integer() or spec.resources["gpu"].is_integer()
    for name, node in worker_types().items():
        n = trials_per_node(spec.resources, node)
        assert n >= 1, f"{study}: a {spec.resources} trial does not fit on {name} {node}"
        idle_gpu = node["GPU"] - n * spec.resources["gpu"]
        assert abs(idle_gpu) < 1e-9, f"{study} on {name}: {n} trials leave {idle_gpu:g} GPU idle"
        assert n * spec.resources["cpu"] <= node["CPU"]


@pytest.mark.parametrize("study", paper_studies())
def test_paper_scale_retries_spot_preemptions(study):
    assert load_study(study, "paper").max_failures >= SPOT_RETRIES


def test_docs_packing_table_matches_the_configs_and_the_studies():
    text = (REPO / "docs" / "cluster.md").read_text()
    types = worker_types()
    header = re.search(r"^\| trial resources \(paper scale\) \| studies \|(.*)\|$", text, flags=re.M)
    assert header, "docs/cluster.md has no packing table"
    columns = [c.strip().strip("`") for c in header.group(1).split("|")]
    assert columns == [f"{name} ({types[name]['CPU']:g} CPU, {types[name]['GPU']:g} GPU)" for name in sorted(types)]
    by_resources: dict[tuple, list[str]] = {}
    for study in paper_studies():
        r = load_study(study, "paper").resources
        by_resources.setdefault((r["cpu"], r["gpu"]), []).append(study)
    rows = 0
    for (cpu, gpu), studies in by_resources.items():
        row = re.search(rf"^\| `\{{cpu: {cpu:g}, gpu: {gpu:g}\}}` \| (.*?) \|(.*)\|$", text, flags=re.M)
        assert row, f"no packing row for {{cpu: {cpu:g}, gpu: {gpu:g}}}"
        assert sorted(re.findall(r"\w+", row.group(1))) == sorted(studies)
        cells = [c.strip() for c in row.group(2).split("|")]
        assert cells == [str(trials_per_node({"cpu": cpu, "gpu": gpu}, types[name])) for name in sorted(types)]
        rows += 1
    assert rows == len(by_resources) >= 1
