"""The results table of a study: Parquet files, one per trial, of the schema in orchestrator/result_schema.py.

Layout::

    {storage}/results/{study}/{config_hash}.parquet                   the trial's own rows
    {storage}/results/{study}/{config_hash}.eval-{eval_hash}.parquet  a re-evaluation's rows

The study's folder is a plain name, not a hive partition (``study=NAME``): the ``study`` column is
stored in every file, so ``pandas.read_parquet(storage + "/results")``,
``pyarrow.dataset.dataset(..., partitioning="hive")`` and DuckDB's ``read_parquet('.../results/**/*.parquet',
hive_partitioning=true)`` read every study's rows with ``study`` a string. (A hive folder beside the
column made the readers infer the partition's type from the name, an integer for a study "2024",
and refuse to merge it with the string column.) Folders written by earlier versions
(``results/study=NAME/``) are still read by `load`, and `migrate` moves them to this layout.

A re-evaluation of a kept model (orchestrator.evaluate) writes a file of its own, its rows marked by
``eval_hash``, so the rows of every evaluation of a model sit side by side and none is replaced.

``study`` is stored in every file as well as in the folder name, so a file is self-describing;
`load` always returns the folder's study name.

Each trial's file is written atomically (hidden temporary name in the same directory, then a move
over the final name), so re-running a trial replaces its file instead of duplicating rows and an
interrupted write leaves only a hidden file that readers ignore. All I/O goes through
`pyarrow.fs`, so the same code writes local disk, NFS and object stores (s3://, gs://, file://).
"""
from __future__ import annotations

import re
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator import storage as storage_mod
from orchestrator.errors import first_line
from orchestrator.result_schema import (
    COLUMNS, CONFIG_COLUMNS, KEY_COLUMNS, PANDAS_DTYPES, REQUIRED_COLUMNS, SCHEMA, ResultsError, fmt_key,
    validate_rows,
)

