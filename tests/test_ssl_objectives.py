"""Tests for trainables/ssl.py (rotation prediction) and trainables/objectives.py (the attack-loss
variants of science.md: which objective the attack maximises and what the update minimises)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.data import dataset_info
from trainables.models import build_model
from trainables.objectives import (
    SSLBatch, attack_objective, compute_losses, stack_inputs, update_loss,
)
from trainables.ssl import RotationPrediction, attach_head, build_task, rotate

LAMBDA = 0.5


@pytest.fixture(scope="module")
def images(fmnist_test_batch):
    x, y = fmnist_test_batch
    return x[:24].clone(), y[:24].clone()


@pytest.fixture(scope="module")
def model_with_rotation_head():
    """An untrained small_cnn with a rotation head, in eval mode: batch statistics would make a
    sample's loss depend on what else is in the forward pass, and these tests compare losses
    computed in one stacked pass against separate passes."""
    torch.manual_seed(0)
    model = build_model("small_cnn", dataset_info("fashion_mnist"))
    attach_head(model, RotationPrediction("all"))
    return model.eval()


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def _ssl_batch(rotations: str, n: int, stacked: bool = False, weight: float = LAMBDA, seed: int = 0):
    task = RotationPrediction(rotations)
    labels = task.sample(n, torch.Generator().manual_seed(seed), "cpu")
    return SSLBatch(task, weight, labels, stacked)


# --- rotation ---------------------------------------------------------------------------------


def test_rotating_four_times_by_90_degrees_is_the_identity(images):
    x, _ = images
    r = x
    for _ in range(4):
        r = rotate(r, 1)
    assert torch.equal(r, x)
    assert torch.equal(rotate(x, 4), x) and torch.equal(rotate(x, 0), x)
    assert torch.equal(rotate(x, -1), rotate(x, 3))
    assert not torch.equal(rotate(x, 1), x) and not torch.equal(rotate(x, 2), x)
    # Counter-clockwise: the top-right pixel moves to the top-left corner.
    img = torch.zeros(1, 1, 3, 3)
    img[0, 0, 0, 2] = 1.0
    assert rotate(img, 1)[0, 0, 0, 0] == 1.0


def test_rotations_all_views_match_their_labels(images):
    x, _ = images
    n = len(x)
    task = RotationPrediction("all")
    labels = task.sample(n, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(labels, torch.arange(4).repeat_interleave(n))
    views = task.views(x, labels)
    assert views.shape == (4 * n, *x.shape[1:])
    for i in range(4 * n):
        assert torch.equal(views[i], torch.rot90(x[i % n], int(labels[i]), dims=(1, 2)))


def test_rotations_one_views_match_their_labels(images):
    x, _ = images
    n = len(x)
    task = RotationPrediction("one")
    labels = task.sample(n, torch.Generator().manual_seed(1), "cpu")
    assert labels.shape == (n,) and set(labels.tolist()) == {0, 1, 2, 3}
    views = task.views(x, labels)
    assert views.shape == x.shape
    for i in range(n):
        assert torch.equal(views[i], torch.rot90(x[i], int(labels[i]), dims=(1, 2)))
    # The same generator state gives the same labels (the attack and update see the same views).
    again = task.sample(n, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(labels, again)


@pytest.mark.parametrize("rotations", ["all", "one"])
def test_uniform_rotation_head_loss_is_log_4(rotations, images):
    x, _ = images
    torch.manual_seed(0)
    model = build_model("small_cnn", dataset_info("fashion_mnist")).eval()
    task = build_task("rotation", rotations)
    attach_head(model, task)
    labels = task.sample(len(x), torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        untrained = task.loss(model, x, labels)
        head = model.ssl_heads["rotation"]
        head.weight.zero_()
        head.bias.zero_()
        uniform = task.loss(model, x, labels)
    assert uniform.shape == (len(x),)  # one loss per image, averaged over its rotated copies
    assert torch.allclose(uniform, torch.full_like(uniform, math.log(4)), atol=1e-6)
    # A freshly initialised head is close to uniform too.
    assert abs(untrained.mean().item() - math.log(4)) < 0.25


def test_build_task_none_and_head_attachment():
    assert build_task("none") is None
    model = build_model("small_cnn", dataset_info("fashion_mnist"))
    attach_head(model, None)
    assert len(model.ssl_heads) == 0
    attach_head(model, build_task("rotation", "one"))
    assert model.ssl_heads["rotation"].out_features == 4


# --- attack objectives --------------------------------------------------------------------------


@pytest.mark.parametrize("rotations", ["all", "one"])
def test_ce_attack_objective_ignores_ssl(rotations, images, model_with_rotation_head):
    model = model_with_rotation_head
    x, y = images
    ssl = _ssl_batch(rotations, len(y))
    objective = attack_objective("ce", ssl)

    def pure_ce(x_in):
        return F.cross_entropy(model(x_in), y, reduction="none")

    assert torch.allclose(objective(model, x, y), pure_ce(x), atol=1e-6)
    assert torch.allclose(_grad(lambda t: objective(model, t, y), x), _grad(pure_ce, x), atol=1e-7)
    # Independent perturbation: the SSL copies of the stacked input get no gradient at all.
    stacked = _ssl_batch(rotations, len(y), stacked=True)
    x_in = stack_inputs(x, stacked)
    g = _grad(lambda t: attack_objective("ce", stacked)(model, t, y), x_in)
    assert torch.allclose(g[: len(y)], _grad(pure_ce, x), atol=1e-7)
    assert torch.count_nonzero(g[len(y):]) == 0


@pytest.mark.parametrize("rotations", ["all", "one"])
@pytest.mark.parametrize("stacked", [False, True])
def test_joint_attack_objective_is_ce_plus_lambda_ssl(rotations, stacked, images, model_with_rotation_head):
    model = model_with_rotation_head
    x, y = images
    n = len(y)
    ssl = _ssl_batch(rotations, n, stacked=stacked)
    x_in = stack_inputs(x, ssl) if stacked else x

    def ce(t):
        return F.cross_entropy(model(t[:n]), y, reduction="none")

    def ssl_loss(t):
        if stacked:  # the views are the stacked copies themselves
            logits = model.ssl_heads["rotation"](model.features(t[n:]))
            return F.cross_entropy(logits, ssl.labels, reduction="none").view(ssl.task.copies(), n).mean(0)
        return ssl.task.loss(model, t, ssl.labels)

    joint = attack_objective("joint", ssl)
    value = joint(model, x_in, y)
    assert value.shape == (n,)
    assert torch.allclose(value, ce(x_in) + LAMBDA * ssl_loss(x_in), atol=1e-5)
    g_joint = _grad(lambda t: joint(model, t, y), x_in)
    g_expected = _grad(ce, x_in) + LAMBDA * _grad(ssl_loss, x_in)
    assert torch.allclose(g_joint, g_expected, atol=1e-6, rtol=1e-4)
    # λ matters: a different weight gives a different objective.
    heavier = attack_objective("joint", _ssl_batch(rotations, n, stacked=stacked, weight=2.0))
    assert not torch.allclose(heavier(model, x_in, y), value, atol=1e-3)


def test_joint_with_lambda_zero_is_ce(images, model_with_rotation_head):
    model = model_with_rotation_head
    x, y = images
    joint = attack_objective("joint", _ssl_batch("one", len(y), weight=0.0))
    assert torch.allclose(joint(model, x, y), F.cross_entropy(model(x), y, reduction="none"), atol=1e-6)


@pytest.mark.parametrize("rotations", ["all", "one"])
@pytest.mark.parametrize("stacked", [False, True])
def test_ssl_attack_objective_needs_no_labels(rotations, stacked, images, model_with_rotation_head):
    model = model_with_rotation_head
    x, y = images
    ssl = _ssl_batch(rotations, len(y), stacked=stacked)
    x_in = stack_inputs(x, ssl) if stacked else x
    objective = attack_objective("ssl", ssl)
    other_y = (y + 1 + torch.arange(len(y)) % 9) % 10
    assert (other_y != y).all()
    value = objective(model, x_in, y)
    assert torch.equal(value, objective(model, x_in, other_y))
    g = _grad(lambda t: objective(model, t, y), x_in)
    assert torch.equal(g, _grad(lambda t: objective(model, t, other_y), x_in))
    assert g.abs().sum() > 0
    if not stacked:
        assert torch.allclose(value, ssl.task.loss(model, x, ssl.labels), atol=1e-6)


# --- the parameter update ---------------------------------------------------------------------


@pytest.mark.parametrize("rotations", ["all", "one"])
@pytest.mark.parametrize("stacked", [False, True])
def test_update_loss_is_ce_plus_lambda_ssl(rotations, stacked, images, model_with_rotation_head):
    model = model_with_rotation_head
    x, y = images
    n = len(y)
    ssl = _ssl_batch(rotations, n, stacked=stacked)
    x_in = stack_inputs(x, ssl) if stacked else x
    total, losses = update_loss(model, x_in, y, ssl)
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y)
        if stacked:
            logits = model.ssl_heads["rotation"](model.features(x_in[n:]))
            ssl_mean = F.cross_entropy(logits, ssl.labels)
        else:
            ssl_mean = ssl.task.loss(model, x, ssl.labels).mean()
    assert total.requires_grad and total.dim() == 0
    assert total.item() == pytest.approx((ce + LAMBDA * ssl_mean).item(), abs=1e-5)
    assert losses.ce.mean().item() == pytest.approx(ce.item(), abs=1e-5)
    assert losses.logits.shape == (n, 10)
    assert torch.equal(losses.logits.argmax(1), model(x).argmax(1))


@pytest.mark.parametrize("stacked", [False, True])
def test_update_loss_with_lambda_zero_is_plain_ce(stacked, images, model_with_rotation_head):
    model = model_with_rotation_head
    x, y = images
    ssl = _ssl_batch("one", len(y), stacked=stacked, weight=0.0)
    x_in = stack_inputs(x, ssl) if stacked else x
    total, losses = update_loss(model, x_in, y, ssl)
    assert losses.ssl is None  # λ = 0 skips the SSL forward
    assert total.item() == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-6)
    total_none, _ = update_loss(model, x, y, None)
    assert total_none.item() == pytest.approx(total.item(), abs=1e-6)
    # and the parameter gradients are those of plain CE (the rotation head gets none)
    model.zero_grad(set_to_none=True)
    total.backward()
    assert model.ssl_heads["rotation"].weight.grad is None
    g_update = model.head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert torch.allclose(g_update, model.head.weight.grad, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_compute_losses_with_four_rotations_reuses_the_unrotated_copy(images, model_with_rotation_head):
    model = model_with_rotation_head
    x, y = images
    ssl = _ssl_batch("all", len(y))
    losses = compute_losses(model, x, y, ssl)
    with torch.no_grad():
        assert torch.allclose(losses.logits, model(x), atol=1e-5)
        assert torch.allclose(losses.ssl, ssl.task.loss(model, x, ssl.labels), atol=1e-6)
