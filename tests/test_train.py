"""Tests for trainables/train.py: real short training runs on Fashion-MNIST subsets (CPU).

The reductions of science.md (λ = 0 with `ce` is plain adversarial training; ε_train = 0 is
standard training), determinism and exact resumption, SSL pre-training as initialisation, the
independent perturbation mode, and that adversarial training buys robustness at ε_train.
"""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from trainables.attacks import pgd
from trainables.models import backbone_state
from trainables.objectives import stack_inputs
from trainables.train import Trainer, pretrain_rotation, pretrain_settings

pytestmark = pytest.mark.slow  # every test trains (seconds each)

TIMING_KEYS = {"epoch_seconds", "images_per_second"}


def _run(config: dict, epochs: int | None = None) -> Trainer:
    trainer = Trainer(config, device="cpu")
    for _ in range(trainer.config["epochs"] if epochs is None else epochs):
        trainer.train_epoch()
    return trainer


def _metrics(trainer: Trainer) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in trainer.history]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, keys=None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    keys = sorted(set(sa) & set(sb)) if keys is None else keys
    assert keys
    for k in keys:
        assert torch.equal(sa[k], sb[k]), k


def _differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in set(sa) & set(sb) if sa[k].is_floating_point())


# --- robustness from adversarial training -------------------------------------------------------


def test_adversarial_training_is_more_robust_at_eps_train(fmnist_pgd10_accuracy):
    # small_cnn, 3,000 Fashion-MNIST images, 2 epochs; PGD-10 l∞ at ε_train = 0.1 on 500 test images.
    acc = fmnist_pgd10_accuracy
    assert acc["n"] == 500
    assert acc["standard_clean"] > 0.6 and acc["adversarial_clean"] > 0.6  # both learnt something
    assert acc["adversarial"] > acc["standard"] + 0.1, acc


# --- the reductions of the variant table ----------------------------------------------------

SMALL = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=128, batch_size=64, epochs=1,
             eps_train=0.1, train_attack_steps=2, seed=3)


@pytest.mark.parametrize("variant", ["ce", "joint"])
def test_lambda_zero_is_plain_adversarial_training(variant):
    with_zero = _run({**SMALL, "ssl_task": "rotation", "ssl_weight": 0.0, "attack_variant": variant})
    plain = _run({**SMALL, "ssl_task": "none", "attack_variant": "ce"})
    assert _metrics(with_zero) == _metrics(plain)
    assert _metrics(plain)[0]["train_ssl"] == 0.0
    _assert_same_weights(with_zero.model, plain.model)  # every weight but the unused rotation head
    assert "ssl_heads.rotation.weight" in with_zero.model.state_dict()


def test_lambda_matters():
    # Non-vacuity of the test above: with λ > 0 the same run ends elsewhere.
    plain = _run({**SMALL, "ssl_task": "none", "attack_variant": "ce"})
    with_ssl = _run({**SMALL, "ssl_task": "rotation", "ssl_weight": 0.5, "attack_variant": "ce",
                     "rotations": "one"})
    assert _metrics(with_ssl)[0]["train_ssl"] > 0.5  # near log 4 early on
    assert _differs(plain.model, with_ssl.model)


def test_eps_train_zero_is_standard_training_whatever_the_attack_settings():
    base = {**SMALL, "ssl_task": "rotation", "ssl_weight": 0.5, "attack_variant": "joint",
            "rotations": "one", "eps_train": 0.0}
    a = _run({**base, "train_attack": "pgd", "train_attack_steps": 3, "train_random_start": True})
    b = _run({**base, "train_attack": "fgsm", "train_attack_steps": 7, "train_random_start": False,
              "train_bn_mode": "eval", "norm_train": "l2", "train_step_size_factor": 1.0})
    assert _metrics(a) == _metrics(b)
    _assert_same_weights(a.model, b.model, keys=sorted(a.model.state_dict()))
    # ... and an attack does change the run.
    attacked = _run({**base, "eps_train": 0.1, "train_attack_steps": 3})
    assert _differs(a.model, attacked.model)
    assert _metrics(attacked)[0]["train_ce"] > _metrics(a)[0]["train_ce"]


# --- determinism and resumption -----------------------------------------------------------------

RESUMABLE = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=96, batch_size=32,
                 epochs=2, eps_train=0.1, train_attack_steps=2, ssl_task="rotation",
                 ssl_weight=0.5, attack_variant="joint", rotations="one", augment=True, seed=5)


