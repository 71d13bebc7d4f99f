"""Label-free robustness of the learned representation (Petrov and Kwiatkowska, arXiv 2210.04076).

f = `model.features` (the backbone's representation, before the classifier head). The attacks are
l∞ PGD with sign steps (`trainables.attacks.pgd`) on a representation objective:

- untargeted: maximise ‖f(x + δ) − f(x)‖², f(x) computed once on the clean image;
- targeted: minimise ‖f(x + δ) − f(x_t)‖² towards another image x_t's clean representation.

Measures (plain functions over representation tensors; definitions used here):

- normalised attack distance: ‖f(x̂) − f(x)‖ (untargeted) or ‖f(x̂) − f(x_t)‖ (targeted), divided by
  the median distance between clean representations of distinct test images (every pair i < j);
  averaged over the examples. Untargeted: larger means less robust; targeted: smaller means the
  attack moved x closer to its target, i.e. less robust.
- breakaway risk: for attacked representations a_i = f(x̂_i) (untargeted attack) and clean ones
  c_j = f(x_j), the fraction of pairs (i, j ≠ i) with ‖a_i − c_j‖ < ‖a_i − c_i‖: how often the
  attacked representation is closer to another image's clean representation than to its own.
- overlap risk: the examples are paired (i ↔ t(i)) and each image of a pair is attacked toward the
  other's clean representation: a_i = f(x̂_{i→t(i)}), a_t(i) = f(x̂_{t(i)→i}). Seen from c_i, the
  margin ratio m_i = (‖c_i − a_t(i)‖ − ‖c_i − a_i‖) / ‖c_i − c_t(i)‖ is negative when the partner,
  pushed toward x_i, lands closer to c_i than x_i pushed away toward its partner: the two images'
  perturbation sets overlap in representation space. Risk: P(m_i < 0) over both members of every
  pair. These are the distances the authors' evaluation records for a pair attacked both ways
  (d(x, x'→x), d(x, x→x'), d(x, x'); AleksandarPetrov/unsupervised-robustness, scripts/margin.py).

Both risks are 0 for an encoder that ignores the perturbation (a_i = c_i).

Certified robustness of the representation (`center_smoothing_records`): center smoothing of f
(Kumar and Goldstein 2021, `trainables.center_smoothing`), a bound per l2 input radius ε on how far
the smoothed representation can move, in l2 and normalised by the same median clean-pair distance.
"""
from __future__ import annotations

import torch

from .attacks import pgd
from .config import MNIST_FAMILY
from .records import EvalRecord

MEASURES = ("repr_distance_untargeted", "repr_distance_targeted", "breakaway_risk", "overlap_risk")
CENTER_SMOOTHING_MEASURES = ("center_smoothing_bound", "center_smoothing_bound_normalized",
                             "center_smoothing_abstain_rate")


def _sq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).flatten(1).pow(2).sum(1)


def representation_pgd(model, x: torch.Tensor, target_repr: torch.Tensor | None = None, *,
                       eps: float, steps: int, step_size: float,
                       generator: torch.Generator | None = None, random_start: bool = True,
                       bn_mode: str | None = "eval") -> torch.Tensor:
    """l∞ PGD in representation space: untargeted (maximise ‖f(x+δ) − f(x)‖²) when `target_repr` is
    None, else targeted (maximise −‖f(x+δ) − target_repr‖²). Returns x_adv (detached, in the ball)."""
    x = x.detach()
    if target_repr is None:
        with torch.no_grad(), _mode(model, bn_mode):
            anchor = model.features(x).detach()
        sign = 1.0
    else:
        anchor = target_repr.detach()
        sign = -1.0

    def objective(m, x_adv, _y):
        return sign * _sq_distance(m.features(x_adv), anchor)

    dummy = torch.zeros(len(x), dtype=torch.long, device=x.device)
    return pgd(model, x, dummy, objective, "linf", eps, step_size, steps, random_start=random_start,
               restarts=1, bn_mode=bn_mode, generator=generator)


def _mode(model, bn_mode):
    from .attacks import batchnorm_mode

    return batchnorm_mode(model, bn_mode)


def median_pair_distance(clean: torch.Tensor) -> float:
    """Median l2 distance between the clean representations of distinct examples (all i < j)."""
    c = clean.float().flatten(1)
    if len(c) < 2:
        raise ValueError("the median pair distance needs at least two representations")
    d = torch.cdist(c, c)
    i, j = torch.triu_indices(len(c), len(c), offset=1)
    return float(d[i, j].median())


