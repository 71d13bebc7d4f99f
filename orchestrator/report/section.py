"""What an analysis of the report gives (`Section`: a figure or a table with its name, title and
caption) and what it gets (`Inputs`: the study's results, seed-level and aggregated once)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from .statistics import StudyData

if TYPE_CHECKING:  # matplotlib is imported by the analyses that draw, not by this module
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Section:
    """One figure or one table of the report, written as `<name>.png/.svg` or `<name>.csv/.md` and
    shown in report.html under `title` with `caption`.

    A figure section with `figure` None and a table section with an empty `table` are left out,
    except that a table with an `empty_reason` is listed as "Not available: <empty_reason>".
    `shown` is the table as the Markdown and HTML display it (e.g. 'mean ± CI' cells); the CSV
    always holds `table`."""

    name: str
    title: str
    caption: str
    figure: Figure | None = None
    table: pd.DataFrame | None = None
    shown: pd.DataFrame | None = None
    empty_reason: str | None = None


@dataclass
class Inputs:
    """The study's rows (`df`), their seed-level tables (`data`) and the aggregates over seeds
    (mean, 95% t-interval, n_seeds) every analysis starts from; `attack_text` names the attack
    behind the robust accuracies, for the robustness captions."""

    study: str
    df: pd.DataFrame
    data: StudyData
    agg_adv: pd.DataFrame  # train keys + norm + eps_test
    agg_cor: pd.DataFrame  # train keys + corruption + severity
    clean_agg: pd.DataFrame  # train keys, value clean_acc
    agg_ood: pd.DataFrame  # train keys + ood_set + score + measure, value `value`
    agg_lf: pd.DataFrame  # train keys + measure + radius, value `value`
    attack_text: str
    _memo: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    @property
    def train_keys(self) -> list[str]:
        return self.data.train_keys

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()` once per report (a table that a figure and a table section both need)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]
