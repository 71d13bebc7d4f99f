"""Back up the head's MLflow SQLite store to the study's bucket, and restore it on a new head.

    python scripts/mlflow_store.py backup  DB DEST     # consistent copy of DB, then upload to DEST
    python scripts/mlflow_store.py restore DB SOURCE   # only if DB does not exist yet

DEST / SOURCE: an s3://bucket/key URI (credentials from the instance profile) or a local path.

A copy of a live SQLite file (cp, rsync, `aws s3 cp`) can catch it mid-write and be unreadable.
The backup uses SQLite's online backup API (the same as `sqlite3 DB ".backup FILE"`): a snapshot
of one consistent state, taken while the MLflow server keeps writing. It is checked with
`PRAGMA integrity_check`, uploaded under a temporary name and then moved over DEST, so DEST always
holds a complete backup. cluster.yaml runs `backup` every 10 minutes from cron on the head and
`restore` before it starts the MLflow server: a head launched anew (a changed node_config, a
terminated instance) starts from the last backup instead of an empty store.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _check(path: Path) -> None:
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as conn:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()
    if verdict != "ok":
        raise RuntimeError(f"{path}: integrity check failed: {verdict}")


def backup(db: Path, dest: str) -> None:
    if not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}")
    fs, dest_path = _filesystem(dest)
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "mlflow.db"
        source = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        target = sqlite3.connect(snapshot)
        try:
            source.backup(target)  # restarts by itself if the server writes meanwhile
        finally:
            target.close()
            source.close()
        _check(snapshot)
        parent = dest_path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        partial = f"{parent}/.{dest_path.rsplit('/', 1)[1]}.partial-{time.time_ns()}"
        pafs.copy_files(str(snapshot), partial, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        fs.move(partial, dest_path)
    print(f"backed up {db} to {dest}")


def restore(db: Path, source: str) -> None:
    if db.exists():
        print(f"{db} exists; not restoring over it")
        return
    fs, source_path = _filesystem(source)
    if fs.get_file_info(source_path).type == pafs.FileType.NotFound:
        print(f"no backup at {source}; MLflow starts with an empty store")
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=db.parent, prefix=f".{db.name}.", suffix=".partial")
    os.close(fd)
    try:
        pafs.copy_files(source_path, partial, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        _check(Path(partial))
        os.replace(partial, db)
    finally:
        Path(partial).unlink(missing_ok=True)
    print(f"restored {db} from {source}")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("backup", "restore"):
        print(__doc__.strip().split("\n\n")[0], file=sys.stderr)
        return 2
    action, db, uri = argv
    try:
        (backup if action == "backup" else restore)(Path(db).expanduser(), uri)
    except (OSError, RuntimeError, sqlite3.Error) as err:
        print(f"error: MLflow store {action} ({db}, {uri}) failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