@pytest.fixture(scope="module")
def uninterrupted():
    return _run(RESUMABLE)


def test_same_seed_gives_the_same_metrics_and_weights(uninterrupted):
    again = _run(RESUMABLE)
    assert len(_metrics(again)) == 2
    assert _metrics(again) == _metrics(uninterrupted)
    _assert_same_weights(again.model, uninterrupted.model, keys=sorted(again.model.state_dict()))
    other_seed = _run({**RESUMABLE, "seed": 6}, epochs=1)
    assert _metrics(other_seed)[0] != _metrics(uninterrupted)[0]


def test_resume_after_epoch_one_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    first = _run(RESUMABLE, epochs=1)
    path = tmp_path / "checkpoint.pt"
    torch.save(first.state_dict(), path)
    del first
    state = torch.load(path, weights_only=True)

    resumed = Trainer(RESUMABLE, device="cpu")
    # Disturb everything the checkpoint must restore, so a forgotten piece shows up.
    with torch.no_grad():
        for p in resumed.model.parameters():
            p.add_(0.01)
    resumed.generator.manual_seed(12345)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        resumed.scheduler.step()
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and not resumed.done
    metrics = resumed.train_epoch()
    assert metrics["epoch"] == 2 and resumed.done
    assert _metrics(resumed) == _metrics(uninterrupted)
    _assert_same_weights(resumed.model, uninterrupted.model, keys=sorted(resumed.model.state_dict()))
    assert resumed.optimizer.param_groups[0]["lr"] == uninterrupted.optimizer.param_groups[0]["lr"]


# Until torch.optim replaced it, the trainer stepped an SGD/Adam/LambdaLR of its own whose state dicts
# held only these keys (torch.optim's layout without the options it did not implement). Checkpoints
# of interrupted trials written then must resume as they would have.
OWN_OPTIMIZER_GROUP_KEYS = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "initial_lr", "params"),
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "initial_lr", "params"),
}


def _in_own_optimizer_layout(state: dict, optimizer: str) -> dict:
    groups = [{k: g[k] for k in OWN_OPTIMIZER_GROUP_KEYS[optimizer]} for g in state["optimizer"]["param_groups"]]
    sched = state["scheduler"]
    return {**state, "optimizer": {"state": state["optimizer"]["state"], "param_groups": groups},
            "scheduler": {"base_lrs": sched["base_lrs"], "last_epoch": sched["last_epoch"],
                          "_step_count": sched["last_epoch"] + 1, "_last_lr": sched["_last_lr"],
                          "lr_lambdas": [None]}}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpoint_of_the_former_own_optimizer_resumes(optimizer, tmp_path):
    config = {**RESUMABLE, "train_subset": 64} if optimizer == "sgd" else {
        **RESUMABLE, "train_subset": 64, "optimizer": "adam", "lr": 1e-3, "schedule": "piecewise"}
    reference = _run(config, epochs=1)
    old = _in_own_optimizer_layout(reference.state_dict(), optimizer)
    assert "foreach" not in old["optimizer"]["param_groups"][0]  # really the old layout
    path = tmp_path / "checkpoint.pt"
    torch.save(old, path)
    reference.train_epoch()  # the uninterrupted run
    resumed = Trainer(config, device="cpu")
    resumed.load_state_dict(torch.load(path, weights_only=True))
    resumed.train_epoch()
    assert _metrics(resumed) == _metrics(reference)
    _assert_same_weights(resumed.model, reference.model, keys=sorted(resumed.model.state_dict()))
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]


# --- SSL pre-training as initialisation ---------------------------------------------------------


def test_pretrained_rotation_state_round_trips_and_initialises_the_backbone(tmp_path):
    config = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=128, batch_size=64,
                  pretrain_epochs=1, pretrain_lr=0.05, init="ssl_pretrained", ssl_task="rotation",
                  rotations="one", epochs=1, eps_train=0.1, train_attack_steps=1, seed=2)
    losses = []
    state = pretrain_rotation(config, device="cpu", progress=lambda epoch, loss: losses.append(loss))
    assert len(losses) == 1 and math.isfinite(losses[0])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["settings"] == pretrain_settings(config)

    with pytest.raises(ValueError):
        Trainer(config, device="cpu")  # init ssl_pretrained without the state

    trainer = Trainer(config, device="cpu", pretrained=loaded)
    start = backbone_state(trainer.model)
    assert set(start) == set(loaded["backbone"])
    for k, v in loaded["backbone"].items():
        assert torch.equal(start[k], v), k
    for k, v in loaded["ssl_head"].items():
        assert torch.equal(trainer.model.ssl_heads["rotation"].state_dict()[k], v), k
    # Pre-training moved the weights away from the scratch initialisation of the same seed.
    scratch = Trainer({**config, "init": "scratch"}, device="cpu")
    scratch_backbone = backbone_state(scratch.model)
    assert any(not torch.equal(scratch_backbone[k], v) for k, v in loaded["backbone"].items()
               if k.endswith("weight"))
    # Fine-tuning runs from there.
    metrics = trainer.train_epoch()
    assert math.isfinite(metrics["train_loss"])


