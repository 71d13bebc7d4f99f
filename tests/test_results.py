"""orchestrator.results: real Parquet files in tmp_path, no mocks."""
from __future__ import annotations

import datetime as dt
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import results
from orchestrator.errors import UserError
from orchestrator.results import KEY_COLUMNS, SCHEMA, ResultsError

from tests.rows import result_row

FINISHED = dt.datetime(2026, 11, 21, 12, 30, 15, 123456, tzinfo=dt.timezone.utc)


def _config(seed=0, ssl_weight=0.5):
    return {
        "dataset": "fashion_mnist", "arch": "small_cnn", "ssl_task": "rotation", "ssl_weight": ssl_weight,
        "attack_variant": "joint", "init": "scratch", "norm_train": "linf", "eps_train": 0.1,
        "train_attack_steps": 3, "rotations": "one", "seed": seed,
    }


def trial_rows(config_hash="h0", seed=0, eps=(0.0, 0.05, 0.1), corruptions=(("contrast", 1), ("contrast", 3)),
               study="s1", **over):
    """One trial's rows (tests/rows.py): a PGD curve over `eps` and the corruptions; `over` sets
    columns of every row (robust_acc excepted: each row has its own)."""
    over.pop("robust_acc", None)
    common = dict(study=study, trial_id=f"trial_{config_hash}", config_hash=config_hash, n_examples=1000,
                  clean_acc=0.75, node_id="node-a", mlflow_run_id="run123", finished_at=FINISHED)
    config = _config(seed)

    def row(**columns):
        return result_row(config, **{**common, **columns, **over})

    rows = [row(eps_test=e, step_size=2.5 * e / 10, robust_acc=0.7 - e) for e in eps]
    rows += [row(corruption=c, severity=s, robust_acc=0.6 - 0.05 * s, attack_steps=None, step_size=None, restarts=None)
             for c, s in corruptions]  # null attack settings: the schema allows null or 0
    return rows


def test_schema_is_single_source():
    assert results.COLUMNS == tuple(SCHEMA.names)
    assert set(results.PANDAS_DTYPES) == set(SCHEMA.names)
    assert set(KEY_COLUMNS) <= set(SCHEMA.names)
    assert SCHEMA.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert "study" in SCHEMA.names


def test_study_dir_local_and_uri(tmp_path):
    assert results.study_dir(str(tmp_path), "abc") == f"{tmp_path}/results/abc"
    assert results.study_dir("s3://bucket/prefix/", "abc") == "s3://bucket/prefix/results/abc"
    with pytest.raises(ResultsError, match="invalid study name"):
        results.study_dir(str(tmp_path), "../etc")


def test_round_trip_preserves_values_and_types(tmp_path):
    rows = trial_rows()
    path = results.write_trial(str(tmp_path), "s1", "h0", rows)
    assert path == f"{tmp_path}/results/s1/h0.parquet"
    assert os.path.isfile(path)
    df = results.load("s1", str(tmp_path))
    assert list(df.columns) == list(SCHEMA.names)
    assert len(df) == len(rows) == 5
    for name, dtype in results.PANDAS_DTYPES.items():
        assert df[name].dtype == pd.Series([], dtype=dtype).dtype, name
    adv = df[df["corruption"].isna()].sort_values("eps_test")
    assert adv["eps_test"].tolist() == [0.0, 0.05, 0.1]
    assert adv["robust_acc"].tolist() == pytest.approx([0.7, 0.65, 0.6])
    assert adv["attack_steps"].tolist() == [10, 10, 10]
    cor = df[df["corruption"].notna()].sort_values("severity")
    assert cor["severity"].tolist() == [1, 3]
    assert cor["norm"].isna().all() and cor["eps_test"].isna().all() and cor["attack_steps"].isna().all()
    assert (cor["attack"] == "none").all()
    assert (df["study"] == "s1").all()
    assert df["seed"].tolist() == [0] * 5
    assert df["git_sha"].isna().all()
    assert (df["mlflow_run_id"] == "run123").all()
    assert (df["finished_at"] == pd.Timestamp(FINISHED)).all()
    assert json.loads(df["config_json"].iloc[0])["ssl_weight"] == 0.5
    # the study is also readable as a hive-partitioned dataset
    import pyarrow.dataset as ds

    t = ds.dataset(f"{tmp_path}/results", format="parquet", partitioning="hive").to_table()
    assert set(t.column("study").to_pylist()) == {"s1"}


