"""Self-supervised adversarial training of one configuration, resumable at epoch boundaries.

`Trainer(config)` builds everything from a plain config dict (see `trainables.config`);
`train_epoch()` runs one epoch and returns its metrics; `state_dict()` / `load_state_dict()` hold
everything needed to continue (model, optimiser, scheduler, RNG, epoch), so an interrupted trial
that restores its last checkpoint ends with the same metrics as one that was never interrupted.
All training randomness (order, augmentation, SSL labels, attack starts) comes from one generator
whose state is part of the checkpoint.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Iterator

import torch

from .attacks import fgsm, pgd
from .config import resolve
from .data import ImageTensors, iterate_batches, load_split, load_train_val
from .device import autocast, prepare_input, prepare_model, select_device
from .evaluate import fraction, predictions, robust_accuracy_curve
from .evaluate_model import evaluate_model
from .label_noise import corrupt_labels, label_noise_generator
from .models import backbone_state, build_model, load_backbone
from .objectives import SSLBatch, attack_objective, stack_inputs, update_loss
from .records import EvalRecord
from .ssl import attach_head, build_task, task_from_config  # noqa: F401 - build_task re-exported

# Keys that decide the SSL pre-training a fine-tuning run starts from (its cache key).
PRETRAIN_KEYS = (
    "dataset", "train_subset", "arch", "depth", "width", "batch_size", "optimizer", "momentum",
    "nesterov", "weight_decay", "augment", "rotations", "pretrain_epochs", "pretrain_lr", "seed",
)
# Training examples are the same for every trial (a fixed selection seed), so cells differ only by
# their factors and training seed; the test subset is fixed the same way.
DATA_SELECTION_SEED = 0
# The validation examples (val_subset) are drawn by a seed of their own, so they are the same for
# every trial and every training subset; their PGD starts are fixed too, so epochs compare fairly.
VAL_SELECTION_SEED = 1
VAL_ATTACK_SEED = 0


def pretrain_settings(config: dict) -> dict:
    full = resolve(config)
    settings = {key: full[key] for key in PRETRAIN_KEYS}
    if full["val_subset"] is not None:  # pre-training must not see the held-out images either
        settings["val_subset"] = full["val_subset"]
    return settings


def _optimizer(params, cfg: dict, lr: float) -> torch.optim.Optimizer:
    """torch.optim's SGD (Nesterov momentum by default) or Adam; L2 weight decay on every parameter
    (batch-norm scales and biases included), as in the seed papers' training code."""
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
        nesterov=cfg["nesterov"] and cfg["momentum"] > 0,
    )