def normalised_attack_distance(attacked: torch.Tensor, reference: torch.Tensor, scale: float) -> float:
    """Mean ‖attacked_i − reference_i‖ / scale (scale: e.g. `median_pair_distance` of clean reps)."""
    if not scale > 0:
        raise ValueError(f"the normalising distance must be > 0, got {scale}")
    return float(_sq_distance(attacked, reference).sqrt().mean()) / scale


def breakaway_risk(attacked: torch.Tensor, clean: torch.Tensor) -> float:
    """Fraction of pairs (i, j ≠ i) with ‖a_i − c_j‖ < ‖a_i − c_i‖ (see the module docstring)."""
    a, c = attacked.float().flatten(1), clean.float().flatten(1)
    n = len(c)
    if n < 2:
        raise ValueError("breakaway risk needs at least two examples")
    d = torch.cdist(a, c)  # d[i, j] = ‖a_i − c_j‖
    own = d.diagonal().unsqueeze(1)
    closer = (d < own)
    closer.fill_diagonal_(False)
    return float(closer.sum()) / (n * (n - 1))


def margin_ratio(attacked: torch.Tensor, clean: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """(‖c_i − a_p(i)‖ − ‖c_i − a_i‖) / ‖c_i − c_p(i)‖ for every i in a pair (p(p(i)) = i), where
    a_i is x_i attacked toward c_p(i) (see the module docstring); negative: overlap. Examples
    without a partner (p(p(i)) ≠ i, the odd one out) are left out."""
    index = torch.arange(len(partners), device=partners.device)
    paired = index[partners[partners] == index]
    if len(paired) == 0:
        raise ValueError("the overlap risk needs at least one pair attacked both ways")
    partner = partners[paired]
    c, a = clean[paired], attacked[paired]
    to_partner_attack = _sq_distance(c, attacked[partner]).sqrt()
    to_own_attack = _sq_distance(c, a).sqrt()
    apart = _sq_distance(c, clean[partner]).sqrt().clamp_min(1e-12)
    return (to_partner_attack - to_own_attack) / apart


def overlap_risk(attacked: torch.Tensor, clean: torch.Tensor, partners: torch.Tensor) -> float:
    """P(margin ratio < 0) over the paired examples (see the module docstring)."""
    return float((margin_ratio(attacked, clean, partners) < 0).double().mean())


def partner_pairs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A target index per example, never the example itself: random disjoint pairs i ↔ p(i), so
    each image of a pair is attacked toward the other. With n odd the one left over targets a
    random paired example (its attack counts in the targeted distance, not in the overlap risk)."""
    if n < 2:
        raise ValueError("targeted attacks need at least two examples")
    order = torch.randperm(n, generator=generator)
    partners = torch.empty(n, dtype=torch.long)
    half = n // 2 * 2
    partners[order[0:half:2]] = order[1:half:2]
    partners[order[1:half:2]] = order[0:half:2]
    if n % 2:
        partners[order[-1]] = order[int(torch.randint(half, (1,), generator=generator))]
    return partners


def default_eps(dataset: str) -> float:
    return 0.1 if dataset in MNIST_FAMILY else 8 / 255


def _features(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.features(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def _record(measure, value, n, clean_acc, attack="none", steps=0, step_size=0.0, radius=None) -> EvalRecord:
    return EvalRecord(
        attack=attack, attack_steps=int(steps), step_size=float(step_size),
        restarts=1 if attack != "none" else 0, n_examples=int(n),
        clean_acc=float("nan") if clean_acc is None else float(clean_acc),
        measure=measure, value=float(value), radius=None if radius is None else float(radius),
    )


def label_free_records(model, x: torch.Tensor, y: torch.Tensor, config: dict,
                       clean_acc: float | None = None) -> list[EvalRecord]:
    """The label-free measures of a trained model as result records (measure rows: `measure`,
    `value`, and `radius`: the l2 radius of certified accuracy, the l2 input radius ε of the center
    smoothing rows; norm, eps_test and robust_acc empty). Empty unless config["label_free_eval"]."""
    if not config.get("label_free_eval"):
        return []
    from .smoothing import certified_accuracy, certify

    model.eval()
    seed = int(config.get("seed", 0))
    batch_size = int(config.get("eval_batch_size", 500))
    n_keep = config.get("label_free_examples")
    if n_keep:
        x, y = x[: int(n_keep)], y[: int(n_keep)]
    n = len(x)
    eps = config.get("label_free_eps")
    eps = default_eps(config["dataset"]) if eps is None else float(eps)
    steps = int(config.get("label_free_steps", 10))
    step_size = float(config.get("eval_step_size_factor", 2.5)) * eps / steps
    generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + 17)

    clean = _features(model, x, batch_size)
    scale = median_pair_distance(clean)
    untargeted, targeted = [], []
    targets = partner_pairs(n, torch.Generator().manual_seed(seed)).to(x.device)
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size]
        x_u = representation_pgd(model, xb, None, eps=eps, steps=steps, step_size=step_size, generator=generator)
        x_t = representation_pgd(model, xb, clean[targets[i : i + batch_size]], eps=eps, steps=steps,
                                 step_size=step_size, generator=generator)
        untargeted.append(_features(model, x_u, batch_size))
        targeted.append(_features(model, x_t, batch_size))
    a_u, a_t = torch.cat(untargeted), torch.cat(targeted)
    target_clean = clean[targets]
    attack = dict(attack="repr_pgd", steps=steps, step_size=step_size)
    records = [
        _record("repr_distance_untargeted", normalised_attack_distance(a_u, clean, scale), n, clean_acc, **attack),
        _record("repr_distance_targeted", normalised_attack_distance(a_t, target_clean, scale), n, clean_acc, **attack),
        _record("breakaway_risk", breakaway_risk(a_u, clean), n, clean_acc, **attack),
        _record("overlap_risk", overlap_risk(a_t, clean, targets), n, clean_acc, **attack),
    ]
    certificate = certify(model, x, float(config.get("smoothing_sigma", 0.25)), int(config.get("smoothing_n0", 20)),
                          int(config.get("smoothing_n", 100)), float(config.get("smoothing_alpha", 0.001)),
                          batch_size=max(batch_size, 1), seed=seed)
    radii = config.get("smoothing_radii") or [0.0]
    for radius, acc in certified_accuracy(certificate, y, radii).items():
        records.append(_record("certified_acc", acc, n, clean_acc, radius=radius))
    abstained = float((certificate.prediction == -1).double().mean())
    records.append(_record("smoothing_abstain_rate", abstained, n, clean_acc))
    if config.get("center_smoothing_eps"):
        records += center_smoothing_records(model, x, config, scale, clean_acc, batch_size, seed)
    return records


def center_smoothing_records(model, x: torch.Tensor, config: dict, scale: float, clean_acc: float | None,
                             batch_size: int, seed: int) -> list[EvalRecord]:
    """Center smoothing of f = model.features (trainables.center_smoothing) on the first
    center_smoothing_examples images of x, per l2 input radius ε (in `radius`): the mean certified
    bound over the images certified at ε ("center_smoothing_bound", l2 in representation space, and
    "center_smoothing_bound_normalized", over `scale`) and the fraction abstained on
    ("center_smoothing_abstain_rate"). The bound rows are left out at an ε where every image abstained."""
    from .center_smoothing import center_certify, summarise
    from .device import prepare_input
    from .folding import folded_for_eval

    keep = config.get("center_smoothing_examples")
    x = x[: int(keep)] if keep else x
    folded = folded_for_eval(model)  # eval mode only: BatchNorm folded, the same function

    def features(batch):
        return folded.features(prepare_input(batch))

    certificate = center_certify(
        features, x, sigma=float(config.get("center_smoothing_sigma", 0.25)), eps=config["center_smoothing_eps"],
        n0=int(config.get("center_smoothing_n0", 100)), n=int(config.get("center_smoothing_n", 1000)),
        alpha=float(config.get("center_smoothing_alpha", 0.01)), delta=float(config.get("center_smoothing_delta", 0.25)),
        batch_size=max(batch_size, 1), seed=seed)
    records = []
    for eps, row in summarise(certificate, scale).items():
        for measure in CENTER_SMOOTHING_MEASURES:
            key = measure[len("center_smoothing_"):]
            if key in row:
                records.append(_record(measure, row[key], len(x), clean_acc, radius=eps))
    return records
