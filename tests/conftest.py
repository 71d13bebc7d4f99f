"""Session fixtures shared by tests/test_attacks.py, test_ssl_objectives.py and test_train.py.

Two small_cnn models trained once per session for one epoch on a 2,000-image Fashion-MNIST subset
with the project's own Trainer (CPU, 2 threads): one standard (ε_train = 0), one adversarially
trained at ε_train = 0.1 with FGSM and a random start (Wong, Rice and Kolter 2020; the cheapest
adversarial training the Trainer offers, and on this budget as robust as PGD-2: PGD-10 accuracy
0.45 vs 0.44 in a trial run). Plus a fixed batch of Fashion-MNIST test images to attack.
"""
from __future__ import annotations

import pytest
import torch

FMNIST_EPS_TRAIN = 0.1


def _train_small_cnn(eps_train: float):
    from trainables.train import Trainer

    trainer = Trainer(
        dict(dataset="fashion_mnist", arch="small_cnn", train_subset=2000, epochs=1, batch_size=128,
             ssl_task="none", attack_variant="ce", eps_train=eps_train, train_attack="fgsm",
             train_random_start=True, seed=0),
        device="cpu",
    )
    for _ in trainer.epochs():
        pass
    trainer.model.eval()
    return trainer.model


@pytest.fixture(scope="session")
def two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_test_batch(two_threads) -> tuple[torch.Tensor, torch.Tensor]:
    """500 Fashion-MNIST test images (float32 in [0, 1], (500, 1, 28, 28)) and their labels."""
    from trainables.data import load_split, to_float

    split = load_split("fashion_mnist", False, subset=500, seed=0, device="cpu")
    return to_float(split.images), split.labels


@pytest.fixture(scope="session")
def fmnist_standard_cnn(two_threads) -> torch.nn.Module:
    """small_cnn, standard training: 2,000 Fashion-MNIST images, 1 epoch, eval mode."""
    return _train_small_cnn(0.0)


@pytest.fixture(scope="session")
def fmnist_adversarial_cnn(two_threads) -> torch.nn.Module:
    """small_cnn, FGSM-RS l∞ adversarial training at ε = 0.1 (variant ce, no SSL), same data and
    seed as `fmnist_standard_cnn`, eval mode."""
    return _train_small_cnn(FMNIST_EPS_TRAIN)


@pytest.fixture(scope="session")
def fmnist_pgd10_accuracy(fmnist_test_batch, fmnist_standard_cnn, fmnist_adversarial_cnn) -> dict:
    """Clean and PGD-10 l∞ accuracy at ε_train = 0.1 (step 0.025, random start, eval mode) of both
    session models on the first 256 test images, with our `pgd` (generator seed 1)."""
    from trainables.attacks import pgd

    x, y = fmnist_test_batch
    x, y = x[:256], y[:256]
    out = {"n": len(y)}
    for name, model in (("standard", fmnist_standard_cnn), ("adversarial", fmnist_adversarial_cnn)):
        x_adv = pgd(model, x, y, norm="linf", eps=FMNIST_EPS_TRAIN, step_size=0.025, steps=10,
                    random_start=True, bn_mode="eval", generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out[name] = (model(x_adv).argmax(1) == y).float().mean().item()
            out[name + "_clean"] = (model(x).argmax(1) == y).float().mean().item()
    return out
