"""The SSL pre-training store (orchestrator.pretrain) without Ray: which pre-trainings a set of
cells needs, and one trainer per pre-training across processes (the lease beside the file)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator import pretrain
from orchestrator.spec import config_hash
from orchestrator.storage import filesystem_and_path, write_atomic
from trainables.config import resolve

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=64, test_subset=32, epochs=1, batch_size=32,
            ssl_task="rotation", rotations="one", pretrain_epochs=1)


def _config(**changes):
    return resolve({**TINY, "init": "ssl_pretrained", **changes})


def test_needed_lists_each_missing_pretraining_once_with_the_cells_that_need_it(tmp_path):
    storage = str(tmp_path / "runs")
    a, b = _config(ssl_weight=0.5), _config(ssl_weight=1.0)  # fine-tuning settings: one pre-training
    other = _config(pretrain_lr=0.1)
    scratch = resolve({**TINY, "init": "scratch"})
    configs = [(config_hash(c), c) for c in (a, b, other, scratch)]
    missing = pretrain.needed(storage, configs)
    assert sorted(len(p.cells) for p in missing) == [1, 2]
    [shared] = [p for p in missing if len(p.cells) == 2]
    assert shared.cells == [config_hash(a), config_hash(b)] and shared.path == pretrain.pretrained_path(storage, a)
    fs, path = filesystem_and_path(shared.path)
    write_atomic(fs, path.rsplit("/", 1)[0], path.rsplit("/", 1)[1], b"stored")
    assert [p.path for p in pretrain.needed(storage, configs)] == [pretrain.pretrained_path(storage, other)]
    assert pretrain.depends_on(a, ["pretrain_lr"]) and not pretrain.depends_on(a, ["ssl_weight"])


HOLDER = """
import sys, time
from orchestrator.cell_lease import Lease
lease = Lease(sys.argv[1], lambda: False, "the other invocation's pre-training")
assert lease.acquire(print)
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("uri", [False, True], ids=["local", "file-uri"])
def test_a_pretraining_another_process_holds_is_waited_for_not_trained_again(tmp_path, uri):
    """Local storage (an exclusive create decides the lease) and a URI (as on S3: the last writer wins)."""
    storage = f"file://{tmp_path}/runs" if uri else str(tmp_path / "runs")
    path = pretrain.pretrained_path(storage, _config())
    folder, name = path.rsplit("/", 1)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"{folder}/.lease-{name[:-3]}.json"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        fs, fs_path = filesystem_and_path(path)

        def store():  # what the holder's training ends with
            time.sleep(1.0)
            write_atomic(fs, fs_path.rsplit("/", 1)[0], name, b"stored by the other process")

        threading.Thread(target=store, daemon=True).start()
        lines = []
        assert pretrain.train_once(path, _config(), None, log=lines.append) is False
        assert len(lines) == 1 and lines[0].startswith(f"SSL pre-training {path} is being trained by ")
        with fs.open_input_stream(fs_path) as stored:
            assert stored.read() == b"stored by the other process"  # not trained here
    finally:
        holder.kill()
        holder.wait()
