"""Study storage: a local path or a URI (s3://, gs://, file://) reached through `pyarrow.fs`.

Layout under the storage root: `results/NAME/` (Parquet), `grids/NAME.json` (the last invocation's
grid), `models/NAME/` (each trial's evaluated weights, orchestrator.models_store), `pretrained/`
(SSL backbones), `tune/` (Ray Tune experiments and checkpoints), `reports/NAME/`.
"""
from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


def normalize(location: str) -> str:
    """URIs stay as they are; local paths become absolute, so every Ray worker sees the same place."""
    return location.rstrip("/") if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def filesystem_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def write_atomic(fs: pafs.FileSystem, dir_path: str, name: str, data: bytes) -> None:
    """Write `data` as `dir_path/name` (creating the folder) under a hidden temporary name, then
    move it over the final name: a reader sees the old file or the whole new one, never a part,
    and an interrupted write leaves only a hidden file. Raises what `fs` raises; the temporary
    file is removed first."""
    tmp = f"{dir_path}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        fs.create_dir(dir_path, recursive=True)
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, f"{dir_path}/{name}")
    except Exception:
        try:
            fs.delete_file(tmp)
        except Exception:
            pass
        raise
