"""The per-trial figure logged to MLflow: robust accuracy against ε_test, ε_train marked."""
from __future__ import annotations

from matplotlib.figure import Figure


def plot_trial_curve(records: list[dict], config: dict, path: str) -> str:
    # A bare Figure (no pyplot state to clean up in a reused worker) with fixed margins: the layout
    # engine would cost more than the rest of the figure, once per trial.
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for norm in config["eval_norms"]:
        points = sorted((r["eps_test"], r["robust_acc"]) for r in records
                        if r["corruption"] is None and r["norm"] == norm and not r.get("defence"))
        if points:
            ax.plot(*zip(*points), marker="o", label=f"PGD {norm}")
        for attack, style in (("pgd", "-"), ("pgd_adaptive", "--")):  # behind a test-time defence
            defended = sorted((r["eps_test"], r["robust_acc"]) for r in records
                              if r.get("defence") and r["norm"] == norm and r["attack"] in (attack, "none"))
            if len(defended) > 1:
                name = next(r["defence"] for r in records if r.get("defence"))
                ax.plot(*zip(*defended), linestyle=style, marker="x", label=f"{name}, {attack} {norm}")
    ax.axvline(config["eps_train"], color="grey", linestyle="--", label=f"ε_train = {config['eps_train']:g}")
    ax.set_xlabel("ε_test")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"λ = {config['ssl_weight']:g}, {config['attack_variant']}, {config['init']}, seed {config['seed']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.91)
    fig.savefig(path, dpi=100)
    return path