# --- independent perturbation of the SSL views ------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_independent_perturbation_keeps_every_copy_in_its_ball(norm, eps):
    config = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=64, batch_size=32,
                  epochs=1, ssl_task="rotation", ssl_weight=0.5, attack_variant="joint",
                  rotations="all", ssl_perturbation="independent", norm_train=norm, eps_train=eps,
                  train_attack_steps=2, seed=1)
    trainer = Trainer(config, device="cpu")
    metrics = trainer.train_epoch()
    assert math.isfinite(metrics["train_loss"]) and metrics["train_ssl"] > 0

    x = trainer.train_data.images[:16].float() / 255
    y = trainer.train_data.labels[:16]
    n = len(y)
    ssl = trainer._ssl_batch(n)
    assert ssl.stacked
    x_in = stack_inputs(x, ssl)
    assert x_in.shape[0] == 5 * n  # the image and its four rotations
    x_adv = trainer._adversarial(x_in, y, ssl)
    assert x_adv.shape == x_in.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = x_adv - x_in
    size = delta.abs().flatten(1).amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert size.max() <= eps + 1e-6  # every copy, each in its own ball
    assert (size[n:] > 0.5 * eps).all()  # the SSL copies are attacked too
    # Independent: a view's perturbation is not the rotated perturbation of the image.
    # (rows n..5n are the copies rotated by 0°, 90°, 180°, 270°).
    rotated_image_delta = torch.cat([torch.rot90(delta[:n], k, dims=(2, 3)) for k in range(4)])
    assert not torch.allclose(delta[n:], rotated_image_delta, atol=1e-3)


def test_shared_mode_attacks_the_image_with_the_joint_objective():
    # The shared mode perturbs the image only (its attack input is the batch itself); the SSL
    # views are rotations of the perturbed image.
    base = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=64, batch_size=32,
                epochs=1, ssl_task="rotation", ssl_weight=0.5, attack_variant="joint",
                rotations="one", eps_train=0.1, train_attack_steps=1, seed=1)
    shared = Trainer({**base, "ssl_perturbation": "shared"}, device="cpu")
    ssl = shared._ssl_batch(8)
    assert not ssl.stacked
    x = shared.train_data.images[:8].float() / 255
    y = shared.train_data.labels[:8]
    x_adv = shared._adversarial(x, y, ssl)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.1 + 1e-6
    # the same joint objective through our pgd directly gives the same example (same generator
    # state, so the same random start)
    shared2 = Trainer({**base, "ssl_perturbation": "shared"}, device="cpu")
    ssl2 = shared2._ssl_batch(8)
    assert torch.equal(ssl.labels, ssl2.labels)
    from trainables.objectives import attack_objective

    direct = pgd(shared2.model, x, y, attack_objective("joint", ssl2), "linf", 0.1,
                 step_size=2.5 * 0.1, steps=1, random_start=True, bn_mode="train",
                 generator=shared2.generator)
    assert torch.equal(direct, x_adv)


# --- validation split and checkpoint selection (robust overfitting, Rice et al. 2020) ------------

VAL_TINY = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=128, test_subset=50, batch_size=64,
                epochs=2, ssl_task="none", attack_variant="ce", eps_train=0.1, train_attack_steps=1,
                val_subset=100, val_attack_steps=2, eval_attack_steps=2, eval_eps_linf=[0.0, 0.1], seed=0)


