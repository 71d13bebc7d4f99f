"""The per-trial figure logged with its MLflow run: accuracy against ε_test, ε_train marked.
Drawn in the driver (the tracking callback), never in a trial."""
from __future__ import annotations

from trainables.records import DEFENDED, ROBUSTNESS, row_kind


def curves(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """label -> [(ε, accuracy)] sorted by ε: one per norm, and one per norm × defence × attack."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        kind = row_kind(r)
        if kind == ROBUSTNESS and r.get("norm") is not None and r.get("robust_acc") is not None:
            label = str(r["norm"])
        elif kind == DEFENDED:
            label = f"{r['norm']} {r['defence']} {r['attack']}"
        else:
            continue
        out.setdefault(label, []).append((float(r["eps_test"]), float(r["robust_acc"])))
    return {k: sorted(v) for k, v in out.items()}


def trial_curve_png(records: list[dict], config: dict, title: str) -> bytes:
    """The figure as PNG bytes (matplotlib, no display needed)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in curves(records).items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if config.get("eps_train") is not None:
        ax.axvline(float(config["eps_train"]), linestyle="--", color="grey", label="ε_train")
    ax.set_xlabel("ε_test")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
