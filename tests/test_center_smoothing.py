"""Center smoothing (Kumar and Goldstein 2021) on functions whose smoothed output is known: a linear
map, where the bound has a closed form, a smooth network as σ shrinks, and the abstention paths.
(The label_free study's center-smoothing rows, metrics and figure: tests/test_label_free.py.)"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from trainables import center_smoothing as cs
from trainables.config import ConfigError, center_smoothing_min_n0, resolve

def _linear(gain: float = 3.0):
    """f(x) = A·vec(x), A (2, 16) with orthonormal rows times `gain`: ‖A‖₂ = gain, and f(x + N) is
    N(Ax, (gain·σ)²·I₂), whose distances to Ax are gain·σ·χ₂ (quantile: gain·σ·√(−2 ln(1 − q)))."""
    q, _ = torch.linalg.qr(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))
    a = gain * q.T
    return a, (lambda x: x.flatten(1) @ a.T)


def test_linear_map_certificate_holds_and_matches_the_hand_bound():
    a, f = _linear(3.0)
    norm = float(torch.linalg.matrix_norm(a, ord=2))
    assert norm == pytest.approx(3.0, rel=1e-5)
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    sigma, delta, alpha, n0, n = 0.25, 0.15, 0.01, 1000, 4000
    eps = [0.1, 0.25, 0.5]
    cert = cs.center_certify(f, x, sigma=sigma, eps=eps, n0=n0, n=n, alpha=alpha, delta=delta, seed=0)
    assert cert.smoothed.all() and (cert.delta_hat <= delta).all()
    # the smoothed output is (close to) f(x): the Gaussian image is symmetric about Ax
    assert ((cert.center - f(x)).norm(dim=1) < 0.3 * norm * sigma).all()
    for j, e in enumerate(eps):
        q = stats.norm.cdf(stats.norm.ppf(0.5 + delta) + e / sigma) + math.sqrt(math.log(2 / alpha) / (2 * n))
        assert cs.quantile_level(e, sigma, delta, n, alpha / 2) == pytest.approx(q)
        if q > 1:  # ε = 0.5: beyond what n samples can certify at this σ
            assert e == 0.5 and torch.isnan(cert.bound[:, j]).all()
            continue
        hand = 3 * norm * sigma * math.sqrt(-2 * math.log(1 - q))  # (1 + β)·R with β = 2
        bound = cert.bound[:, j]
        assert float(bound.mean()) == pytest.approx(hand, rel=0.05)  # not vacuous: the closed form
        assert (bound - hand).abs().max() < 0.1 * hand
        assert (bound > norm * e).all()  # above how far the smoothed output really moves
    # the certificate holds: shift every input by ε along A's top input direction (the output moves
    # by ‖A‖₂·ε) and smooth again with other noise
    _, _, vh = torch.linalg.svd(a)
    v = vh[0].view(1, 1, 4, 4)
    for j, e in enumerate(eps[:2]):
        moved = cs.center_certify(f, x + e * v, sigma=sigma, eps=[e], n0=n0, n=200, alpha=alpha, delta=delta, seed=7)
        assert moved.smoothed.all()
        shift = (moved.center - cert.center).norm(dim=1).double()
        assert (shift <= cert.bound[:, j]).all()
        assert float(shift.mean()) == pytest.approx(norm * e, abs=0.5 * norm * sigma)


class _Smooth(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                                        torch.nn.Linear(8, 6), torch.nn.Tanh())

    def forward(self, x):
        return self.body(x)


def test_with_vanishing_sigma_the_smoothed_output_tends_to_f_of_x():
    f = _Smooth().eval()
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = f(x)
    errors, bounds = [], []
    for sigma in (1e-1, 1e-2, 1e-4):
        cert = cs.center_certify(f, x, sigma=sigma, eps=[sigma], n0=400, n=2000, delta=0.2, seed=0)
        assert cert.smoothed.all() and not cert.abstained.any()
        errors.append(float((cert.center - clean).norm(dim=1).max()))
        bounds.append(float(cert.bound.mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4
    # near x the network is linear, so the bound at ε = σ scales with σ
    assert bounds[2] / bounds[1] == pytest.approx(1e-2, rel=0.3)


def test_abstains_when_the_centre_check_or_the_quantile_fails():
    _, f = _linear(1.0)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    # Δ1 = √(ln(2/α1)/(2·n0)) = 0.19 for n0 = 100 exceeds Δ = 0.1: the centre check always fails
    assert cs.sampling_error(100, 0.005) > 0.1
    cert = cs.center_certify(f, x, sigma=0.25, eps=[0.05, 0.1], n0=100, n=200, alpha=0.01, delta=0.1)
    assert not cert.smoothed.any() and cert.abstained.all() and (cert.delta_hat > 0.1).all()
    summary = cs.summarise(cert, scale=1.0)
    assert summary == {0.05: {"abstain_rate": 1.0}, 0.1: {"abstain_rate": 1.0}}
    # a large enough n0 passes the check; then only the ε whose quantile level exceeds 1 abstain
    cert = cs.center_certify(f, x, sigma=0.25, eps=[0.05, 1.0], n0=400, n=200, alpha=0.01, delta=0.25)
    assert cert.smoothed.all()
    assert cs.quantile_level(1.0, 0.25, 0.25, 200, 0.005) > 1 >= cs.quantile_level(0.05, 0.25, 0.25, 200, 0.005)
    assert not cert.abstained[:, 0].any() and cert.abstained[:, 1].all()
    summary = cs.summarise(cert, scale=2.0)
    assert summary[1.0] == {"abstain_rate": 1.0}
    assert summary[0.05]["abstain_rate"] == 0.0
    assert summary[0.05]["bound_normalized"] == pytest.approx(summary[0.05]["bound"] / 2.0)
    assert summary[0.05]["bound"] == pytest.approx(float(cert.bound[:, 0].mean()))


def test_check_terms_by_hand_and_bad_arguments():
    d1 = math.sqrt(math.log(2 / 0.005) / 200)
    assert cs.delta_hat(30, 100, 0.005) == pytest.approx(0.5 - (0.3 - d1))  # too few inside: Δ2 wins
    assert cs.delta_hat(90, 100, 0.005) == pytest.approx(d1)  # Δ2 < Δ1
    with pytest.raises(ValueError):
        cs.delta_hat(101, 100, 0.005)
    # the config refuses an n0 with which every image would abstain, and names the fix
    need = center_smoothing_min_n0(0.01, 0.05)
    assert cs.sampling_error(need, 0.005) <= 0.05 < cs.sampling_error(need - 1, 0.005)
    assert resolve({"label_free_eval": True, "center_smoothing_n0": need, "center_smoothing_delta": 0.05})
    with pytest.raises(ConfigError, match=f"center_smoothing_n0 >= {need}"):
        resolve({"label_free_eval": True, "center_smoothing_n0": need - 1, "center_smoothing_delta": 0.05})
    assert resolve({"center_smoothing_n0": 10})["center_smoothing_n0"] == 10  # no label-free run: no check
    assert resolve({"label_free_eval": True, "center_smoothing_n0": 10, "center_smoothing_eps": []})
    with pytest.raises(ConfigError, match="center_smoothing_delta"):
        resolve({"center_smoothing_delta": 0.5})
    assert resolve({"center_smoothing_eps": [0.2, 0.1, 0.2]})["center_smoothing_eps"] == [0.1, 0.2]
    _, f = _linear()
    x = torch.zeros(1, 1, 4, 4)
    for bad in (dict(sigma=0.0), dict(n0=0), dict(alpha=1.0), dict(delta=0.5), dict(eps=[-0.1])):
        args = dict(sigma=0.25, eps=[0.1], n0=10, n=10) | bad
        with pytest.raises(ValueError):
            cs.center_certify(f, x, **args)


def test_batching_does_not_change_the_result():
    _, f = _linear()
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    args = dict(sigma=0.25, eps=[0.05], n0=64, n=128, delta=0.3, seed=5)
    one = cs.center_certify(f, x, batch_size=1000, **args)
    # the same noise stream cut into batches of 7 copies
    many = cs.center_certify(f, x, batch_size=7 * 64, **args)
    assert torch.equal(one.center, many.center) and torch.equal(one.delta_hat, many.delta_hat)
    torch.testing.assert_close(one.bound, many.bound, rtol=0, atol=0, equal_nan=True)
