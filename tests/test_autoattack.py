"""APGD, FAB-T, Square and AutoAttack (trainables.apgd, fab, square, autoattack): exact properties,
bad input, the BatchNorm-folded copy never stale, and agreement with torchattacks 3.5.1 (the
independent reference) on 200 Fashion-MNIST test images of the session's adversarially trained
small_cnn. Step and query budgets are cut to keep CI short; the full budgets on 500 images are
compared by benchmarks/bench_autoattack_curve.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from trainables.apgd import apgd, apgd_checkpoints, apgd_targeted
from trainables.autoattack import STANDARD, autoattack
from trainables.dlr import dlr_loss, dlr_targeted_loss
from trainables.evaluate import robust_accuracy_curve
from trainables.fab import FabSearches, fab_targeted, project_on_hyperplane_in_box
from trainables.square import square, square_fraction

N = 200
EPS = 0.1  # ε_train of the session model


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def batch(fmnist_test_batch):
    x, y = fmnist_test_batch
    return x[:N], y[:N]


class Scaled(torch.nn.Module):
    """The same classifier with its logits multiplied by `factor` (same predictions): a model whose
    cross-entropy gradient vanishes, the textbook case of gradient masking."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


class Recorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


# --- exact properties --------------------------------------------------------------------------

def test_dlr_is_invariant_to_shifting_and_scaling_the_logits():
    g = torch.Generator().manual_seed(0)
    z, y, t = torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g), torch.randint(0, 10, (64,), generator=g)
    for transform in (lambda z: z + 7.5, lambda z: 1e4 * z, lambda z: 0.01 * z - 3.0):
        torch.testing.assert_close(dlr_loss(transform(z.double()), y), dlr_loss(z.double(), y))
        torch.testing.assert_close(dlr_targeted_loss(transform(z.double()), y, t), dlr_targeted_loss(z.double(), y, t))
    # positive exactly where the logits misclassify
    assert torch.equal(dlr_loss(z, y) > 0, z.argmax(1) != y)


def test_apgd_step_size_schedule_matches_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of N = 100 (Croce and Hein 2020, Sec. 3.2)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == list(range(2, 11))
    assert apgd_checkpoints(1000)[:3] == [220, 410, 570]