def _schedule(optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedules: cosine to zero, constant, or piecewise (÷10 at 50% and 75%)."""
    total = max(total_steps, 1)
    if kind == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif kind == "piecewise":
        factor = lambda step: 1.0 if step < 0.5 * total else 0.1 if step < 0.75 * total else 0.01  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(
        self,
        config: dict[str, Any],
        data_dir: str | None = None,
        device: str = "auto",
        pretrained: dict | None = None,
    ):
        self.config = cfg = resolve(config)
        self.device = select_device(device)
        self.data_dir = data_dir
        self.val_data: ImageTensors | None = None
        if cfg["val_subset"] is None:
            self.train_data = load_split(
                cfg["dataset"], True, data_dir, cfg["train_subset"], DATA_SELECTION_SEED, self.device
            )
        else:
            self.train_data, self.val_data = load_train_val(
                cfg["dataset"], cfg["val_subset"], VAL_SELECTION_SEED, data_dir, cfg["train_subset"],
                DATA_SELECTION_SEED, self.device,
            )
        # Label noise: fixed by the trial seed, drawn from a generator of its own (every other
        # random choice is the same as without noise); the count flipped is recorded.
        self.label_noise_flipped = 0
        self.label_noise_mask: torch.Tensor | None = None
        if cfg["label_noise"] > 0:
            noisy, self.label_noise_mask = corrupt_labels(
                self.train_data.labels, cfg["label_noise"], self.train_data.info.num_classes,
                label_noise_generator(cfg["seed"]),
            )
            self.label_noise_flipped = int(self.label_noise_mask.sum())
            self.train_data = ImageTensors(self.train_data.images, noisy, self.train_data.info)
        if cfg["ood_sets"]:  # a held-out OOD dataset that is not on disk fails now, not after training
            from .ood import check_available

            check_available(cfg["ood_sets"], self.train_data.info, data_dir)
        torch.manual_seed(cfg["seed"])  # model initialisation
        model = build_model(cfg["arch"], self.train_data.info, depth=cfg["depth"], width=cfg["width"])
        # ssl_task with ssl_weight, or several tasks at once (ssl_tasks: λ = 1, weights inside)
        self.task, self.ssl_weight = task_from_config(cfg)
        attach_head(model, self.task)
        if cfg["init"] == "ssl_pretrained":
            if pretrained is None:
                raise ValueError("init 'ssl_pretrained' needs the pre-trained state from pretrain_rotation()")
            load_pretrained(model, pretrained)
        self.model = prepare_model(model, self.device)
        # Full batches only (a last batch of one image breaks batch norm), unless the whole subset
        # is smaller than one batch.
        self.drop_last = len(self.train_data) >= cfg["batch_size"]
        self.steps_per_epoch = max(len(self.train_data) // cfg["batch_size"], 1)
        self.optimizer = _optimizer(self.model.parameters(), cfg, cfg["lr"])
        self.scheduler = _schedule(self.optimizer, cfg["schedule"], cfg["epochs"] * self.steps_per_epoch)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg["seed"])
        self.epoch = 0
        self.history: list[dict] = []
        # The epoch with the highest robust validation accuracy so far and its weights
        # (checkpoint_selection: best_robust_val); None before the first validated epoch.
        self.best: dict | None = None
        self.selected_epoch: int | None = None  # set by evaluate()

    @property
    def done(self) -> bool:
        return self.epoch >= self.config["epochs"]

    def _ssl_batch(self, n: int) -> SSLBatch | None:
        cfg = self.config
        if self.task is None or (self.ssl_weight == 0 and cfg["attack_variant"] != "ssl"):
            return None
        labels = self.task.sample(n, self.generator, self.device)
        return SSLBatch(self.task, self.ssl_weight, labels, cfg["ssl_perturbation"] == "independent")

    def _adversarial(self, x_in, y, ssl):
        cfg = self.config
        eps = cfg["eps_train"]
        if eps == 0:
            return x_in
        clean = None
        if cfg["attack_variant"] == "repr":  # the anchor f(x), once per batch, in the attack's BN mode
            from .attacks import batchnorm_mode
            from .objectives import clean_representation

            with batchnorm_mode(self.model, cfg["train_bn_mode"]):
                clean = clean_representation(self.model, x_in)
        objective = (attack_objective(cfg["attack_variant"], ssl, clean) if clean is not None
                     else attack_objective(cfg["attack_variant"], ssl))
        if cfg["train_attack"] == "fgsm":
            return fgsm(self.model, x_in, y, objective, cfg["norm_train"], eps,
                        random_start=cfg["train_random_start"], bn_mode=cfg["train_bn_mode"],
                        generator=self.generator)
        steps = cfg["train_attack_steps"]
        return pgd(self.model, x_in, y, objective, cfg["norm_train"], eps,
                   step_size=cfg["train_step_size_factor"] * eps / steps, steps=steps,
                   random_start=cfg["train_random_start"], bn_mode=cfg["train_bn_mode"],
                   generator=self.generator)

    def train_epoch(self) -> dict[str, float]:
        cfg = self.config
        start = time.perf_counter()
        self.model.train()
        totals = torch.zeros(4, device=self.device)  # loss, ce, ssl, correct
        seen = 0
        for x, y in iterate_batches(self.train_data, cfg["batch_size"], self.generator,
                                    shuffle=True, augment=cfg["augment"], drop_last=self.drop_last):
            x = prepare_input(x)
            ssl = self._ssl_batch(len(y))
            x_in = stack_inputs(x, ssl) if ssl is not None and ssl.stacked else x
            with autocast(self.device, cfg["train_precision"]):
                x_adv = self._adversarial(x_in, y, ssl)
                self.model.train()
                loss, losses = update_loss(self.model, x_adv, y, ssl)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                ssl_sum = losses.ssl.sum() if losses.ssl is not None else totals.new_zeros(())
                totals += torch.stack([
                    loss.detach() * len(y), losses.ce.sum(), ssl_sum,
                    (losses.logits.argmax(1) == y).sum().float(),
                ])
            seen += len(y)
        self.epoch += 1
        loss_sum, ce_sum, ssl_sum, correct = (totals / max(seen, 1)).tolist()
        seconds = time.perf_counter() - start
        metrics = {
            "epoch": self.epoch, "train_loss": loss_sum, "train_ce": ce_sum, "train_ssl": ssl_sum,
            "train_adv_acc": correct, "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds, "images_per_second": seen / seconds if seconds > 0 else 0.0,
        }
        if cfg["label_noise"] > 0:  # train_adv_acc is then measured against the noisy labels
            metrics["label_noise_flipped"] = self.label_noise_flipped
        if self.val_data is not None:
            metrics.update(self.validate())
            self._remember_if_best(metrics["val_robust_acc"])
        self.history.append(metrics)
        return metrics

    def validate(self) -> dict[str, float]:
        """Clean and robust accuracy on the held-out validation split: PGD (stop on success) at
        ε_train in norm_train with val_attack_steps steps and the same starts every epoch.
        At ε_train = 0 the robust accuracy is the clean one."""
        cfg = self.config
        x, y = self.val_data.images.float() / 255, self.val_data.labels
        eps = [cfg["eps_train"]] if cfg["eps_train"] > 0 else []
        records = robust_accuracy_curve(
            self.model, x, y, cfg["norm_train"], eps, steps=cfg["val_attack_steps"],
            step_size_factor=cfg["eval_step_size_factor"], batch_size=cfg["eval_batch_size"],
            seed=VAL_ATTACK_SEED, stop_on_success=True,
        ) if eps else []
        clean = (predictions(self.model, x, cfg["eval_batch_size"]) == y).double().mean().item()
        return {"val_clean_acc": clean, "val_robust_acc": records[-1]["robust_acc"] if records else clean}

    def _remember_if_best(self, val_robust_acc: float) -> None:
        # Ties go to the later epoch: equally robust, and trained longer.
        if self.best is None or val_robust_acc >= self.best["val_robust_acc"]:
            self.best = {
                "epoch": self.epoch, "val_robust_acc": val_robust_acc,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            }

    def selected_model(self) -> tuple[torch.nn.Module, int]:
        """The model the trial is evaluated with and the epoch its weights are from: the last
        epoch's, or (checkpoint_selection best_robust_val) the best validated epoch's, in a copy so
        that the trainer's own state stays the last epoch's."""
        if self.config["checkpoint_selection"] == "best_robust_val" and self.best is not None:
            if self.best["epoch"] != self.epoch:
                model = copy.deepcopy(self.model)
                model.load_state_dict(self.best["model"])
                return model, self.best["epoch"]
        return self.model, self.epoch

    def epochs(self) -> Iterator[dict[str, float]]:
        while not self.done:
            yield self.train_epoch()

    def test_data(self):
        return load_split(self.config["dataset"], False, self.data_dir, self.config["test_subset"],
                          DATA_SELECTION_SEED, self.device)

    def clean_accuracy(self, data=None) -> float:
        data = data or self.test_data()
        x, y = data.images.float() / 255, data.labels
        return fraction(predictions(self.model, x, self.config["eval_batch_size"]) == y)

    def evaluate(self) -> list[EvalRecord]:
        """Every evaluation record of the selected model (`selected_model`); `selected_epoch`
        says which epoch's weights that is."""
        data = self.test_data()
        model, self.selected_epoch = self.selected_model()
        return evaluate_model(model, data.images.float() / 255, data.labels, self.config,
                              data_dir=self.data_dir)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "history": list(self.history),
            "best": self.best,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best = state.get("best")  # checkpoints written before checkpoint selection have none


def load_pretrained(model, pretrained: dict) -> None:
    load_backbone(model, pretrained["backbone"])
    if "ssl_head" in pretrained and "rotation" in model.ssl_heads:
        model.ssl_heads["rotation"].load_state_dict(pretrained["ssl_head"])


def pretrain_rotation(config: dict, data_dir: str | None = None, device: str = "auto",
                      progress=None) -> dict:
    """Rotation-only pre-training (no labels, no attack) of the backbone a fine-tuning run loads.

    Returns {"backbone", "ssl_head", "settings"}: plain tensors and values, safe for
    `torch.load(weights_only=True)`.
    """
    settings = pretrain_settings(config)
    cfg = resolve({**settings, "ssl_task": "rotation", "ssl_weight": 1.0, "attack_variant": "ssl",
                   "eps_train": 0.0, "epochs": settings["pretrain_epochs"], "lr": settings["pretrain_lr"],
                   "init": "scratch"})
    trainer = Trainer(cfg, data_dir=data_dir, device=device)
    model, task, generator = trainer.model, trainer.task, trainer.generator
    for epoch in range(cfg["epochs"]):
        model.train()
        for x, _ in iterate_batches(trainer.train_data, cfg["batch_size"], generator,
                                    shuffle=True, augment=cfg["augment"], drop_last=trainer.drop_last):
            x = prepare_input(x)
            labels = task.sample(len(x), generator, trainer.device)
            with autocast(trainer.device):
                loss = task.loss(model, x, labels).mean()
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
            trainer.scheduler.step()
        if progress is not None:
            progress(epoch + 1, float(loss.detach()))
    return {
        "backbone": {k: v.detach().cpu() for k, v in backbone_state(model).items()},
        "ssl_head": {k: v.detach().cpu() for k, v in model.ssl_heads["rotation"].state_dict().items()},
        "settings": settings,
    }