def test_validation_split_is_held_out_and_leaves_plain_training_data_unchanged():
    from trainables.data import load_split, load_train_val

    full = load_split("fashion_mnist", True, download=False)
    train, val = load_train_val("fashion_mnist", 1000, 1, subset=5000, seed=0, download=False)
    _, val_again = load_train_val("fashion_mnist", 1000, 1, subset=500, seed=3, download=False)
    assert len(train) == 5000 and len(val) == 1000 and len(full) == 60000
    assert torch.equal(val.images, val_again.images)  # drawn by its own seed, whatever training takes
    as_rows = lambda t: {bytes(row) for row in t.images.flatten(1).numpy()}  # noqa: E731
    assert not as_rows(train) & as_rows(val)  # never trained on
    # no val_subset: the training subset is the one load_split always drew
    plain = Trainer({k: v for k, v in VAL_TINY.items() if k != "val_subset"}, device="cpu")
    assert plain.val_data is None
    assert torch.equal(plain.train_data.images, load_split("fashion_mnist", True, subset=128, seed=0).images)
    with pytest.raises(ValueError, match="val_subset must be between 1 and 59999"):
        load_train_val("fashion_mnist", 60000, 1, download=False)


def test_best_robust_val_selects_the_best_epoch_and_keeps_it_across_a_checkpoint():
    trainer = _run({**VAL_TINY, "checkpoint_selection": "best_robust_val"})
    history = [m["val_robust_acc"] for m in trainer.history]
    assert len(history) == 2 and all(0 <= v <= 1 for v in history)
    assert all(0 <= m["val_clean_acc"] <= 1 and m["val_robust_acc"] <= m["val_clean_acc"] for m in trainer.history)
    best_epoch = max(range(len(history)), key=lambda i: (history[i], i)) + 1  # ties: the later epoch
    model, epoch = trainer.selected_model()
    assert epoch == best_epoch == trainer.best["epoch"]
    # pretend an untrained model's weights were the best epoch's: the copy has them, the trainer
    # keeps the last epoch's, and the evaluation is of the copy
    untrained = Trainer({**VAL_TINY, "seed": 5}, device="cpu").model
    trainer.best = {"epoch": 1, "val_robust_acc": 2.0,
                    "model": {k: v.clone() for k, v in untrained.state_dict().items()}}
    model, epoch = trainer.selected_model()
    assert epoch == 1 and model is not trainer.model
    _assert_same_weights(model, untrained)
    assert _differs(model, trainer.model)
    records = trainer.evaluate()
    data = trainer.test_data()
    x, y = data.images.float() / 255, data.labels
    untrained.eval()
    with torch.no_grad():
        expected = (untrained(x).argmax(1) == y).sum().item() / len(y)
    assert trainer.selected_epoch == 1 and records[0]["clean_acc"] == expected
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    buffer.seek(0)
    restored = Trainer({**VAL_TINY, "checkpoint_selection": "best_robust_val"}, device="cpu")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.best["epoch"] == 1 and restored.selected_model()[1] == 1
    last = Trainer(VAL_TINY, device="cpu")  # checkpoint_selection last: evaluated as trained
    last.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert last.selected_model() == (last.model, 2)


def test_best_robust_val_needs_a_validation_split():
    from trainables.config import ConfigError, resolve

    with pytest.raises(ConfigError, match="needs a validation split; set val_subset"):
        resolve({"checkpoint_selection": "best_robust_val"})


# --- training precision ---------------------------------------------------------------------------

def test_train_precision_decides_where_training_runs_in_bf16():
    from trainables.device import cpu_has_native_bf16, uses_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_bf16(cpu, "auto") and not uses_bf16(cpu, "fp32")
    assert uses_bf16(cpu, "bf16") == cpu_has_native_bf16()  # emulated bf16 would be slower than fp32
    assert uses_bf16(cuda, "auto") and uses_bf16(cuda, "bf16") and not uses_bf16(cuda, "fp32")
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        uses_bf16(cpu, "fp16")


def test_bf16_training_changes_the_weights_only_by_rounding():
    tiny = {**VAL_TINY, "val_subset": None, "epochs": 1, "ssl_task": "rotation", "attack_variant": "joint"}
    fp32, bf16 = _run({**tiny, "train_precision": "fp32"}), _run({**tiny, "train_precision": "bf16"})
    assert _metrics(fp32) == _metrics(_run(tiny))  # "auto" is fp32 on CPU: today's results unchanged
    from trainables.device import cpu_has_native_bf16

    if not cpu_has_native_bf16():  # "bf16" falls back to fp32 where the CPU has no native bf16
        assert _metrics(bf16) == _metrics(fp32)
        return
    assert _differs(fp32.model, bf16.model)  # it did train in bf16
    loss32, loss16 = fp32.history[-1]["train_loss"], bf16.history[-1]["train_loss"]
    assert math.isfinite(loss16) and abs(loss16 - loss32) < 0.1 * loss32
