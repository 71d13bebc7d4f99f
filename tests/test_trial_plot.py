"""The per-trial SVG figure (orchestrator.trial_plot): parsed back and checked geometrically."""
from __future__ import annotations

import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from orchestrator.trial_plot import trial_curve_svg

NS = {"svg": "http://www.w3.org/2000/svg"}
EPS = [0.0, 0.05, 0.1, 0.2, 0.3]
CONFIG = dict(eval_norms=["linf", "l2"], eps_train=0.1, ssl_weight=0.5, attack_variant="trades",
              init="random", seed=3)


def row(norm, eps, acc, attack="pgd", defence=None, **extra):
    return dict(norm=norm, eps_test=eps, attack=attack, robust_acc=acc, corruption=None, severity=None,
                ood_set=None, measure=None, value=None, defence=defence, **extra)


def curve(norm, grid, defence=None):
    """A falling curve from accuracy 1.0 at ε = 0 to 0.0 at the last ε (defended: both attacks)."""
    rows = []
    for i, eps in enumerate(grid):
        acc = 1.0 - i / (len(grid) - 1)
        if eps == 0:
            rows.append(row(norm, eps, acc, "none", defence))
        elif defence:
            rows += [row(norm, eps, acc, "pgd", defence), row(norm, eps, acc / 2, "pgd_adaptive", defence)]
        else:
            rows.append(row(norm, eps, acc))
    return rows


def draw(tmp_path, records, config=CONFIG, name="robust_accuracy_curve.svg"):
    path = tmp_path / name  # written as the trial logs it: UTF-8 bytes of the text
    path.write_bytes(trial_curve_svg(records, config).encode())
    return ET.parse(path).getroot()


def axes(root):
    box = root.find(".//svg:rect[@class='axes']", NS)
    x, y = float(box.get("x")), float(box.get("y"))
    return x, x + float(box.get("width")), y, y + float(box.get("height"))  # left, right, top, bottom


def series(root):
    """{legend label: (points, polyline element, its group)} for every drawn curve."""
    out = {}
    for g in root.findall(".//svg:g[@class='series']", NS):
        line = g.find("svg:polyline", NS)
        points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        out[g.find("svg:title", NS).text] = (points, line, g)
    return out


def texts(root, cls):
    return ["".join(t.itertext()) for t in root.findall(f".//svg:g[@class='{cls}']/svg:text", NS)]


def title(root):
    return root.find(".//svg:text[@class='title']", NS).text


def eps_train_x(root):
    line = root.find(".//svg:line[@class='eps-train']", NS)
    assert line.get("x1") == line.get("x2")
    return float(line.get("x1"))


def test_a_standalone_svg_document(tmp_path):
    root = draw(tmp_path, curve("linf", EPS))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("version") == "1.1"
    assert (root.get("width"), root.get("height")) == ("500", "350")
    assert root.get("viewBox") == "0 0 500 350"


def test_one_curve_per_series_with_its_points(tmp_path):
    extra = [dict(row(None, None, 0.7, "none"), corruption="gaussian_noise", severity=3),  # corruption row
             dict(row(None, None, None, "none"), ood_set="mnist", measure="auroc", value=0.8),  # OOD row
             dict(row(None, None, None, "none"), measure="entropy", value=1.2)]  # label-free measure
    records = curve("linf", EPS) + curve("l2", [0.0, 0.5, 1.0]) + curve("linf", EPS, "ssl_reverse") + extra
    drawn = series(draw(tmp_path, records))
    assert list(drawn) == ["PGD linf", "ssl_reverse, pgd linf", "ssl_reverse, pgd_adaptive linf", "PGD l2"]
    assert [len(points) for points, *_ in drawn.values()] == [5, 5, 5, 3]
    colours = [g.get("stroke") for *_, g in drawn.values()]
    assert len(set(colours)) == len(colours)


def test_points_follow_eps_and_accuracy(tmp_path):
    root = draw(tmp_path, curve("linf", EPS))
    left, right, top, bottom = axes(root)
    points = series(root)["PGD linf"][0]
    xs = [x for x, _ in points]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert left < xs[0] < xs[-1] < right  # a margin at both ends
    assert points[0][1] == pytest.approx(top, abs=0.01)  # robust_acc 1.0
    assert points[-1][1] == pytest.approx(bottom, abs=0.01)  # robust_acc 0.0
    # Linear in ε: the same pixels per unit ε between any two points.
    scale = (xs[-1] - xs[0]) / (EPS[-1] - EPS[0])
    for eps, x in zip(EPS, xs):
        assert x == pytest.approx(xs[0] + (eps - EPS[0]) * scale, abs=0.02)
    # Unsorted input is drawn sorted by ε.
    shuffled = series(draw(tmp_path, curve("linf", EPS)[::-1], name="b.svg"))["PGD linf"][0]
    assert shuffled == points


def test_the_eps_train_line_sits_at_eps_train(tmp_path):
    root = draw(tmp_path, curve("linf", EPS))
    xs = [x for x, _ in series(root)["PGD linf"][0]]
    expected = xs[0] + (0.1 - EPS[0]) * (xs[-1] - xs[0]) / (EPS[-1] - EPS[0])
    assert eps_train_x(root) == pytest.approx(expected, abs=0.02)


def test_eps_train_beyond_the_grid_widens_the_axis(tmp_path):
    root = draw(tmp_path, curve("linf", [0.0, 0.1]), dict(CONFIG, eps_train=0.4))
    left, right, _, _ = axes(root)
    xs = [x for x, _ in series(root)["PGD linf"][0]]
    assert xs[-1] < eps_train_x(root) < right
    assert eps_train_x(root) - left == pytest.approx(4 * (xs[-1] - left) - 3 * (xs[0] - left), abs=0.05)