OLD_PARTITION_KEY = "study"  # the hive folder `results/study=NAME/` of earlier versions (read, migrated)
PARQUET_COMPRESSION = "zstd"  # the study file and its copy logged to MLflow


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ResultsError(
            f"invalid {kind} {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    return name


def _is_uri(storage: str) -> bool:
    return "://" in storage


def results_dir(storage: str) -> str:
    """`{storage}/results`: every study's folder, and nothing else (readers take every file in it)."""
    return f"{str(storage).rstrip('/') or '/'}/results"


def study_dir(storage: str, study: str) -> str:
    """`{storage}/results/{study}`; storage is a local path or a pyarrow.fs URI."""
    _check_name("study name", study)
    return f"{results_dir(storage)}/{study}"


def old_study_dir(storage: str, study: str) -> str:
    """Where earlier versions wrote the study: `{storage}/results/study={study}`."""
    _check_name("study name", study)
    return f"{results_dir(storage)}/{OLD_PARTITION_KEY}={study}"


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """Turn a local path or URI into (filesystem, path inside it)."""
    location = str(location)
    if _is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with long messages
            raise ResultsError(f"cannot open storage {location!r}: {first_line(exc)}") from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(location)


def _visible_parquet(info: pafs.FileInfo) -> bool:
    name = info.base_name
    return (
        info.type == pafs.FileType.File
        and name.endswith(".parquet")
        and not name.startswith((".", "_"))
    )


def _list_dir(storage: str, study: str, directory: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    fs, path = _resolve(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except Exception as exc:
        raise ResultsError(f"cannot list results of study '{study}' in {storage}: {first_line(exc)}") from None
    return fs, sorted((i for i in infos if _visible_parquet(i)), key=lambda i: i.base_name)


def _list_files(storage: str, study: str) -> tuple[pafs.FileSystem, list[tuple[pafs.FileInfo, str]]]:
    """The study's result files as (info, the path shown in messages), in hash order: the current
    layout's, and an earlier layout's for the hashes the current one lacks."""
    fs, infos = _list_dir(storage, study, study_dir(storage, study))
    found = {i.base_name: (i, f"{study_dir(storage, study)}/{i.base_name}") for i in infos}
    _, old = _list_dir(storage, study, old_study_dir(storage, study))
    for i in old:
        found.setdefault(i.base_name, (i, f"{old_study_dir(storage, study)}/{i.base_name}"))
    return fs, [found[name] for name in sorted(found)]


# --------------------------------------------------------------------------------------------
# Write
# --------------------------------------------------------------------------------------------
def write_trial(storage: str, study: str, config_hash: str, rows: list[dict]) -> str:
    """Write one trial's rows to `{study_dir}/{config_hash}.parquet` atomically; return that path.

    Writing the same config_hash again replaces the file (retries never duplicate rows).
    """
    return write_encoded(storage, study, config_hash, encode_trial(study, config_hash, rows))


def encode_trial(study: str, config_hash: str, rows: list[dict], eval_hash: str | None = None) -> bytes:
    """One trial's rows, checked against SCHEMA (ResultsError if not), as its Parquet file's bytes:
    encoded once for the results file and for the copy a trial logs to MLflow. With `eval_hash`,
    the rows of that re-evaluation (each row's eval_hash must be it; without it, empty)."""
    _check_name("config hash", config_hash)
    for row in rows if isinstance(rows, (list, tuple)) else ():
        if isinstance(row, dict) and row.get("eval_hash") != eval_hash:
            raise ResultsError(f"trial {config_hash}: a row has eval_hash {row.get('eval_hash')!r}, "
                               f"expected {eval_hash!r}")
    sink = pa.BufferOutputStream()
    pq.write_table(validate_rows(rows, study=study, config_hash=config_hash), sink, compression=PARQUET_COMPRESSION)
    return sink.getvalue().to_pybytes()


def write_encoded(storage: str, study: str, config_hash: str, data: bytes, eval_hash: str | None = None) -> str:
    """Write `encode_trial`'s bytes as the trial's results file (with `eval_hash`: as the file of
    that re-evaluation), atomically; return its path."""
    name = file_name(config_hash, eval_hash)
    directory = study_dir(storage, study)
    final_uri = f"{directory}/{name}"
    fs, dir_path = _resolve(directory)
    try:
        storage_mod.write_atomic(fs, dir_path, name, data)
    except Exception as exc:
        raise ResultsError(f"cannot write results file {final_uri}: {first_line(exc)}") from None
    if eval_hash is None:  # the same trial's own file in the earlier layout is replaced by this one
        _, old_dir = _resolve(old_study_dir(storage, study))
        old = f"{old_dir}/{config_hash}.parquet"
        if fs.get_file_info(old).type == pafs.FileType.File:
            fs.delete_file(old)
    return final_uri


def file_name(config_hash: str, eval_hash: str | None = None) -> str:
    """`{config_hash}.parquet`, or `{config_hash}.eval-{eval_hash}.parquet` for a re-evaluation."""
    _check_name("config hash", config_hash)
    if eval_hash is None:
        return f"{config_hash}.parquet"
    _check_name("evaluation hash", eval_hash)
    return f"{config_hash}{EVAL_MARK}{eval_hash}.parquet"


EVAL_MARK = ".eval-"


def with_aliases(df: pd.DataFrame, aliases: dict[str, list[dict]] | None) -> pd.DataFrame:
    """`df` plus, for each config hash with aliases (other cells of the grid that are the same
    experiment, orchestrator.spec.Trial.aliases: config hash -> their resolved configs), a copy of
    that trial's rows under each alias's name: the config columns and config_json from the alias,
    every number and the config hash unchanged. For tables and figures by factor; never written."""
    import json

    if not aliases or df.empty:
        return df
    copies = []
    for chash, configs in aliases.items():
        rows = df[df["config_hash"] == chash]
        for config in configs if len(rows) else ():
            copy = rows.copy()
            for column in CONFIG_COLUMNS:
                copy[column] = config[column]
            copy["config_json"] = json.dumps(config, sort_keys=True)
            copies.append(copy)
    return pd.concat([df, *copies], ignore_index=True) if copies else df


def own_evaluation(df: pd.DataFrame) -> pd.DataFrame:
    """The rows each trial wrote right after training (no re-evaluation's rows)."""
    return df[df["eval_hash"].isna()] if len(df) and "eval_hash" in df.columns else df


def evaluation_rows(df: pd.DataFrame, eval_hash: str | None) -> pd.DataFrame:
    """The rows of one evaluation: a re-evaluation's `eval_hash`, or None for the trials' own."""
    if eval_hash is None:
        return own_evaluation(df)
    return df[df["eval_hash"] == eval_hash] if "eval_hash" in df.columns else df.iloc[:0]


def evaluation_exists(storage: str, study: str, config_hash: str, eval_hash: str) -> bool:
    fs, dir_path = _resolve(study_dir(storage, study))
    return fs.get_file_info(f"{dir_path}/{file_name(config_hash, eval_hash)}").type == pafs.FileType.File


def migrate(storage: str) -> list[str]:
    """Move every study folder of the earlier layout (`results/study=NAME/`) to `results/NAME/`;
    return the studies moved. Each file is rewritten with today's SCHEMA (columns added since it was
    written, empty), so a plain reader's schema taken from any file fits them all; written under a
    hidden name and moved, so a reader never sees half a file. A file the current layout already has
    is dropped from the old folder (the current one is newer); an unreadable one stays where it is
    (`load` names it); the old folder is removed once empty."""
    fs, root = _resolve(results_dir(storage))
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    except Exception as exc:
        raise ResultsError(f"cannot list {results_dir(storage)}: {first_line(exc)}") from None
    moved = []
    prefix = f"{OLD_PARTITION_KEY}="
    for info in infos:
        study = info.base_name[len(prefix):]
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(prefix) \
                or not _NAME_RE.match(study):
            continue
        _, files = _list_dir(storage, study, old_study_dir(storage, study))
        for f in files:
            config_hash = f.base_name[: -len(".parquet")]
            _, new_dir = _resolve(study_dir(storage, study))
            if fs.get_file_info(f"{new_dir}/{f.base_name}").type != pafs.FileType.File:
                try:
                    table = _read_file(fs, f.path, f.path, study)
                except ResultsError:
                    continue
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
                write_encoded(storage, study, config_hash, sink.getvalue().to_pybytes())
            else:
                fs.delete_file(f.path)
        if not fs.get_file_info(pafs.FileSelector(info.path, allow_not_found=True)):
            fs.delete_dir(info.path)
        moved.append(study)
    return moved


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------
def empty_frame() -> pd.DataFrame:
    """An empty results DataFrame with the schema's columns and dtypes."""
    return _to_pandas(SCHEMA.empty_table())


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    return df.astype(PANDAS_DTYPES)[list(COLUMNS)]


def _read_file(fs: pafs.FileSystem, path: str, shown: str, study: str) -> pa.Table:
    fix = "delete it and re-run the study (that cell will run again)"
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except Exception as exc:  # ArrowInvalid for a bad footer, OSError for corrupt pages or I/O
        raise ResultsError(
            f"results file {shown} is corrupt or unreadable ({first_line(exc)}); if it is corrupt, {fix}"
        ) from None
    missing = [n for n in COLUMNS if n not in table.column_names]
    required = [n for n in missing if n in REQUIRED_COLUMNS]
    if required:
        raise ResultsError(f"results file {shown} lacks column '{required[0]}' (old or foreign format): {fix}")
    for name in missing:  # a nullable column added after the file was written: empty
        column_type = SCHEMA.field(name).type
        table = table.append_column(pa.field(name, column_type), pa.nulls(table.num_rows, type=column_type))
    try:
        table = table.select(list(COLUMNS)).cast(SCHEMA)
    except Exception as exc:
        raise ResultsError(f"results file {shown} has wrong column types ({first_line(exc)}): {fix}") from None
    # The partition directory is authoritative for the study name.
    table = table.set_column(0, "study", pa.array([study] * table.num_rows, type=pa.string()))
    return table


def load(study: str, storage: str = "runs") -> pd.DataFrame:
    """Every result row of a study as a DataFrame (empty, with the schema's columns, if none)."""
    fs, infos = _list_files(storage, study)
    directory = study_dir(storage, study)

    def read(item: tuple[pafs.FileInfo, str]) -> pa.Table:
        return _read_file(fs, item[0].path, item[1], study)

    if len(infos) > 8:  # many small files on an object store: read a few at a time
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            tables = list(pool.map(read, infos))  # re-raises the first error, in file order
    else:
        tables = [read(i) for i in infos]
    if not tables:
        return empty_frame()
    df = _to_pandas(pa.concat_tables(tables))
    dup = df.duplicated(subset=list(KEY_COLUMNS), keep=False)  # NaN/None compare equal here
    if dup.any():
        first = df.loc[dup, list(KEY_COLUMNS)].iloc[0].to_dict()
        hashes = sorted(df.loc[dup, "config_hash"].unique())
        raise ResultsError(
            f"study '{study}' has duplicate results for {fmt_key(first)} (files: "
            f"{', '.join(h + '.parquet' for h in hashes[:3])}); delete the duplicates in {directory} and re-run"
        )
    return df.reset_index(drop=True)


def completed_hashes(storage: str, study: str) -> set[str]:
    """Config hashes that have a result file of their own training (lists file names only, reads
    nothing; re-evaluation files are not counted)."""
    _, infos = _list_files(storage, study)
    return {i.base_name[: -len(".parquet")] for i, _ in infos if EVAL_MARK not in i.base_name}


def trial_table(storage: str, study: str, config_hash: str) -> pd.DataFrame:
    """One trial's rows (empty DataFrame with the schema's columns if it has no result file)."""
    _check_name("config hash", config_hash)
    for directory in (study_dir(storage, study), old_study_dir(storage, study)):
        fs, dir_path = _resolve(directory)
        path = f"{dir_path}/{config_hash}.parquet"
        if fs.get_file_info(path).type == pafs.FileType.File:
            return _to_pandas(_read_file(fs, path, f"{directory}/{config_hash}.parquet", study))
    return empty_frame()


# --------------------------------------------------------------------------------------------
# The grid of the last invocation: what the report's "missing cells" compare against
# --------------------------------------------------------------------------------------------
def grid_path(storage: str, study: str) -> str:
    """`{storage}/grids/{study}.json`: beside `results/`, not in it, so that readers of the results
    folder see Parquet files only."""
    _check_name("study name", study)
    return f"{str(storage).rstrip('/') or '/'}/grids/{study}.json"


def write_grid(storage: str, study: str, scale: str, spec_text: str, cells: dict[str, dict] | None,
               aliases: dict[str, list[dict]] | None = None, replication: list[str] | None = None) -> str:
    """Record an invocation's grid (`cells`: config hash -> resolved config; None for a search;
    `aliases`: config hash -> the configs of other cells that are the same experiment;
    `replication`: adaptive replication's lines, seeds per cell and why) and its
    study file's text, atomically, so `python -m orchestrator.report` rebuilds the report of the
    study as it ended, missing cells included. Returns the path."""
    import json

    uri = grid_path(storage, study)
    fs, path = _resolve(uri)
    folder, name = path.rsplit("/", 1)
    data = json.dumps({"study": study, "scale": scale, "spec_text": spec_text, "cells": cells,
                       "aliases": aliases or {}, "replication": replication or []},
                      sort_keys=True, default=str).encode()
    try:
        storage_mod.write_atomic(fs, folder, name, data)
    except Exception as exc:
        raise ResultsError(f"cannot write {uri}: {first_line(exc)}") from None
    return uri


def read_grid(storage: str, study: str) -> dict | None:
    """The grid `write_grid` recorded for the study, or None (none recorded, or unreadable)."""
    import json

    fs, path = _resolve(grid_path(storage, study))
    try:
        with fs.open_input_stream(path) as stream:
            grid = json.loads(stream.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return grid if isinstance(grid, dict) else None
