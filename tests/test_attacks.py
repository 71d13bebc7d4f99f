"""Tests for trainables/attacks.py and the robustness curve of trainables/evaluate.py.

Real small_cnn models trained on Fashion-MNIST (session fixtures in conftest.py), real attacks;
torchattacks 3.5.1 is the independent reference implementation of PGD.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from trainables.attacks import fgsm, pgd, random_delta
from trainables.config import default_eps_grid
from trainables.evaluate import robust_accuracy_curve

BALL_TOL = 1e-6


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).sum().item() / len(y)  # exact, as the evaluation counts


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


# --- agreement with torchattacks --------------------------------------------------------------


@pytest.fixture(scope="module")
def standard_cnn_float64(fmnist_standard_cnn):
    # Without random start both attacks are deterministic, so they must produce the same
    # examples. In float32, rounding differences (sum vs mean loss, δ vs x_adv bookkeeping) can
    # flip a ReLU or the sign of a near-zero gradient component after several steps and let one
    # example drift by ~1e-4; in float64 the two agree to ~1e-8. Our attack runs on the model as it
    # is here (fold_bn=False): the BatchNorm-folded copy computes the same function with different
    # rounding, which is enough to send 2 of these 64 examples down another (equally valid)
    # trajectory even in float64; test_eval_attack_on_the_folded_copy_finds_the_same_examples
    # bounds that.
    return copy.deepcopy(fmnist_standard_cnn).double().eval()


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 0.1, 0.02), ("l2", 1.0, 0.2)])
def test_pgd_matches_torchattacks_without_random_start(norm, eps, alpha, standard_cnn_float64,
                                                       fmnist_test_batch):
    model = standard_cnn_float64
    x, y = fmnist_test_batch
    x, y = x[:64].double(), y[:64]
    steps = 10
    model.train()  # both attacks must switch to eval mode themselves and restore train mode
    ours = pgd(model, x, y, norm=norm, eps=eps, step_size=alpha, steps=steps,
               random_start=False, bn_mode="eval", fold_bn=False)
    assert model.training
    attack = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    reference = attack(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert model.training
    model.eval()
    size = (ours - x).abs().flatten(1).amax(1) if norm == "linf" else _l2(ours - x)
    assert size.max() > 0.9 * eps  # the attack moved
    assert _accuracy(model, ours, y) < _accuracy(model, x, y) - 0.2
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0), (ours - reference).abs().max()


def test_pgd_linf_random_start_accuracy_matches_torchattacks(fmnist_adversarial_cnn, fmnist_test_batch,
                                                             fmnist_pgd10_accuracy):
    # Independent random starts (our generator vs torchattacks' global RNG, different seeds):
    # only the robust accuracy can agree, within sampling noise.
    model = fmnist_adversarial_cnn
    x, y = fmnist_test_batch
    n = fmnist_pgd10_accuracy["n"]
    x, y = x[:n], y[:n]
    torch.manual_seed(12345)
    reference = torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=10, random_start=True)(x, y)
    ref_acc = _accuracy(model, reference, y)
    ours_acc = fmnist_pgd10_accuracy["adversarial"]
    # A meaningful comparison: the attack hurts but does not reach zero on this model.
    assert 0.1 < ref_acc < fmnist_pgd10_accuracy["adversarial_clean"] - 0.05
    assert abs(ours_acc - ref_acc) <= 0.03, (ours_acc, ref_acc)


# --- the threat model: ε-ball and image range -------------------------------------------------


ATTACKS = {
    "pgd": lambda model, x, y, norm, eps, g: pgd(
        model, x, y, norm=norm, eps=eps, step_size=eps, steps=3, random_start=True, generator=g),
    "pgd_restarts": lambda model, x, y, norm, eps, g: pgd(
        model, x, y, norm=norm, eps=eps, step_size=0.7 * eps, steps=2, restarts=3, random_start=True,
        generator=g),
    "fgsm": lambda model, x, y, norm, eps, g: fgsm(model, x, y, norm=norm, eps=eps, generator=g),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
def test_perturbation_stays_in_ball_and_image_range(attack, norm, eps, fmnist_standard_cnn,
                                                    fmnist_test_batch):
    model = fmnist_standard_cnn
    x, y = fmnist_test_batch
    x, y = x[:48], y[:48]
    x_adv = ATTACKS[attack](model, x, y, norm, eps, torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = x_adv - x
    size = delta.abs().flatten(1).amax(1) if norm == "linf" else _l2(delta)
    assert size.max() <= eps + BALL_TOL
    # Non-vacuous: the attack uses its budget, and Fashion-MNIST's black background means the
    # [0, 1] clipping is active.
    assert size.max() >= 0.9 * eps
    assert ((x == 0) & (x_adv == 0)).any()
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y)


def test_fgsm_without_random_start_is_one_signed_gradient_step(fmnist_standard_cnn, fmnist_test_batch):
    model = fmnist_standard_cnn
    x, y = fmnist_test_batch
    x, y = x[:32], y[:32]
    eps = 0.05
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)
    expected = (x + eps * grad.sign()).clamp(0, 1)  # step 1.25ε, projected back to ε
    ours = fgsm(model, x, y, norm="linf", eps=eps, random_start=False)
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)


def test_pgd_works_under_no_grad_and_leaves_init_untouched(fmnist_standard_cnn, fmnist_test_batch):
    model = fmnist_standard_cnn
    x, y = fmnist_test_batch
    x, y = x[:16], y[:16]
    init = random_delta(x.shape, "linf", 0.1, "cpu", torch.Generator().manual_seed(3))
    init_copy = init.clone()
    expected = pgd(model, x, y, eps=0.1, step_size=0.03, steps=2, init=init)
    with torch.no_grad():
        got = pgd(model, x, y, eps=0.1, step_size=0.03, steps=2, init=init)
    assert torch.equal(init, init_copy)
    assert torch.equal(got, expected)
    assert not torch.equal(got, (x + init).clamp(0, 1))  # it took gradient steps


def test_pgd_accepts_an_objective_whose_gradient_is_expanded():
    # The gradient of a pixel sum is a stride-0 expanded tensor: the in-place update must not
    # write into it. Maximising the pixel sum moves every pixel up by ε (clipped at 1).
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)

    def pixel_sum(model, x_in, y_):
        return x_in.flatten(1).sum(1)

    got = pgd(torch.nn.Identity(), x, y, pixel_sum, "linf", eps=0.1, step_size=0.04, steps=3,
              random_start=False)
    assert torch.allclose(got, (x + 0.1).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_budget_returns_the_clean_images(norm, fmnist_standard_cnn, fmnist_test_batch):
    model = fmnist_standard_cnn
    x, y = fmnist_test_batch
    x, y = x[:16], y[:16]
    assert torch.equal(pgd(model, x, y, norm=norm, eps=0.0, step_size=0.1, steps=5, restarts=2), x)
    assert torch.equal(fgsm(model, x, y, norm=norm, eps=0.0), x)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_restarts_never_lower_the_objective(norm, eps, fmnist_standard_cnn, fmnist_test_batch):
    model = fmnist_standard_cnn
    x, y = fmnist_test_batch
    x, y = x[64:128], y[64:128]
    first = random_delta(x.shape, norm, eps, "cpu", torch.Generator().manual_seed(7))
    kwargs = dict(norm=norm, eps=eps, step_size=eps / 4, steps=3, random_start=True, init=first)
    one = pgd(model, x, y, restarts=1, generator=torch.Generator().manual_seed(1), **kwargs)
    three = pgd(model, x, y, restarts=3, generator=torch.Generator().manual_seed(2), **kwargs)
    loss_one, loss_three = _ce(model, one, y), _ce(model, three, y)
    assert (loss_three >= loss_one - 1e-6).all()
    assert (loss_three > loss_one + 1e-4).any()  # the extra restarts found something better


# --- robustness curves ------------------------------------------------------------------------


@pytest.mark.parametrize("norm,grid", [
    ("linf", default_eps_grid("fashion_mnist", "linf")),
    ("l2", [0.0, 0.5, 1.5, 3.0]),
])
def test_ascending_curve_is_monotone_exact_at_zero_and_never_above_attack_all(
        norm, grid, fmnist_adversarial_cnn, fmnist_test_batch):
    model = fmnist_adversarial_cnn
    x, y = fmnist_test_batch
    x, y = x[:100], y[:100]
    kwargs = dict(steps=3, step_size_factor=2.5, batch_size=40, seed=0)
    ascending = robust_accuracy_curve(model, x, y, norm, grid, **kwargs)
    every = robust_accuracy_curve(model, x, y, norm, grid, attack_all=True, **kwargs)
    assert [r["eps_test"] for r in ascending] == sorted(grid) == [r["eps_test"] for r in every]
    clean = _accuracy(model, x, y)
    for records in (ascending, every):
        assert records[0]["eps_test"] == 0.0
        assert records[0]["robust_acc"] == records[0]["clean_acc"]
        assert math.isclose(records[0]["clean_acc"], clean, abs_tol=1e-9)
        assert all(r["clean_acc"] == records[0]["clean_acc"] for r in records)
        assert all(r["n_examples"] == len(y) for r in records)
    acc_asc = [r["robust_acc"] for r in ascending]
    acc_all = [r["robust_acc"] for r in every]
    assert all(a >= b for a, b in zip(acc_asc, acc_asc[1:])), acc_asc
    assert all(a <= b + 1e-9 for a, b in zip(acc_asc, acc_all)), (acc_asc, acc_all)
    assert acc_all[-1] < clean - 0.2  # the largest ε really attacks


def test_curve_accuracy_matches_a_direct_attack_with_the_same_starts(fmnist_adversarial_cnn,
                                                                     fmnist_test_batch):
    # attack_all at one ε is just PGD on the clean-correct examples: reproduce it by hand.
    from trainables.evaluate import attack_seed

    model = fmnist_adversarial_cnn
    x, y = fmnist_test_batch
    x, y = x[100:164], y[100:164]
    eps, steps = 0.1, 3
    (record,) = [r for r in robust_accuracy_curve(model, x, y, "linf", [eps], steps=steps,
                                                  batch_size=64, seed=4, attack_all=True)]
    g = torch.Generator().manual_seed(attack_seed(4, "linf", eps))
    starts = random_delta(x.shape, "linf", eps, "cpu", g)
    x_adv = pgd(model, x, y, eps=eps, step_size=2.5 * eps / steps, steps=steps, init=starts)
    with torch.no_grad():
        correct = (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
    assert record["robust_acc"] == pytest.approx(correct.sum().item() / len(correct), abs=1e-9)
    assert record["attack_steps"] == steps and record["step_size"] == pytest.approx(2.5 * eps / steps)


# --- BatchNorm folding for eval-mode attacks ---------------------------------------------------


def _with_batchnorm_statistics(model):
    """Non-trivial running statistics and affine parameters, so folding has something to fold."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["small_cnn", "preact_resnet18"])
