"""The two tables with intervals over seeds and test examples (orchestrator.interval_tables): the
same numbers as the end-of-run text, so a reader of the report sees what the console showed."""
from __future__ import annotations

import pandas as pd

from ..interval_tables import interval_report_tables
from .section import Inputs, Section
from .statistics import varying


def _tables(inputs: Inputs) -> dict[str, Section]:
    def compute():
        tables = interval_report_tables(inputs.df, varying(inputs.data.adv, inputs.train_keys))
        return {name: Section(name, title, caption, table=table, shown=display(table))
                for name, title, caption, table, display in tables}
    return inputs.memo("example_intervals", compute)


def _section(inputs: Inputs, name: str) -> Section:
    return _tables(inputs).get(name) or Section(name, "", "", table=pd.DataFrame())


def accuracy_section(inputs: Inputs) -> Section:
    """Robust accuracy per cell × ε_test with its interval over seeds and test examples."""
    return _section(inputs, "accuracy_intervals")


def difference_section(inputs: Inputs) -> Section:
    """Robust accuracy minus λ = 0's per ε_test, paired over seeds and test examples."""
    return _section(inputs, "difference_intervals")
