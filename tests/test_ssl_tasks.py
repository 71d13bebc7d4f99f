"""The contrastive and inpainting SSL tasks, several tasks at once (ssl_tasks), and that the
single-task config path and its hashes are unchanged."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trainables.config import ConfigError, resolve
from trainables.data import dataset_info
from trainables.models import build_model
from trainables.objectives import SSLBatch, attack_objective, compute_losses, stack_inputs, update_loss
from trainables.ssl import (
    Contrastive, Inpainting, MultiTask, RotationPrediction, attach_head, build_task, nt_xent,
    task_from_config,
)

FASHION = dataset_info("fashion_mnist")


def _model(*tasks):
    torch.manual_seed(0)
    model = build_model("small_cnn", FASHION)
    for task in tasks:
        attach_head(model, task)
    return model.eval()


def _list(t: torch.Tensor) -> list[float]:
    return t.detach().tolist()


def _images(n=8, seed=0):
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def test_nt_xent_low_for_identical_views_and_log_2n_minus_1_for_random():
    n = 16
    z = torch.randn(n, 32, generator=torch.Generator().manual_seed(0))
    identical = nt_xent(torch.cat([z, z]), temperature=0.05)
    assert identical.shape == (n,) and float(identical.max()) < 0.05
    # embeddings all equal: the partner is one of 2N−1 equally similar candidates
    flat = nt_xent(torch.ones(2 * n, 32), temperature=0.2)
    assert flat.tolist() == pytest.approx([math.log(2 * n - 1)] * n, abs=1e-5)
    # random high-dimensional embeddings are near-orthogonal: close to log(2N−1)
    random = nt_xent(torch.randn(2 * n, 4096, generator=torch.Generator().manual_seed(1)), temperature=1.0)
    assert float(random.mean()) == pytest.approx(math.log(2 * n - 1), rel=0.05)


def test_contrastive_views_are_deterministic_in_the_labels_and_differentiable():
    task = Contrastive()
    x = _images(4)
    labels = task.sample(4, torch.Generator().manual_seed(0), "cpu")
    assert labels.shape == (2, 4, 3)
    views = task.views(x, labels)
    assert views.shape == (8, 1, 28, 28) and torch.equal(views, task.views(x, labels))
    assert not torch.equal(views[:4], views[4:])  # two different views of each image
    # a crop offset equal to the padding and no flip is the image itself
    p = task._padding(x)
    centre = torch.zeros(2, 4, 3)
    centre[..., :2] = (p + 0.5) / (2 * p + 1)
    assert torch.equal(task.views(x, centre)[:4], x)
    model = _model(task)
    xr = x.clone().requires_grad_(True)
    loss = task.loss(model, xr, labels)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.sum(), xr)
    assert grad.abs().sum() > 0


def test_inpainting_is_zero_for_a_perfect_decoder_on_a_constant_image():
    task = Inpainting()
    model = _model(task)
    head = model.ssl_heads["inpainting"]
    assert head.out_features == 14 * 14  # half the side of a 28×28 image, one channel
    x = torch.full((3, 1, 28, 28), 0.7)
    masked = task.views(x, task.sample(3, None, "cpu"))
    assert float(masked[..., 7:21, 7:21].abs().max()) == 0.0 and float(masked[..., 0, 0].min()) == pytest.approx(0.7)
    with torch.no_grad():  # a decoder that always outputs 0.7: perfect on this image
        head.weight.zero_()
        head.bias.fill_(0.7)
    loss = task.loss(model, x, task.sample(3, None, "cpu"))
    assert loss.shape == (3,) and float(loss.detach().abs().max()) < 1e-10
    other = task.loss(model, torch.full((3, 1, 28, 28), 0.2), task.sample(3, None, "cpu"))
    assert other.tolist() == pytest.approx([0.25] * 3, abs=1e-6)


def test_multitask_loss_is_the_weighted_sum_of_the_task_losses():
    rot, con, inp = RotationPrediction("one"), Contrastive(), Inpainting()
    model = _model(rot, con, inp)
    weights = [0.5, 0.1, 2.0]
    multi = MultiTask([rot, con, inp], weights)
    x = _images(6)
    labels = multi.sample(6, torch.Generator().manual_seed(3), "cpu")
    total = multi.loss(model, x, labels)
    parts = [t.loss(model, x, lab) for t, lab in zip(multi.tasks, labels)]
    assert _list(total) == pytest.approx(_list(sum(w * p for w, p in zip(weights, parts))), abs=1e-5)
    assert multi.copies() == 1 + 2 + 1
    # through the objectives: one stacked pass gives the same SSL loss, in both perturbation modes
    y = torch.zeros(6, dtype=torch.long)
    for stacked in (False, True):
        batch = SSLBatch(multi, 1.0, labels, stacked)
        x_in = stack_inputs(x, batch) if stacked else x
        losses = compute_losses(model, x_in, y, batch)
        assert _list(losses.ssl) == pytest.approx(_list(total), abs=1e-5)
        joint = attack_objective("joint", batch)(model, x_in, y)
        assert _list(joint) == pytest.approx(_list(losses.ce + total), abs=1e-5)
        ssl_only = attack_objective("ssl", batch)(model, x_in, y)
        assert _list(ssl_only) == pytest.approx(_list(total), abs=1e-5)
        loss, _ = update_loss(model, x_in, y, batch)
        assert float(loss.detach()) == pytest.approx(float((losses.ce.mean() + total.mean()).detach()), abs=1e-5)


def test_ssl_tasks_config_and_unchanged_single_task_path():
    from orchestrator.spec import config_hash

    cfg = resolve({"ssl_tasks": {"rotation": 0.5, "contrastive": "1/10"}})
    assert cfg["ssl_tasks"] == {"contrastive": 0.1, "rotation": 0.5}
    task, weight = task_from_config(cfg)
    assert isinstance(task, MultiTask) and weight == 1.0
    assert [t.name for t in task.tasks] == ["rotation", "contrastive"] and task.weights == [0.5, 0.1]
    task, weight = task_from_config(resolve({"ssl_weight": 0.3}))
    assert isinstance(task, RotationPrediction) and weight == 0.3
    assert build_task("inpainting").name == "inpainting"
    # new keys at their defaults leave every existing configuration's hash as it was
    assert config_hash({}) == config_hash({"ssl_tasks": {}, "defence": "none", "defence_steps": 10,
                                           "contrastive_temperature": 0.2, "eval_adaptive_weight": 1.0})
    assert config_hash({"ssl_tasks": {"rotation": 0.5}}) != config_hash({})
    with pytest.raises(ConfigError, match="ssl_tasks"):
        resolve({"ssl_tasks": {"jigsaw": 1.0}})
    with pytest.raises(ConfigError, match="mapping"):
        resolve({"ssl_tasks": ["rotation"]})


def test_trainer_runs_with_several_tasks():
    from trainables.train import Trainer

    trainer = Trainer(dict(dataset="fashion_mnist", train_subset=128, test_subset=16, epochs=1, batch_size=64,
                           ssl_tasks={"rotation": 0.5, "contrastive": 0.1, "inpainting": 0.5},
                           eps_train=0.1, train_attack_steps=1, eval_eps_linf=[0.0]), device="cpu")
    assert set(trainer.model.ssl_heads) == {"rotation", "contrastive", "inpainting"}
    before = {k: v.clone() for k, v in trainer.model.ssl_heads.state_dict().items()}
    metrics = trainer.train_epoch()
    assert math.isfinite(metrics["train_ssl"]) and metrics["train_ssl"] > 0
    after = trainer.model.ssl_heads.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every head is trained
    assert isinstance(trainer.model.ssl_heads["contrastive"], nn.Sequential)