def test_ticks_and_labels(tmp_path):
    root = draw(tmp_path, curve("linf", EPS))
    assert texts(root, "xticks") == ["0", "0.1", "0.2", "0.3"]
    assert texts(root, "yticks") == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
    labels = [t.text for t in root.findall("svg:text", NS)]
    assert "ε_test" in labels and "robust accuracy" in labels
    assert title(root) == "λ = 0.5, trades, random, seed 3"


def test_legend_lists_every_series_and_eps_train(tmp_path):
    records = curve("linf", EPS) + curve("linf", EPS, "ssl_reverse")
    root = draw(tmp_path, records, dict(CONFIG, eps_train=8 / 255))
    assert texts(root, "legend") == ["PGD linf", "ssl_reverse, pgd linf", "ssl_reverse, pgd_adaptive linf",
                                     f"ε_train = {8 / 255:g}"]
    samples = root.findall(".//svg:g[@class='legend']/svg:line", NS)
    assert [s.get("stroke-dasharray") is not None for s in samples] == [False, False, True, True]


def test_defended_adaptive_attack_is_dashed_and_marked_with_crosses(tmp_path):
    root = draw(tmp_path, curve("linf", EPS) + curve("linf", EPS, "ssl_reverse"))
    drawn = series(root)
    assert drawn["PGD linf"][1].get("stroke-dasharray") is None
    assert drawn["ssl_reverse, pgd linf"][1].get("stroke-dasharray") is None
    assert drawn["ssl_reverse, pgd_adaptive linf"][1].get("stroke-dasharray")
    groups = {label: g for label, (*_, g) in drawn.items()}
    assert len(groups["PGD linf"].findall("svg:circle", NS)) == 5
    assert len(groups["ssl_reverse, pgd linf"].findall("svg:path", NS)) == 5
    assert not groups["ssl_reverse, pgd linf"].findall("svg:circle", NS)


def test_special_characters_are_escaped(tmp_path):
    config = dict(CONFIG, attack_variant='trades<ssl>&"x"', init="a'b]]>")
    records = curve("linf", EPS) + curve("linf", EPS, "<rev&erse>")
    root = draw(tmp_path, records, config)
    assert title(root) == "λ = 0.5, trades<ssl>&\"x\", a'b]]>, seed 3"
    assert "<rev&erse>, pgd linf" in texts(root, "legend")
    assert "<rev&erse>, pgd_adaptive linf" in series(root)


def test_no_points_still_draws_axes_eps_train_and_title(tmp_path):
    root = draw(tmp_path, [])
    left, right, _, _ = axes(root)
    assert series(root) == {}
    assert left < eps_train_x(root) < right
    assert title(root) == "λ = 0.5, trades, random, seed 3"
    assert texts(root, "legend") == ["ε_train = 0.1"]
    assert texts(root, "yticks") == ["0", "0.2", "0.4", "0.6", "0.8", "1"]


@pytest.mark.parametrize("records, eps_train", [
    ([row("linf", 0.0, 0.7, "none")], 0.0),  # one point at ε = 0 = ε_train: nothing to span
    ([row("linf", 0.1, 0.7)], 0.1),
    ([row("linf", 0.2, 0.3), row("linf", 0.2, 0.4)], 0.2),  # all ε equal
    ([row("linf", 0.0, 0.7, "none")], 8 / 255),
])
def test_degenerate_ranges(tmp_path, records, eps_train):
    root = draw(tmp_path, records, dict(CONFIG, eps_train=eps_train))
    left, right, top, bottom = axes(root)
    points = series(root)["PGD linf"][0]
    assert len(points) == len(records)
    for x, y in points:
        assert math.isfinite(x) and left < x < right and top <= y <= bottom
    assert left < eps_train_x(root) < right
    assert len(texts(root, "xticks")) >= 2


def test_missing_values_are_skipped(tmp_path):
    nan = float("nan")
    records = curve("linf", EPS) + [
        row("linf", nan, 0.5), row("linf", None, 0.5), row("linf", 0.15, None), row("linf", 0.25, nan),
        dict(row(nan, nan, nan, "none"), corruption=nan),  # a pandas round trip of an empty row
        dict(row("linf", 0.01, 0.9), corruption="fog"),  # not an ε row
    ]
    for r in curve("linf", [0.0, 0.4]):  # defence NaN or "none": undefended, after pandas
        records.append(dict(r, defence=nan if r["eps_test"] else "none"))
    records += [row("linf", 0.0, 0.8, "none", "ssl_reverse")]  # one defended point: no defended curve
    drawn = series(draw(tmp_path, records))
    assert list(drawn) == ["PGD linf"]
    assert len(drawn["PGD linf"][0]) == 7


def test_deterministic_bytes(tmp_path):
    records = curve("linf", EPS) + curve("l2", [0.0, 0.5]) + curve("linf", EPS, "ssl_reverse")
    draw(tmp_path, records, name="a.svg")
    draw(tmp_path, records, name="b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()


def test_does_not_import_matplotlib(tmp_path):
    # The point of the SVG: a Ray worker drawing this never pays for importing matplotlib.
    code = ("import sys; from orchestrator.trial_plot import trial_curve_svg; "
            f"trial_curve_svg([], {CONFIG!r}); "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_the_axis_starts_at_zero_when_the_grid_does_not(tmp_path):
    root = draw(tmp_path, [row("linf", 0.05, 0.6), row("linf", 0.1, 0.4), row("linf", 0.2, 0.1)])
    xs = [x for x, _ in series(root)["PGD linf"][0]]
    assert texts(root, "xticks")[0] == "0"
    assert xs[0] - axes(root)[0] > (xs[1] - xs[0])  # ε = 0.05 is a 0.05 step away from the left edge, plus margin
