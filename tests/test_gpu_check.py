"""scripts/gpu_check.py on a machine without CUDA, and the CIFAR-10 files it writes for itself."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert "Traceback" not in done.stderr


def test_its_cifar10_files_load_through_the_project_reader(tmp_path):
    from trainables.data import load_split

    gpu_check.write_cifar10_files(tmp_path, n_train=50, n_test=7)
    train = load_split("cifar10", True, data_dir=tmp_path, download=False)
    test = load_split("cifar10", False, data_dir=tmp_path, download=False)
    assert train.images.shape == (50, 3, 32, 32) and test.images.shape == (7, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and int(train.labels.max()) <= 9


def test_paper_config_takes_the_study_spec_and_a_fixed_number_of_steps():
    config = gpu_check.paper_config(steps=7)
    assert config["arch"] == "wrn" and config["dataset"] == "cifar10" and config["ssl_weight"] > 0
    assert config["train_subset"] == 7 * config["batch_size"]
    assert gpu_check.bf16_peak("NVIDIA H200", None) == 989.4 and gpu_check.bf16_peak("Unknown", 100.0) == 100.0
