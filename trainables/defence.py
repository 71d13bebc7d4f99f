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

import torch
import torch.nn.functional as F

from .attacks import batchnorm_mode, pgd, random_delta
from .config import default_defence_eps, model_ssl_tasks
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
    """x + r with ‖r‖∞ ≤ eps, x + r in [0, 1], r from PGD *descent* on the weighted SSL loss.

    `tasks_weights`: a MultiTask, or a list of (task, weight) pairs. The tasks' random choices
    (contrastive views) are drawn once from `generator`, so all steps minimise the same loss.
    Runs the model in eval mode; returns a detached tensor.
    """
    if not isinstance(tasks_weights, MultiTask):
        pairs = list(tasks_weights.items() if isinstance(tasks_weights, dict) else tasks_weights)
        tasks_weights = MultiTask([t for t, _ in pairs], [w for _, w in pairs])
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    step_size = eps / 4 if step_size is None else step_size
    labels = tasks_weights.sample(len(x), generator, x.device)
    delta = torch.zeros_like(x)
    with batchnorm_mode(model, "eval"):
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                loss = tasks_weights.loss(model, x + delta, labels)
                (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                delta = (delta - step_size * grad.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0.0, 1.0) - x
    return (x + delta).detach()


def adaptive_objective(task: MultiTask, weight: float, labels, eps_r: float, steps_r: int,
                       eot: int = 1, generator: torch.Generator | None = None):
    """The adaptive attack's per-example objective: the mean over `eot` draws of the defence's
    random views of CE(f(D(x'))), D the full reversal differentiated as the identity (BPDA), minus
    `weight`·SSL(x') on the fixed SSL `labels`."""

    def objective(model, x_adv, y):
        ce = 0.0
        for _ in range(eot):
            defended = ssl_reverse(model, x_adv, task, eps_r, steps_r, eps_r / 4, generator)
            through = x_adv + (defended - x_adv).detach()  # value D(x'), gradient the identity
            ce = ce + F.cross_entropy(model(through).float(), y, reduction="none")
        ce = ce / eot
        if weight == 0:
            return ce
        return ce - weight * task.loss(model, x_adv, labels)

    return objective


@torch.no_grad()
def _classify(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def defended_records(model, x: torch.Tensor, y: torch.Tensor, config: dict) -> list[dict]:
    """Records (evaluate.RECORD_KEYS + defence) of the defended model: ε_test = 0 (defended clean
    accuracy) and, for every ε_test > 0, the plain ("pgd") and adaptive ("pgd_adaptive") attack."""
    from .evaluate import curve_record, attack_seed, fraction

    model.eval()
    task = defence_task(config, model)
    eps_r = config["defence_eps"] if config.get("defence_eps") is not None else default_defence_eps(config["dataset"])
    steps_r = config["defence_steps"]
    batch_size = config["eval_batch_size"]
    seed = config["seed"]
    lam = config["eval_adaptive_weight"]

    def defend_and_classify(images: torch.Tensor, salt: int) -> torch.Tensor:
        generator = torch.Generator(device=images.device).manual_seed((seed * 7_919 + salt) % (2**63))
        out = []
        for i in range(0, len(images), batch_size):
            defended = ssl_reverse(model, images[i : i + batch_size], task, eps_r, steps_r, eps_r / 4, generator)
            out.append(_classify(model, defended))
        return torch.cat(out)

    clean_correct = defend_and_classify(x, 0) == y
    clean_acc = fraction(clean_correct)
    records = []
    for norm in config["eval_norms"]:
        for eps in sorted(float(e) for e in config[f"eval_eps_{norm}"]):
            if eps == 0:
                records.append(dict(curve_record(norm, 0.0, "none", 0, 0.0, 0, len(x), clean_acc, clean_acc),
                                    defence=config["defence"]))
                continue
            steps = config["eval_attack_steps"]
            step_size = config["eval_step_size_factor"] * eps / steps
            for attack in ("pgd", "pgd_adaptive"):
                generator = torch.Generator(device=x.device).manual_seed(attack_seed(seed, norm, eps))
                starts = random_delta(x.shape, norm, eps, x.device, generator)
                adversarial = []
                for i in range(0, len(x), batch_size):
                    xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                    if attack == "pgd":
                        objective = None
                    else:
                        objective = adaptive_objective(task, lam, task.sample(len(xb), generator, x.device), eps_r,
                                                       steps_r, config["eval_adaptive_eot"], generator)
                    kwargs = {} if objective is None else {"objective": objective}
                    adversarial.append(pgd(model, xb, yb, norm=norm, eps=eps, step_size=step_size, steps=steps,
                                           random_start=True, restarts=config["eval_restarts"], bn_mode="eval",
                                           generator=generator, init=starts[i : i + batch_size], **kwargs))
                correct = defend_and_classify(torch.cat(adversarial), int(round(eps * 1e6)) + 1) == y
                records.append(dict(
                    curve_record(norm, eps, attack, steps, step_size, config["eval_restarts"], len(x), clean_acc,
                            fraction(correct)),
                    defence=config["defence"],
                ))
    return records
