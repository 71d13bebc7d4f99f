"""scripts/setup.sh refuses a disk too small for a new .venv in one line, before it writes anything."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_says_in_one_line_that_the_disk_is_too_small_and_writes_nothing(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    # more free disk than any machine has: the check must refuse before creating .venv
    env = {"PATH": "/usr/bin:/bin", "SSLROBUST_SETUP_FREE_GB": "1000000", "SSLROBUST_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "1000000 GB of free disk" in lines[0] and str(tmp_path) in lines[0], lines
    assert proc.stdout == "" and not (tmp_path / ".venv").exists()