def test_file_uri_storage(tmp_path):
    uri = f"file://{tmp_path}"
    path = results.write_trial(uri, "s1", "h0", trial_rows())
    assert path.startswith("file://")
    assert len(results.load("s1", uri)) == 5
    assert results.completed_hashes(uri, "s1") == {"h0"}


def test_rewrite_replaces_without_duplicates(tmp_path):
    results.write_trial(str(tmp_path), "s1", "h0", trial_rows(clean_acc=0.1))
    results.write_trial(str(tmp_path), "s1", "h0", trial_rows(clean_acc=0.9))
    df = results.load("s1", str(tmp_path))
    assert len(df) == 5
    assert (df["clean_acc"] == 0.9).all()
    files = os.listdir(f"{tmp_path}/results/s1")
    assert files == ["h0.parquet"]  # no temporary left behind


def test_interrupted_write_is_invisible(tmp_path):
    results.write_trial(str(tmp_path), "s1", "h0", trial_rows())
    d = f"{tmp_path}/results/s1"
    # a write of trial h1 interrupted half-way: truncated bytes under a hidden temporary name
    table = results.validate_rows(trial_rows("h1"), "s1", "h1")
    pq.write_table(table, f"{d}/.h1.full.tmp")
    data = open(f"{d}/.h1.full.tmp", "rb").read()
    os.remove(f"{d}/.h1.full.tmp")
    with open(f"{d}/.h1.0123abcd.tmp", "wb") as f:
        f.write(data[: len(data) // 2])
    df = results.load("s1", str(tmp_path))
    assert set(df["config_hash"]) == {"h0"}
    assert results.completed_hashes(str(tmp_path), "s1") == {"h0"}


def test_corrupt_visible_file_names_the_file(tmp_path):
    results.write_trial(str(tmp_path), "s1", "h0", trial_rows())
    bad = f"{tmp_path}/results/s1/badhash.parquet"
    with open(bad, "wb") as f:
        f.write(b"PAR1 this is not parquet")
    with pytest.raises(ResultsError) as err:
        results.load("s1", str(tmp_path))
    msg = str(err.value)
    assert "badhash.parquet" in msg and "delete it and re-run" in msg
    assert "\n" not in msg
    assert isinstance(err.value, UserError)


def test_duplicate_keys_raise(tmp_path):
    results.write_trial(str(tmp_path), "s1", "h0", trial_rows())
    d = f"{tmp_path}/results/s1"
    # the same trial's rows under a second file name (e.g. copied by hand)
    pq.write_table(pq.read_table(f"{d}/h0.parquet"), f"{d}/h0copy.parquet")
    with pytest.raises(ResultsError, match="duplicate"):
        results.load("s1", str(tmp_path))
    # duplicates inside one trial are refused at write time (null keys count as equal)
    rows = trial_rows("h2", eps=(), corruptions=(("contrast", 1), ("contrast", 1)), study="s2")
    with pytest.raises(ResultsError, match="duplicate"):
        results.write_trial(str(tmp_path), "s2", "h2", rows)


def test_validation_errors_name_the_column(tmp_path):
    rows = trial_rows()
    del rows[0]["robust_acc"]
    with pytest.raises(ResultsError, match="'robust_acc'"):
        results.write_trial(str(tmp_path), "s1", "h0", rows)
    with pytest.raises(ResultsError, match="'seed'.*integer"):
        results.write_trial(str(tmp_path), "s1", "h0", trial_rows(seed="0"))
    with pytest.raises(ResultsError, match="'eps_train'.*number"):
        results.write_trial(str(tmp_path), "s1", "h0", trial_rows(eps_train="0.1"))
    with pytest.raises(ResultsError, match="'finished_at'.*timezone"):
        results.write_trial(str(tmp_path), "s1", "h0", trial_rows(finished_at=dt.datetime(2026, 1, 1)))
    with pytest.raises(ResultsError, match="unknown column 'robust_accc'"):
        results.write_trial(str(tmp_path), "s1", "h0", [dict(trial_rows()[0], robust_accc=0.1)])
    with pytest.raises(ResultsError, match="config_hash"):
        results.write_trial(str(tmp_path), "s1", "other", trial_rows())
    with pytest.raises(ResultsError, match="at least one"):
        results.write_trial(str(tmp_path), "s1", "h0", [])
    assert not os.path.exists(f"{tmp_path}/results/s1")  # nothing written on failure


def test_completed_hashes_and_empty_study(tmp_path):
    assert results.completed_hashes(str(tmp_path), "s1") == set()
    empty = results.load("s1", str(tmp_path))
    assert empty.empty and list(empty.columns) == list(SCHEMA.names)
    for h in ("aa", "bb", "cc"):
        results.write_trial(str(tmp_path), "s1", h, trial_rows(h))
    results.write_trial(str(tmp_path), "s2", "dd", trial_rows("dd", study="s2"))
    assert results.completed_hashes(str(tmp_path), "s1") == {"aa", "bb", "cc"}
    assert results.completed_hashes(str(tmp_path), "s2") == {"dd"}
    assert len(results.load("s1", str(tmp_path))) == 15
    assert len(results.trial_table(str(tmp_path), "s1", "bb")) == 5
    assert results.trial_table(str(tmp_path), "s1", "zz").empty


def test_reevaluation_rows_sit_beside_the_trials_own(tmp_path):
    """A re-evaluation's file (orchestrator.evaluate) has the same keys but its eval_hash: both load,
    the trial counts as done once, and each evaluation is selected on its own."""
    storage = str(tmp_path)
    results.write_trial(storage, "s1", "h0", trial_rows())
    own_bytes = (tmp_path / "results" / "s1" / "h0.parquet").read_bytes()
    again = trial_rows(eval_hash="e1", robust_acc=0.1)
    path = results.write_encoded(storage, "s1", "h0", results.encode_trial("s1", "h0", again, eval_hash="e1"),
                                 eval_hash="e1")
    assert path.endswith("/h0.eval-e1.parquet")
    assert (tmp_path / "results" / "s1" / "h0.parquet").read_bytes() == own_bytes
    table = results.load("s1", storage)  # the duplicate-key check passes: eval_hash tells them apart
    assert len(table) == 10 and not table.duplicated(list(KEY_COLUMNS)).any()
    assert len(results.own_evaluation(table)) == 5 and results.own_evaluation(table)["eval_hash"].isna().all()
    assert (results.evaluation_rows(table, "e1")["eval_hash"] == "e1").sum() == 5
    assert results.completed_hashes(storage, "s1") == {"h0"}
    assert len(results.trial_table(storage, "s1", "h0")) == 5
    assert results.evaluation_exists(storage, "s1", "h0", "e1") and not results.evaluation_exists(storage, "s1", "h0", "e2")
    with pytest.raises(ResultsError, match="eval_hash"):  # a file's rows all belong to its evaluation
        results.encode_trial("s1", "h0", again, eval_hash="e2")
    with pytest.raises(ResultsError, match="eval_hash"):
        results.encode_trial("s1", "h0", again)


# ---- every reader opens the results folder (studies named like numbers too) -----------------------
READER_STUDIES = {"2024": ("aa", "bb"), "s1": ("cc",)}


def _two_studies(storage) -> None:
    for study, hashes in READER_STUDIES.items():
        for h in hashes:
            results.write_trial(str(storage), study, h, trial_rows(h, study=study))


def _check_reader_table(df: pd.DataFrame) -> None:
    """Every study's rows, `study` as text (never the number a folder name looks like)."""
    assert len(df) == 5 * 3 and set(df.columns) == set(SCHEMA.names)
    assert sorted(df.groupby("study")["config_hash"].nunique().items()) == [("2024", 2), ("s1", 1)]
    assert all(isinstance(v, str) for v in df["study"])
    assert pd.api.types.is_float_dtype(df["robust_acc"]) and pd.api.types.is_float_dtype(df["eps_test"])
    assert pd.api.types.is_integer_dtype(df["seed"]) and pd.api.types.is_integer_dtype(df["n_examples"])
    assert pd.api.types.is_datetime64_any_dtype(df["finished_at"])
    assert set(df["config_hash"]) == {"aa", "bb", "cc"}


def test_pandas_reads_the_results_folder(tmp_path):
    _two_studies(tmp_path)
    _check_reader_table(pd.read_parquet(f"{tmp_path}/results"))


def test_pyarrow_hive_dataset_reads_the_results_folder(tmp_path):
    import pyarrow.dataset as ds

    _two_studies(tmp_path)
    table = ds.dataset(f"{tmp_path}/results", format="parquet", partitioning="hive").to_table()
    assert table.schema.field("study").type == pa.string()
    assert table.schema.field("finished_at").type == SCHEMA.field("finished_at").type
    _check_reader_table(table.to_pandas())


def test_duckdb_reads_the_results_folder(tmp_path):
    import duckdb  # a test extra (pyproject.toml)

    _two_studies(tmp_path)
    source = f"read_parquet('{tmp_path}/results/**/*.parquet', hive_partitioning=true)"
    con = duckdb.connect()
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {source})").fetchall())
    assert set(types) == set(SCHEMA.names)
    assert types["study"] == "VARCHAR" and types["robust_acc"] == "DOUBLE" and types["seed"] == "BIGINT"
    assert types["finished_at"] == "TIMESTAMP WITH TIME ZONE"
    counts = con.execute(f"SELECT study, count(DISTINCT config_hash), count(*) FROM {source} "
                         f"GROUP BY study ORDER BY study").fetchall()
    assert counts == [("2024", 2, 10), ("s1", 1, 5)]


def test_the_earlier_hive_layout_still_loads_and_migrates(tmp_path):
    """`results/study=NAME/HASH.parquet` (written by earlier versions): `load` reads it, a new write of
    the same trial replaces it, and `migrate` moves the rest to `results/NAME/`, after which the
    plain readers open the folder."""
    old = tmp_path / "results" / "study=2024"
    old.mkdir(parents=True)
    for h in ("aa", "bb"):
        table = results.validate_rows(trial_rows(h, study="2024"), "2024", h)
        if h == "aa":  # written before these nullable columns existed
            table = table.drop_columns(["label_noise", "defence"])
        pq.write_table(table, old / f"{h}.parquet")
    with pytest.raises(pa.ArrowTypeError, match="study"):  # what the earlier layout does to a plain reader
        pd.read_parquet(f"{tmp_path}/results")
    results.write_trial(str(tmp_path), "s1", "cc", trial_rows("cc", study="s1"))
    assert results.completed_hashes(str(tmp_path), "2024") == {"aa", "bb"}
    df = results.load("2024", str(tmp_path))
    assert len(df) == 10 and (df["study"] == "2024").all()
    assert len(results.trial_table(str(tmp_path), "2024", "bb")) == 5
    results.write_trial(str(tmp_path), "2024", "bb", trial_rows("bb", study="2024", clean_acc=0.5))
    assert not (old / "bb.parquet").exists()  # the new file replaces the old one: no duplicate rows
    assert sorted(results.load("2024", str(tmp_path))["clean_acc"].unique()) == [0.5, 0.75]
    assert results.migrate(str(tmp_path)) == ["2024"]
    assert not old.exists()
    assert sorted(p.name for p in (tmp_path / "results" / "2024").iterdir()) == ["aa.parquet", "bb.parquet"]
    _check_reader_table(pd.read_parquet(f"{tmp_path}/results"))
    assert results.migrate(str(tmp_path)) == []


def test_evaluation_columns_are_the_record_fields_and_every_kind_validates():
    from orchestrator.result_schema import EVAL_COLUMN_TYPES, row_kinds
    from trainables.records import EVAL_COLUMNS, KINDS

    assert tuple(EVAL_COLUMN_TYPES) == EVAL_COLUMNS
    assert [c for c in results.COLUMNS if c in EVAL_COLUMNS] == list(EVAL_COLUMNS)
    rows = [result_row(eps_test=0.0, attack="none", robust_acc=0.8), result_row(corruption="fog", severity=2),
            result_row(ood_set="blobs"), result_row(measure="certified_acc", radius=0.5),
            result_row(defence="ssl_reverse", attack="pgd_adaptive")]
    table = results.validate_rows(rows, "s", "h0")
    assert list(row_kinds(table.to_pandas())) == list(KINDS)
