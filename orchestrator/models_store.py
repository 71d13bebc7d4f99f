"""Kept models: each trial's final weights in the study's storage, loadable again without Ray or MLflow.

Layout (beside `results/`; a local path or a `pyarrow.fs` URI such as s3://bucket/prefix)::

    {storage}/models/{study}/{config_hash}.pt     the model's state dict (tensors only)
    {storage}/models/{study}/{config_hash}.json   config hash, resolved config, SHA-256 of the .pt

The weights are a plain ``{name: tensor}`` dict written with `torch.save` and read back with
``torch.load(weights_only=True)``, which refuses pickles that would run code (safetensors is not a
dependency here). Each file is written atomically (hidden temporary name, then a move over the
final name) and the JSON last, so a model is kept once its JSON exists and a half-written one is
never loaded; the checksum in the JSON catches a .pt replaced or truncated afterwards.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
from typing import Any

import pyarrow.fs as pafs

from . import storage as storage_mod
from .errors import UserError

WEIGHTS_SUFFIX = ".pt"
META_SUFFIX = ".json"
FORMAT = "torch_state_dict"
_HASH_RE = re.compile(r"^[0-9a-f]{16}$")


class ModelStoreError(UserError):
    """A kept model is missing, ambiguous or unreadable; the message says which and how to fix it."""


def models_dir(storage: str, study: str) -> str:
    """`{storage}/models/{study}`."""
    return storage_mod.join(str(storage), "models", study)


def encode_weights(state_dict: dict) -> bytes:
    """A model's state dict as the bytes of a kept .pt file (CPU tensors, nothing else)."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


def file_names(config_hash: str) -> tuple[str, str]:
    """The kept model's two files: weights, then its JSON."""
    return config_hash + WEIGHTS_SUFFIX, config_hash + META_SUFFIX


def save_model(storage: str, study: str, config_hash: str, config: dict, weights: bytes,
               selected_epoch: int | None = None) -> dict[str, bytes]:
    """Keep a trained model: `weights` (from `encode_weights`, the training epoch
    `selected_epoch`'s) and its JSON, each written atomically, the JSON last. Rewriting the same
    config hash replaces both. Returns the files
    written, name -> content (the trial logs the same bytes to its MLflow run).
    Raises ModelStoreError (one line) if storage cannot be written."""
    directory = models_dir(storage, study)
    meta = {
        "study": study, "config_hash": config_hash, "format": FORMAT, "weights": config_hash + WEIGHTS_SUFFIX,
        "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights),
        "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(), "config": config,
        "selected_epoch": selected_epoch,
    }
    files = {config_hash + WEIGHTS_SUFFIX: weights,
             config_hash + META_SUFFIX: json.dumps(meta, sort_keys=True, indent=1).encode()}
    fs, path = storage_mod.filesystem_and_path(directory)
    for name, data in files.items():  # the JSON last: it marks the model as kept
        _write_atomic(fs, path, name, data, f"{directory}/{name}")
    return files


def _write_atomic(fs: pafs.FileSystem, dir_path: str, name: str, data: bytes, shown: str) -> None:
    try:
        storage_mod.write_atomic(fs, dir_path, name, data)
    except Exception as exc:
        raise ModelStoreError(f"cannot write kept model {shown}: {_one_line(exc)}") from None


def kept_hashes(storage: str, study: str) -> list[str]:
    """Config hashes of the study's kept models (those whose JSON exists), sorted."""
    fs, path = storage_mod.filesystem_and_path(models_dir(storage, study))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except Exception as exc:
        raise ModelStoreError(f"cannot list kept models of study '{study}' in {storage}: {_one_line(exc)}") from None
    names = (i.base_name for i in infos if i.type == pafs.FileType.File)
    return sorted(n[: -len(META_SUFFIX)] for n in names if n.endswith(META_SUFFIX) and _HASH_RE.match(n[:-5]))


def read_meta(storage: str, study: str, config_hash: str) -> dict:
    """The JSON beside a kept model (its config under "config")."""
    shown = f"{models_dir(storage, study)}/{config_hash}{META_SUFFIX}"
    try:
        meta = json.loads(_read(storage, study, config_hash + META_SUFFIX))
        if not isinstance(meta.get("config"), dict):
            raise ValueError("no 'config' in it")
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"kept model {shown} is unreadable ({_one_line(exc)}); delete it and re-run the "
                              f"study to train that cell again") from None
    return meta


