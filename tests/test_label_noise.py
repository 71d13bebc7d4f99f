"""Label corruption: exact fraction, never the true label, fixed by the seed, wired into Trainer."""
from __future__ import annotations

import pytest
import torch

from orchestrator.spec import config_hash
from trainables.config import ConfigError, resolve
from trainables.label_noise import corrupt_labels, flip_count, label_noise_generator


def labels(n=1000, classes=10, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("p,n", [(0.0, 1000), (0.1, 1000), (0.2, 1000), (0.4, 1000), (0.25, 10), (0.5, 7),
                                 (0.333, 1000), (0.9, 50)])
def test_exactly_the_requested_fraction_changes_and_never_to_the_true_label(p, n):
    y = labels(n)
    before = y.clone()
    noisy, flipped = corrupt_labels(y, p, 10, torch.Generator().manual_seed(3))
    expected = int(p * n + 0.5)  # round(p·N), halves up
    assert flip_count(p, n) == expected
    assert int(flipped.sum()) == expected
    assert int((noisy != y).sum()) == expected  # every flipped label changed ...
    assert torch.equal(noisy != y, flipped)  # ... and nothing else did
    assert torch.equal(y, before)  # the input is not modified
    assert noisy.dtype == y.dtype and noisy.min() >= 0 and noisy.max() < 10


def test_new_labels_are_uniform_over_the_other_classes():
    y = labels(40_000, classes=5, seed=1)
    noisy, flipped = corrupt_labels(y, 0.5, 5, torch.Generator().manual_seed(0))
    for true in range(5):
        chosen = noisy[flipped & (y == true)]
        assert (chosen != true).all()
        counts = torch.bincount(chosen, minlength=5).float()
        others = counts[[c for c in range(5) if c != true]]
        share = others / others.sum()
        assert torch.allclose(share, torch.full((4,), 0.25), atol=0.03), share


def test_fixed_by_the_generator_and_nested_across_p():
    y = labels()
    a = corrupt_labels(y, 0.2, 10, label_noise_generator(0))
    b = corrupt_labels(y, 0.2, 10, label_noise_generator(0))
    c = corrupt_labels(y, 0.2, 10, label_noise_generator(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    more = corrupt_labels(y, 0.4, 10, label_noise_generator(0))
    assert (more[1][a[1]]).all()  # the p = 0.2 flips are among the p = 0.4 flips ...
    assert torch.equal(more[0][a[1]], a[0][a[1]])  # ... and flipped alike


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        corrupt_labels(labels(), 1.0, 10)
    with pytest.raises(ValueError, match="0..9"):
        corrupt_labels(torch.tensor([0, 10]), 0.5, 10)
    with pytest.raises(ConfigError, match="'label_noise' must be a fraction in \\[0, 1\\)"):
        resolve({"label_noise": 1.0})
    with pytest.raises(ConfigError, match="label_noise"):
        resolve({"label_noise": -0.1})
    assert resolve({"label_noise": "1/5"})["label_noise"] == pytest.approx(0.2)


def test_new_settings_at_their_defaults_keep_earlier_config_hashes():
    # Recorded before label_noise and the ood_* settings existed (studies/smoke.yaml, λ = 0):
    # earlier results keep their identity and are not run again.
    smoke = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=256, test_subset=64, epochs=2,
                 batch_size=64, attack_variant="joint", eps_train=0.1, train_attack_steps=2,
                 eval_attack_steps=3, eval_eps_linf=[0.0, 0.05, 0.1], ssl_weight=0.0, seed=0)
    assert config_hash(smoke) == "5db4e3dc338dd0ed"
    assert config_hash({**smoke, "label_noise": 0.0, "ood_sets": [], "ood_scores": ["msp", "rotation"]}) == "5db4e3dc338dd0ed"
    assert config_hash({**smoke, "label_noise": 0.2}) != "5db4e3dc338dd0ed"
    assert config_hash({**smoke, "ood_sets": ["gaussian"]}) != "5db4e3dc338dd0ed"


def test_trainer_trains_on_noisy_labels_and_records_the_count():
    from trainables.data import load_split
    from trainables.train import DATA_SELECTION_SEED, Trainer

    cfg = dict(train_subset=128, test_subset=32, epochs=1, batch_size=64, eps_train=0.0, ssl_weight=0.0,
               label_noise=0.25, seed=4)
    clean = load_split("fashion_mnist", True, None, 128, DATA_SELECTION_SEED).labels
    trainer = Trainer(cfg, device="cpu")
    assert trainer.label_noise_flipped == 32
    assert int((trainer.train_data.labels != clean).sum()) == 32
    assert torch.equal(trainer.label_noise_mask, trainer.train_data.labels != clean)
    again = Trainer(cfg, device="cpu")  # fixed by the trial seed
    assert torch.equal(again.train_data.labels, trainer.train_data.labels)
    assert trainer.train_epoch()["label_noise_flipped"] == 32
    # test labels stay clean
    assert torch.equal(trainer.test_data().labels, load_split("fashion_mnist", False, None, 32, DATA_SELECTION_SEED).labels)
    quiet = Trainer({**cfg, "label_noise": 0.0}, device="cpu")
    assert quiet.label_noise_flipped == 0 and torch.equal(quiet.train_data.labels, clean)
