"""Test-time defence by SSL reversal (Mao et al. 2021; multi-task: Lawhon, Mao and Yang 2022).

Before classifying an image x, find r with ‖r‖∞ ≤ ε_r (and x + r in [0, 1]) that *minimises* the
weighted sum of the model's self-supervised losses on x + r, by PGD (signed gradient descent from
r = 0, `steps` steps of `step_size`), then classify x + r. An attack pushes images off the data
manifold, which raises the SSL losses; reversing that rise moves the image back.

Evaluation (`defended_records`), for each norm and ε_test of the evaluation grid:
- attack "pgd": the plain attack, unaware of the defence: PGD on the cross-entropy of the
  undefended model, then defend and classify;
- attack "pgd_adaptive": aware of the defence. PGD maximises CE(f(D(x'))) − λ_S·SSL(x'), where
  D is the defence itself (the full `defence_steps`-step reversal) in the forward pass and the
  identity in the backward pass (BPDA, Athalye et al. 2018: the reversal's sign steps have no
  useful gradient), averaged over `eval_adaptive_eot` draws of the reversal's random views (EOT;
  rotation alone is deterministic, so 1 suffices for it). The −λ_S·SSL term (Mao et al. 2021,
  λ_S = `eval_adaptive_weight`) also keeps the SSL losses low, so the image looks natural to the
  SSL tasks and the reversal has little to undo; then defend and classify as always. A negative
  λ_S gives the "CE + λ·SSL" form with a positive SSL term, which raises the loss the reversal
  undoes and so *helps* the defence (measured once on the test_defence.py model: defended accuracy
  0.39 at λ_S = −1 against 0.26 at λ_S = 1 and 0.38 under the plain PGD). Each attack step costs
  `eval_adaptive_eot` × (`defence_steps` + 1) forward-backward passes.
Rows carry defence = "ssl_reverse"; ε_test = 0 is the defended clean accuracy (attack "none").
Such defences change the input at test time by an optimisation of their own, so RobustBench's
standard (AutoAttack on a fixed model) protocol does not apply to them: see README.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .attacks import pgd
from .config import default_defence_eps, model_ssl_tasks
from .evaluate import Classify, robust_accuracy_curve
from .records import EvalRecord
from .ssl import MultiTask, build_task


def defence_task(config: dict, model=None) -> MultiTask:
    """The weighted SSL tasks the defence minimises: `defence_tasks` (empty: every task the model
    trains with), weighted as in training (a single ssl_task: weight 1). Rotation uses all four
    rotations at test time (an exact loss, no random labels)."""
    trained = model_ssl_tasks(config)
    names = list(config.get("defence_tasks") or trained)
    if config.get("ssl_tasks"):
        weights = [float(config["ssl_tasks"][n]) for n in names]
    else:
        weights = [1.0] * len(names)
    tasks = [build_task(n, "all", config.get("contrastive_temperature", 0.2)) for n in names]
    if model is not None:
        missing = [n for n in names if n not in model.ssl_heads]
        if missing:
            raise ValueError(f"the model has no '{missing[0]}' head for the defence")
    return MultiTask(tasks, weights)


def ssl_reverse(model, x: torch.Tensor, tasks_weights, eps: float, steps: int = 10,
                step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + r with ‖r‖∞ ≤ eps, x + r in [0, 1], r from PGD *descent* on the weighted SSL loss: `pgd`
    on the negated loss from r = 0 (no random start), `steps` steps of `step_size` (default eps/4).

    `tasks_weights`: a MultiTask, or a list of (task, weight) pairs. The tasks' random choices
    (contrastive views) are drawn once from `generator`, so all steps minimise the same loss.
    Runs the model as given (no BatchNorm folding: an attack's objective already hands it the
    folded copy) in eval mode; returns a detached tensor (N, C, H, W).
    """
    if not isinstance(tasks_weights, MultiTask):
        pairs = list(tasks_weights.items() if isinstance(tasks_weights, dict) else tasks_weights)
        tasks_weights = MultiTask([t for t, _ in pairs], [w for _, w in pairs])
    x = x.detach()
    if eps == 0 or steps == 0:  # before the draw: nothing reversed takes nothing from the generator
        return x.clone()
    labels = tasks_weights.sample(len(x), generator, x.device)

    def negated_ssl(m, images, _):
        return -tasks_weights.loss(m, images, labels)

    return pgd(model, x, None, negated_ssl, "linf", eps, eps / 4 if step_size is None else step_size, steps,
               random_start=False, restarts=1, bn_mode="eval", fold_bn=False)