def _read(storage: str, study: str, name: str) -> bytes:
    fs, path = storage_mod.filesystem_and_path(models_dir(storage, study))
    with fs.open_input_stream(f"{path}/{name}") as stream:
        return stream.read()


def resolve_hash(study: str, cell_or_hash: str | dict, storage: str) -> str:
    """The one kept config hash that `cell_or_hash` names: a hash or a prefix of one, or a dict of
    setting values (e.g. {"ssl_weight": 0.5, "seed": 0}) that exactly one kept model's config has.
    ModelStoreError (one line) if none or several match."""
    kept = kept_hashes(storage, study)
    where = models_dir(storage, study)
    if not kept:
        raise ModelStoreError(f"study '{study}' has no kept models in {where}; run the study first "
                              f"(python -m orchestrator.study {study})")
    if isinstance(cell_or_hash, str):
        prefix = cell_or_hash.strip().lower()
        matches = [h for h in kept if prefix and h.startswith(prefix)]
        what = f"config hash '{cell_or_hash}'"
    elif isinstance(cell_or_hash, dict):
        from trainables.config import SCHEMA

        unknown = [k for k in cell_or_hash if k not in SCHEMA]
        if unknown:
            raise ModelStoreError(f"cell setting '{unknown[0]}' is not a setting (see trainables/config.py)")
        configs = {h: read_meta(storage, study, h)["config"] for h in kept}
        matches = [h for h, c in configs.items() if all(c.get(k) == v for k, v in cell_or_hash.items())]
        what = "cell " + ", ".join(f"{k}={v}" for k, v in cell_or_hash.items())
    else:
        raise ModelStoreError(f"name a kept model by a config hash (prefix) or a dict of settings, got {cell_or_hash!r}")
    if not matches:
        listing = ", ".join(h[:8] for h in kept[:6]) + (", …" if len(kept) > 6 else "")
        raise ModelStoreError(f"study '{study}' has no kept model for {what} in {where}; kept: {listing}")
    if len(matches) > 1:
        raise ModelStoreError(f"{what} matches {len(matches)} kept models of study '{study}' "
                              f"({', '.join(h[:8] for h in matches[:6])}); give more hash characters or settings")
    return matches[0]


def load_model(study: str, cell_or_config_hash: str | dict, storage: str = "runs", device: str = "cpu"):
    """A kept model of `study`, rebuilt from its config and loaded with its trained weights.

    `cell_or_config_hash`: a config hash or an unambiguous prefix of one, or a dict of setting values
    that exactly one kept model has (e.g. {"ssl_weight": 0.5, "seed": 0}). Returns
    ``(model, config)``: the `trainables.models.Classifier` (SSL heads included) in eval mode on
    `device`, and its resolved config (a dict, as the trial ran it). Raises ModelStoreError (a
    UserError, one line) for an unknown or ambiguous name, a missing, altered or unreadable file.
    """
    import torch

    storage = storage_mod.normalize(storage)
    config_hash = resolve_hash(study, cell_or_config_hash, storage)
    meta = read_meta(storage, study, config_hash)
    shown = f"{models_dir(storage, study)}/{config_hash}{WEIGHTS_SUFFIX}"
    fix = "delete it and its .json and re-run the study to train that cell again"
    try:
        data = _read(storage, study, config_hash + WEIGHTS_SUFFIX)
    except OSError as exc:
        raise ModelStoreError(f"kept model {shown} is missing or unreadable ({_one_line(exc)}); {fix}") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ModelStoreError(f"kept model {shown} does not match the checksum in its .json (altered or "
                              f"truncated); {fix}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refusals and corrupt data alike
        raise ModelStoreError(f"kept model {shown} cannot be loaded safely ({_one_line(exc)}); {fix}") from None
    return build_trained_model(meta["config"], state, device), meta["config"]


def build_trained_model(config: dict, state: dict, device: str = "cpu"):
    """The model a trial of `config` trains (backbone, classifier, SSL heads) with `state` loaded
    (strict: every tensor must match), in eval mode on `device`."""
    from trainables.config import resolve
    from trainables.data import dataset_info
    from trainables.device import prepare_model, select_device
    from trainables.models import build_model
    from trainables.ssl import attach_head, task_from_config

    cfg = resolve(config)
    model = build_model(cfg["arch"], dataset_info(cfg["dataset"]), depth=cfg["depth"], width=cfg["width"])
    task, _ = task_from_config(cfg)
    attach_head(model, task)
    model.load_state_dict(state)
    return prepare_model(model, select_device(device)).eval()


def _one_line(exc: Any) -> str:
    text = " ".join(str(exc).split())
    text = text or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