def test_square_fraction_schedule():
    assert square_fraction(0.8, 0, 5000) == 0.8
    assert square_fraction(0.8, 100, 5000) == 0.8 / 4  # 200 of 10,000
    assert square_fraction(0.8, 4999, 5000) == 0.8 / 512


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_onto_hyperplane_in_box_is_feasible_and_minimal_on_an_easy_case(norm):
    p = torch.full((1, 4), 0.5, dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    d = project_on_hyperplane_in_box(p, w, torch.tensor([0.2], dtype=torch.float64), norm)
    torch.testing.assert_close((w * d).sum(1), torch.tensor([0.2], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(d, torch.tensor([[0.1, 0.1, 0.0, 0.0]], dtype=torch.float64), atol=1e-6, rtol=0)
    assert ((p + d) >= 0).all() and ((p + d) <= 1).all()


@pytest.mark.parametrize("attack", ["apgd_ce", "apgd_t", "square"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_every_iterate_stays_in_the_ball_and_in_the_image_range(attack, norm, eps, fmnist_adversarial_cnn, batch):
    x, y = batch[0][:32], batch[1][:32]
    model = Recorder(copy.deepcopy(fmnist_adversarial_cnn))
    g = torch.Generator().manual_seed(0)
    if attack == "apgd_ce":
        apgd(model, x, y, "ce", norm, eps, steps=10, generator=g, fold_bn=False)
    elif attack == "apgd_t":
        apgd_targeted(model, x, y, norm, eps, steps=5, n_target_classes=2, generator=g, fold_bn=False)
    else:
        square(model, x, y, norm, eps, n_queries=30, generator=g, fold_bn=False)
    assert len(model.inputs) > 5
    for xi in model.inputs:
        assert xi.min() >= 0 and xi.max() <= 1
        # each recorded batch is a subset of x: compare against the nearest clean image
        dist = torch.cdist(xi.flatten(1).double(), x.flatten(1).double(), p=float("inf") if norm == "linf" else 2.0,
                           compute_mode="donot_use_mm_for_euclid_dist").amin(1)
        assert (dist <= eps * (1 + 1e-5) + 1e-6).all()


def test_fab_returns_only_adversarial_examples_inside_the_ball(fmnist_adversarial_cnn, batch):
    x, y = batch[0][:64], batch[1][:64]
    x_adv = fab_targeted(fmnist_adversarial_cnn, x, y, "linf", EPS, steps=10, n_target_classes=2)
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.any()
    assert ((x_adv - x).abs().flatten(1).amax(1) <= EPS * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (fmnist_adversarial_cnn(x_adv[changed]).argmax(1) != y[changed]).all()


def test_fab_searches_kept_across_eps_fool_the_same_examples_and_skip_searched_targets(fmnist_adversarial_cnn,
                                                                                       batch):
    # FAB-T's search does not use ε: with the searches of a smaller ε kept, a larger ε finds an
    # adversarial example within ε for exactly the examples a fresh FAB-T finds one for, and the
    # targets already searched are not run again. (Which examples FAB returns changed is compared,
    # not a second forward pass: FAB's points lie on the boundary, where another batch can flip them.)
    model = Recorder(fmnist_adversarial_cnn)
    x, y = batch[0][:48], batch[1][:48]
    small, large = 0.05, 0.12

    def changed(x_adv):
        return (x_adv != x).flatten(1).any(1)

    fresh = fab_targeted(model, x, y, "linf", large, steps=8, n_target_classes=3, fold_bn=False)
    fresh_calls = len(model.inputs)
    searches = FabSearches.for_images(x)
    at_small = fab_targeted(model, x, y, "linf", small, steps=8, n_target_classes=3, fold_bn=False,
                            searches=searches)
    model.inputs.clear()
    kept = fab_targeted(model, x, y, "linf", large, steps=8, n_target_classes=3, fold_bn=False, searches=searches)
    assert changed(at_small).sum() < changed(kept).sum()
    assert torch.equal(changed(kept), changed(fresh))
    assert ((kept - x).abs().flatten(1).amax(1) <= large * (1 + 1e-5)).all()
    assert len(model.inputs) < fresh_calls / 2
    assert searches.searched.max() == 3


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", [
    lambda m, x, y, eps: apgd(m, x, y, "ce", "linf", eps, steps=2),
    lambda m, x, y, eps: apgd_targeted(m, x, y, "linf", eps, steps=2, n_target_classes=1),
    lambda m, x, y, eps: fab_targeted(m, x, y, "linf", eps, steps=2, n_target_classes=1),
    lambda m, x, y, eps: square(m, x, y, "linf", eps, n_queries=2),
    lambda m, x, y, eps: autoattack(m, x, y, "linf", eps, steps=2, n_target_classes=1, n_queries=2),
    lambda m, x, y, eps: robust_accuracy_curve(m, x, y, "linf", [0.0, eps], attack="apgd", apgd_steps=2),
])
def test_bad_input_is_a_one_line_value_error(attack, fmnist_standard_cnn, batch):
    x, y = batch[0][:8], batch[1][:8]
    cases = [
        (x * 255, 0.1, "must lie in [0, 1]"),
        (x, -0.1, "eps must be a number >= 0"),
        (torch.where(x > 0.5, float("nan"), x), 0.1, "contain NaN"),
    ]
    for images, eps, message in cases:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
            attack(fmnist_standard_cnn, images, y, eps)
        assert "\n" not in str(err.value)
    broken = Scaled(fmnist_standard_cnn, float("nan"))
    with pytest.raises(ValueError, match="output contains NaN") as err:
        attack(broken, x, y, 0.1)
    assert "\n" not in str(err.value)


# --- the folded copy is never stale --------------------------------------------------------------

def _change_by(route, model):
    params = list(model.parameters())
    if route == "optimizer":
        opt = torch.optim.SGD(params, lr=1.0)
        x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
        model.eval()
        F.cross_entropy(model(x), torch.arange(8)).backward()
        opt.step()
    elif route == "data":
        for p in params:
            p.data.mul_(-1.5)
    elif route == "vector_to_parameters":
        vec = torch.cat([p.detach().reshape(-1) for p in params])  # reshape: channels_last weights
        torch.nn.utils.vector_to_parameters(-1.5 * vec, params)
    else:
        names = {name for name, _ in model.named_parameters()}
        state = {k: (-1.5 * v if k in names else v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)


@pytest.mark.parametrize("route", ["optimizer", "data", "vector_to_parameters", "load_state_dict"])
def test_attacks_see_the_current_weights_whatever_changed_them(route, fmnist_standard_cnn, batch):
    model = copy.deepcopy(fmnist_standard_cnn).eval()
    x, y = batch[0][:64], batch[1][:64]
    apgd(model, x, y, "ce", "linf", 0.05, steps=2)  # builds and caches the folded copy
    _change_by(route, model)
    model.eval()
    from trainables.folding import folded_for_eval

    with torch.no_grad():
        torch.testing.assert_close(folded_for_eval(model)(x), model(x), rtol=1e-4, atol=1e-4)
    # and the attack on it: what APGD returns as fooling iterates fool the current model
    x_adv = apgd(model, x, y, "ce", "linf", 0.05, steps=3, generator=torch.Generator().manual_seed(5))
    assert _accuracy(model, x_adv, y) <= _accuracy(model, x, y) + 2 / 64


# --- agreement with torchattacks -----------------------------------------------------------------
# Both attack the same 200 images; independent random starts make the accuracies differ by
# chance. Margin 0.03 (6 images): the attacks are strong and agree on most images, so the paired
# difference has a standard error below 0.01.

def test_apgd_ce_matches_torchattacks(fmnist_adversarial_cnn, batch):
    x, y = batch
    ours = _accuracy(fmnist_adversarial_cnn, apgd(fmnist_adversarial_cnn, x, y, "ce", "linf", EPS, steps=25,
                                                  generator=torch.Generator().manual_seed(0)), y)
    ref = _accuracy(fmnist_adversarial_cnn, torchattacks.APGD(fmnist_adversarial_cnn, eps=EPS, steps=25, loss="ce")(x, y), y)
    assert abs(ours - ref) <= 0.03, (ours, ref)


def test_apgd_targeted_matches_torchattacks(fmnist_adversarial_cnn, batch):
    x, y = batch
    ours = _accuracy(fmnist_adversarial_cnn, apgd_targeted(fmnist_adversarial_cnn, x, y, "linf", EPS, steps=15,
                                                           n_target_classes=3, generator=torch.Generator().manual_seed(0)), y)
    ref_attack = torchattacks.APGDT(fmnist_adversarial_cnn, eps=EPS, steps=15, n_classes=4)  # 3 targets
    ref = _accuracy(fmnist_adversarial_cnn, ref_attack(x, y), y)
    assert abs(ours - ref) <= 0.03, (ours, ref)


def test_fab_targeted_matches_torchattacks(fmnist_adversarial_cnn, batch):
    x, y = batch[0][:100], batch[1][:100]
    ours = _accuracy(fmnist_adversarial_cnn, fab_targeted(fmnist_adversarial_cnn, x, y, "linf", EPS, steps=20,
                                                          n_target_classes=2), y)
    ref_attack = torchattacks.FAB(fmnist_adversarial_cnn, eps=EPS, steps=20, multi_targeted=True, n_classes=3)
    ref = _accuracy(fmnist_adversarial_cnn, ref_attack(x, y), y)
    assert abs(ours - ref) <= 0.04, (ours, ref)


def test_square_matches_torchattacks(fmnist_adversarial_cnn, batch):
    # random search with different random numbers: margin 0.05 on 100 images
    x, y = batch[0][:100], batch[1][:100]
    ours = _accuracy(fmnist_adversarial_cnn, square(fmnist_adversarial_cnn, x, y, "linf", EPS, n_queries=300,
                                                    generator=torch.Generator().manual_seed(0)), y)
    ref = _accuracy(fmnist_adversarial_cnn, torchattacks.Square(fmnist_adversarial_cnn, eps=EPS, n_queries=300)(x, y), y)
    assert abs(ours - ref) <= 0.05, (ours, ref)


# --- the evaluation curve ---------------------------------------------------------------------------

def test_autoattack_curve_is_monotone_and_credits_each_fooled_example_once(fmnist_adversarial_cnn, batch):
    x, y = batch[0][:100], batch[1][:100]
    records = robust_accuracy_curve(fmnist_adversarial_cnn, x, y, "linf", [0.0, 0.05, 0.1], attack="autoattack",
                                    apgd_steps=10, target_classes=2, square_queries=50)
    import json

    accs = [r["robust_acc"] for r in records]
    assert accs == sorted(accs, reverse=True) and records[0]["attack"] == "none"
    assert [r["attack"] for r in records[1:]] == ["autoattack", "autoattack"]
    previous = records[0]["robust_acc"]
    for r in records[1:]:
        taken = json.loads(r["fooled_by"])
        assert list(taken) == list(STANDARD)
        assert round((previous - r["robust_acc"]) * len(x)) == sum(taken.values())
        previous = r["robust_acc"]


def test_default_evaluation_is_not_fooled_by_scaling_the_logits(fmnist_adversarial_cnn, batch):
    # The shipped studies' default evaluation gives a model and the same model with logits ×10^4
    # (same predictions) the same robust accuracy; CE-PGD stalls on the scaled one (its gradient
    # underflows), which is what the default must not do.
    from orchestrator.spec import load_study
    from trainables.config import resolve

    config = resolve(load_study("weight_sweep").fixed)
    x, y = batch
    scaled = Scaled(fmnist_adversarial_cnn, 1e4)

    def curve(model, attack):
        return robust_accuracy_curve(
            model, x, y, "linf", [0.0, EPS], steps=config["eval_attack_steps"], attack=attack,
            apgd_steps=config["eval_apgd_steps"], target_classes=config["eval_target_classes"],
            stop_on_success=True)[-1]["robust_acc"]

    assert config["eval_attack"] in ("apgd", "autoattack")
    plain, masked = curve(fmnist_adversarial_cnn, config["eval_attack"]), curve(scaled, config["eval_attack"])
    assert abs(plain - masked) <= 0.02, (plain, masked)
    assert curve(scaled, "pgd") > masked + 0.1  # the check can fail: CE-PGD is fooled by the scale


# --- gradient-masking checks -----------------------------------------------------------------------

def test_masking_checks_fire_on_masked_models_and_not_on_the_plain_one(fmnist_adversarial_cnn, batch):
    from trainables.masking import fired, masking_checks

    x, y = batch
    x, y = x[:100], y[:100]
    plain = masking_checks(fmnist_adversarial_cnn, x, y, "linf", EPS, still_robust=None)
    assert fired(plain) == [], plain
    scaled = masking_checks(Scaled(fmnist_adversarial_cnn, 1e4), x, y, "linf", EPS, still_robust=None)
    assert "zero_gradient" in fired(scaled) and scaled["zero_gradient_value"] > 0.5, scaled

    class Softmax(torch.nn.Module):
        def forward(self, x):
            return fmnist_adversarial_cnn(x).softmax(1)

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return fmnist_adversarial_cnn(x + 0.05 * torch.randn_like(x))

    assert "probability_output" in fired(masking_checks(Softmax(), x[:40], y[:40], "linf", 0.0))
    assert "randomised_output" in fired(masking_checks(Noisy(), x[:40], y[:40], "linf", 0.0))


# --- bf16 search, fp32 verdicts ----------------------------------------------------------------

class RoundingTie(torch.nn.Module):
    """Ten logits: z_0 = 101.1 + 4·(mean pixel − 0.5), z_1 = 101.2, the rest far below. On a grey
    image (every pixel 0.5) with y = 1 the full-precision model is correct, and raising the mean
    pixel by more than 0.025 (inside an l∞ ball of 0.1) fools it. bf16 (spacing 0.5 near 100) rounds
    both top logits to 101.0 on the grey image and argmax picks class 0: a bf16 pass says the
    example is fooled before the attack has done anything. An attack that believed it would stop
    there and return an image the model classifies correctly."""

    def __init__(self):
        super().__init__()
        # one linear layer, so that autocast computes the logits in bf16
        self.linear = torch.nn.Linear(28 * 28, 10)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[0] = 4 / (28 * 28)
            self.linear.bias.copy_(torch.tensor([99.1, 101.2, 50.0, 40.0, 30.0, 20.0, 10.0, 0.0, -10.0, -20.0]))

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("attack", ["apgd_ce", "apgd_t", "square", "pgd_any_iterate", "autoattack"])
def test_under_bf16_autocast_an_attack_stops_only_on_what_fools_the_fp32_model(attack):
    from trainables.attacks import pgd

    model = RoundingTie().eval()
    x = torch.full((8, 1, 28, 28), 0.5)
    y = torch.ones(8, dtype=torch.long)
    assert (model(x).argmax(1) == y).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (model(x).argmax(1) == 0).all()  # the premise: bf16 calls the clean images fooled
        if attack == "apgd_ce":
            x_adv = apgd(model, x, y, "ce", "linf", EPS, 10)
        elif attack == "apgd_t":
            x_adv = apgd_targeted(model, x, y, "linf", EPS, 10, 1)
        elif attack == "square":
            x_adv = square(model, x, y, "linf", EPS, 200, generator=torch.Generator().manual_seed(0))
        elif attack == "pgd_any_iterate":
            x_adv = pgd(model, x, y, norm="linf", eps=EPS, step_size=EPS / 4, steps=10, bn_mode="eval",
                        stop_on_success=True)
        else:
            x_adv, fooled_by = autoattack(model, x, y, "linf", EPS, steps=10, n_target_classes=1, n_queries=200)
            assert (fooled_by >= 0).all()
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert (model(x_adv).argmax(1) != y).all()  # fp32: each example was really fooled


def test_fab_searches_in_fp32_inside_an_autocast_region(fmnist_adversarial_cnn, batch):
    x, y = batch[0][:40], batch[1][:40]
    plain = fab_targeted(fmnist_adversarial_cnn, x, y, "linf", EPS, 10, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fab_targeted(fmnist_adversarial_cnn, x, y, "linf", EPS, 10, 2)
    assert torch.equal(plain, inside)
    assert not torch.equal(plain, x)  # it fooled some: the comparison is not between two no-ops


AUTOCAST_SEEN: list[bool] = []  # outside the probe: the attacks run on a (BatchNorm-folded) deep copy


class AutocastProbe(torch.nn.Module):
    """The model, noting in AUTOCAST_SEEN for each forward whether it ran inside an autocast region."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        AUTOCAST_SEEN.append(torch.is_autocast_enabled(x.device.type))
        return self.model(x)


def test_eval_precision_reaches_the_attacks_and_changes_only_the_search(fmnist_adversarial_cnn, batch):
    from trainables.config import resolve
    from trainables.device import uses_bf16
    from trainables.evaluate_model import evaluate_model

    x, y = batch[0][:40], batch[1][:40]
    curves = {}
    for precision in ("auto", "fp32", "bf16"):
        AUTOCAST_SEEN.clear()
        config = resolve({"eval_attack": "apgd", "eval_apgd_steps": 5, "eval_target_classes": 1, "eval_attack_steps": 2,
                          "eval_eps_linf": [0.0, 0.1], "eval_precision": precision})
        records = evaluate_model(AutocastProbe(fmnist_adversarial_cnn), x, y, config)
        assert AUTOCAST_SEEN and any(AUTOCAST_SEEN) == uses_bf16(x.device, precision)
        curves[precision] = [(r["eps_test"], r["clean_acc"], r["robust_acc"]) for r in records if r["norm"] == "linf"]
    assert curves["auto"] == curves["fp32"]  # "auto" is fp32 on CPU: earlier results unchanged
    assert [c[:2] for c in curves["bf16"]] == [c[:2] for c in curves["fp32"]]  # clean accuracy is fp32's
    for (_, _, bf16), (_, _, fp32) in zip(curves["bf16"], curves["fp32"]):
        assert abs(bf16 - fp32) <= 0.05  # 2 of 40 images: the same attack, searching in bf16