def test_folded_copy_computes_the_same_function_and_leaves_the_model_alone(arch):
    from trainables.data import dataset_info
    from trainables.folding import fold_batchnorm
    from trainables.models import build_model

    torch.manual_seed(0)
    info = dataset_info("fashion_mnist" if arch == "small_cnn" else "cifar10")
    model = _with_batchnorm_statistics(build_model(arch, info))
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    x = torch.rand(8, info.channels, info.size, info.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(folded.features(x), model.features(x), rtol=1e-4, atol=1e-5)
    def batchnorms(m):
        return sum(isinstance(c, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for c in m.modules())
    # small_cnn: every BatchNorm follows a conv or linear layer; PreAct blocks put BN first (kept)
    assert batchnorms(folded) == (0 if arch == "small_cnn" else batchnorms(model))
    assert all(not p.requires_grad for p in folded.parameters())
    assert batchnorms(model) > 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_folded_copy_is_cached_until_the_model_changes():
    from trainables.data import dataset_info
    from trainables.folding import folded_for_eval
    from trainables.models import build_model

    torch.manual_seed(0)
    model = _with_batchnorm_statistics(build_model("small_cnn", dataset_info("fashion_mnist")))
    first = folded_for_eval(model)
    assert folded_for_eval(model) is first
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()  # new weights and, in train mode, new running statistics
    model.eval()
    second = folded_for_eval(model)
    assert second is not first
    with torch.no_grad():
        torch.testing.assert_close(second(x), model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(first(x), model(x), atol=1e-3)


def test_eval_attack_on_the_folded_copy_finds_the_same_examples(fmnist_standard_cnn, fmnist_test_batch):
    x, y = fmnist_test_batch
    x, y = x[:200], y[:200]
    kwargs = dict(norm="linf", eps=0.1, step_size=0.025, steps=5, random_start=False, bn_mode="eval")
    folded = pgd(fmnist_standard_cnn, x, y, **kwargs)
    plain = pgd(fmnist_standard_cnn, x, y, fold_bn=False, **kwargs)
    # Float rounding may flip the sign of a near-zero gradient coordinate and send an example down
    # another trajectory: most examples must agree exactly, and the accuracies closely.
    differs = (folded - plain).abs().flatten(1).amax(1) > 1e-5
    assert float(differs.float().mean()) <= 0.05, int(differs.sum())
    assert abs(_accuracy(fmnist_standard_cnn, folded, y) - _accuracy(fmnist_standard_cnn, plain, y)) <= 0.02


# --- stopping at the first successful iterate ---------------------------------------------------


def test_stop_on_success_keeps_a_fooling_iterate_inside_the_ball(fmnist_adversarial_cnn, fmnist_test_batch):
    model = fmnist_adversarial_cnn
    x, y = fmnist_test_batch
    x, y = x[:200], y[:200]
    starts = random_delta(x.shape, "linf", 0.15, "cpu", torch.Generator().manual_seed(3))
    kwargs = dict(norm="linf", eps=0.15, step_size=0.15 / 4, steps=10, init=starts)
    last = pgd(model, x, y, **kwargs)
    first = pgd(model, x, y, stop_on_success=True, **kwargs)
    assert float((first - x).abs().max()) <= 0.15 + BALL_TOL and first.min() >= 0 and first.max() <= 1
    with torch.no_grad():
        fooled_last = model(last).argmax(1) != y
        fooled_first = model(first).argmax(1) != y
    # every example the last iterate fools is fooled by the first successful one too (up to the
    # rounding a shrinking batch may bring); some are fooled only at an intermediate iterate
    assert int((fooled_last & ~fooled_first).sum()) <= 2
    assert int(fooled_first.sum()) >= int(fooled_last.sum())
    # restarts attack only the examples not fooled yet: never fewer fooled than one restart
    again = pgd(model, x, y, stop_on_success=True, restarts=3, generator=torch.Generator().manual_seed(4), **kwargs)
    assert float((again - x).abs().max()) <= 0.15 + BALL_TOL
    with torch.no_grad():
        assert int((model(again).argmax(1) != y).sum()) >= int(fooled_first.sum())
    with pytest.raises(ValueError, match="cross-entropy"):
        pgd(model, x, y, objective=lambda m, a, b: m(a).sum(1), stop_on_success=True, **kwargs)


def test_curve_with_stop_on_success_is_never_above_the_last_iterate_curve(fmnist_adversarial_cnn,
                                                                          fmnist_test_batch):
    from trainables.config import ConfigError, resolve

    model = fmnist_adversarial_cnn
    x, y = fmnist_test_batch
    grid = [0.0, 0.05, 0.1, 0.2]
    kwargs = dict(steps=5, batch_size=100, seed=1)
    last = robust_accuracy_curve(model, x, y, "linf", grid, **kwargs)
    first = robust_accuracy_curve(model, x, y, "linf", grid, stop_on_success=True, **kwargs)
    assert [r["attack"] for r in first] == ["none"] + ["pgd_any_iterate"] * 3
    acc_last, acc_first = [r["robust_acc"] for r in last], [r["robust_acc"] for r in first]
    assert acc_first[0] == acc_last[0]
    assert all(a <= b + 2 / len(y) for a, b in zip(acc_first, acc_last)), (acc_first, acc_last)
    assert all(a >= b for a, b in zip(acc_first, acc_first[1:]))
    assert resolve({})["eval_stop_on_success"] is True
    assert resolve({"eval_stop_on_success": False})["eval_stop_on_success"] is False
    with pytest.raises(ConfigError, match="eval_stop_on_success"):
        resolve({"eval_stop_on_success": "yes"})
