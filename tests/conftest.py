"""Fixtures shared by the tests: trained models (test_attacks, test_ssl_objectives, test_train),
one local Ray per pytest process with a study workspace per test (the end-to-end study tests), torch
thread settings per test, and the rule that marks the tests using the first two `slow`.

Two small_cnn models trained once per session for two epochs on a 3,000-image Fashion-MNIST subset
with the project's own Trainer (CPU, one thread, ~5 s and ~12 s): one standard (ε_train = 0), one
plain PGD-3 l∞ adversarially trained at ε_train = 0.1 (variant ce, no SSL). Plus a fixed batch of
500 Fashion-MNIST test images to attack.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

FMNIST_EPS_TRAIN = 0.1


def _train_small_cnn(eps_train: float):
    from trainables.train import Trainer

    trainer = Trainer(
        dict(dataset="fashion_mnist", arch="small_cnn", train_subset=3000, epochs=2, batch_size=128,
             ssl_task="none", attack_variant="ce", eps_train=eps_train, train_attack="pgd",
             train_attack_steps=3, train_random_start=True, seed=0),
        device="cpu",
    )
    for _ in trainer.epochs():
        pass
    trainer.model.eval()
    return trainer.model


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block, the previous count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def one_thread_for_the_session():
    """torch on one thread for the whole session (restored at its end), so that module- and
    session-scoped fixtures compute on the same thread count as the tests: a result computed with
    two threads can differ in its last bits from the same computation on one. The tests' tensors are
    small, and on a shared 2-core machine two intra-op threads that keep being descheduled spin-wait
    on each other (~10x slower). The session's trained models stay on one thread too: on a busy
    2-core machine two threads trained them in 41 s and 133 s, one thread in 9 s and 21 s."""
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def one_thread(one_thread_for_the_session):
    """Every test starts on one torch thread, and whatever it sets is restored after it."""
    with torch_threads(1):
        yield


# Tests that need one of these fixtures (a local Ray, or a model trained for seconds) are slow:
# `pytest -m "not slow"` leaves them out (README, development).
SLOW_FIXTURES = {"ray_cluster", "fmnist_standard_cnn", "fmnist_adversarial_cnn", "fmnist_pgd10_accuracy"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def fmnist_test_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """500 Fashion-MNIST test images (float32 in [0, 1], (500, 1, 28, 28)) and their labels."""
    from trainables.data import load_split, to_float

    split = load_split("fashion_mnist", False, subset=500, seed=0, device="cpu")
    return to_float(split.images), split.labels


@pytest.fixture(scope="session")
def fmnist_standard_cnn() -> torch.nn.Module:
    """small_cnn, standard training: 3,000 Fashion-MNIST images, 2 epochs, eval mode."""
    return _train_small_cnn(0.0)


@pytest.fixture(scope="session")
def fmnist_adversarial_cnn() -> torch.nn.Module:
    """small_cnn, PGD-3 l∞ adversarial training at ε = 0.1 (step 2.5·ε/3, random start; variant
    ce, no SSL), same data and seed as `fmnist_standard_cnn`, eval mode."""
    return _train_small_cnn(FMNIST_EPS_TRAIN)


@pytest.fixture(scope="session")
def fmnist_pgd10_accuracy(fmnist_test_batch, fmnist_standard_cnn, fmnist_adversarial_cnn) -> dict:
    """Clean and PGD-10 l∞ accuracy at ε_train = 0.1 (step 0.025, random start, eval mode) of both
    session models on the 500 test images, with our `pgd` (generator seed 1)."""
    from trainables.attacks import pgd

    x, y = fmnist_test_batch
    out = {"n": len(y)}
    for name, model in (("standard", fmnist_standard_cnn), ("adversarial", fmnist_adversarial_cnn)):
        x_adv = pgd(model, x, y, norm="linf", eps=FMNIST_EPS_TRAIN, step_size=0.025, steps=10,
                    random_start=True, bn_mode="eval", generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out[name] = (model(x_adv).argmax(1) == y).float().mean().item()
            out[name + "_clean"] = (model(x).argmax(1) == y).float().mean().item()
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray of this machine (2 CPUs, no dashboard), started once for every test that asks for
    it: starting one costs seconds on a 2-core machine, and no test stops or reconfigures it (the
    tests of cluster start/stop, node faults and concurrent invocations start their own, in other
    processes, with their own RAY_TMPDIR)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """(studies folder, RunOptions): a tmp studies dir, storage and sqlite MLflow store, tmp cwd."""
    from orchestrator.runner import RunOptions

    studies = tmp_path / "studies"
    studies.mkdir()
    monkeypatch.setenv("SSLROBUST_STUDIES_DIR", str(studies))
    monkeypatch.chdir(tmp_path)
    options = RunOptions(storage=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", verbose=0)
    return studies, options
