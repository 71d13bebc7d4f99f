"""Study storage: a local path or a URI (s3://, gs://, file://) reached through `pyarrow.fs`.

Layout under the storage root: `results/NAME/` (Parquet), `grids/NAME.json` (the last invocation's
grid), `models/NAME/` (each trial's evaluated weights, orchestrator.models_store), `pretrained/`
(SSL backbones), `tune/` (Ray Tune experiments and checkpoints), `reports/NAME/`.
"""
from __future__ import annotations

import os

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