def adaptive_objective(task: MultiTask, weight: float, eps_r: float, steps_r: int, eot: int = 1,
                       generator: torch.Generator | None = None):
    """The adaptive attack's per-example objective: the mean over `eot` draws of the defence's
    random views of CE(f(D(x'))), D the full reversal differentiated as the identity (BPDA), minus
    `weight`·SSL(x'), its random views drawn from `generator` at each call (deterministic tasks
    such as rotation draw nothing)."""

    def objective(model, x_adv, y):
        ce = 0.0
        for _ in range(eot):
            defended = ssl_reverse(model, x_adv, task, eps_r, steps_r, eps_r / 4, generator)
            through = x_adv + (defended - x_adv).detach()  # value D(x'), gradient the identity
            ce = ce + F.cross_entropy(model(through).float(), y, reduction="none")
        ce = ce / eot
        if weight == 0:
            return ce
        return ce - weight * task.loss(model, x_adv, task.sample(len(x_adv), generator, x_adv.device))

    return objective


def _defence_generator(seed: int, salt: int, device) -> torch.Generator:
    """The generator of the defence's random views, seeded by the trial's seed and a salt per use
    (the clean images 0, each ε_test round(ε·10⁶) + 1, the adaptive attack's views 3)."""
    return torch.Generator(device=device).manual_seed((seed * 7_919 + salt) % (2**63))


def defended_classifier(model, task: MultiTask, eps_r: float, steps_r: int, batch_size: int, seed: int) -> Classify:
    """classify(images, ε) -> (N,) labels of the defended model: reverse each batch of images
    (`ssl_reverse`), then take the model's argmax. Its random views come from a generator seeded by
    (seed, ε), so the clean images and each ε_test get fixed draws."""

    @torch.no_grad()
    def argmax(images: torch.Tensor) -> torch.Tensor:
        return model(images).argmax(1)

    def classify(images: torch.Tensor, eps: float) -> torch.Tensor:
        salt = 0 if eps == 0 else int(round(eps * 1e6)) + 1
        generator = _defence_generator(seed, salt, images.device)
        return torch.cat([
            argmax(ssl_reverse(model, images[i : i + batch_size], task, eps_r, steps_r, eps_r / 4, generator))
            for i in range(0, len(images), batch_size)
        ])

    return classify


def defended_records(model, x: torch.Tensor, y: torch.Tensor, config: dict) -> list[EvalRecord]:
    """The defended model's robustness curves, per norm of the evaluation grid: ε_test = 0 (the
    defended clean accuracy, attack "none"), and for every ε_test > 0 the plain ("pgd") and the
    adaptive ("pgd_adaptive") attack, each a `robust_accuracy_curve` of the defended classifier
    (so ε ascends and an example fooled at a smaller ε counts as fooled, as on every curve; exact
    for the deterministic reversal of rotation and inpainting). Rows carry `defence`, not `correct`
    (the per-example bits are for undefended robustness rows)."""
    model.eval()
    task = defence_task(config, model)
    eps_r = config["defence_eps"] if config.get("defence_eps") is not None else default_defence_eps(config["dataset"])
    steps_r, seed = config["defence_steps"], config["seed"]
    settings = dict(
        steps=config["eval_attack_steps"], step_size_factor=config["eval_step_size_factor"],
        restarts=config["eval_restarts"], batch_size=config["eval_batch_size"], seed=seed,
        classify=defended_classifier(model, task, eps_r, steps_r, config["eval_batch_size"], seed),
    )
    views = _defence_generator(seed, 3, x.device)
    aware = adaptive_objective(task, config["eval_adaptive_weight"], eps_r, steps_r, config["eval_adaptive_eot"], views)
    records = []
    for norm in config["eval_norms"]:
        grid = [float(e) for e in config[f"eval_eps_{norm}"]]
        plain = robust_accuracy_curve(model, x, y, norm, grid, **settings)
        positive = [e for e in grid if e > 0]
        adaptive = robust_accuracy_curve(model, x, y, norm, positive, objective=aware, **settings) if positive else []
        both = plain + [replace(r, attack="pgd_adaptive") for r in adaptive]
        # stable: per ε the plain attack's row, then the adaptive one's
        records += [replace(r, defence=config["defence"], correct=None) for r in sorted(both, key=lambda r: r.eps_test)]
    return records
