"""SGD, Adam and a per-step LambdaLR schedule written out in plain PyTorch, so a trial never
constructs a `torch.optim` object.

Why: `torch.optim.Optimizer` methods are wrapped by `torch._disable_dynamo` (torch/_compile.py),
which imports `torch._dynamo` the first time one of them runs. That import costs every Ray worker
1.2–1.6 s on its first trial (benchmarks/RESULTS.md, section 4), several times the work of a short
trial. Nothing here imports `torch._dynamo`; tests/test_optim.py checks that a Trainer epoch does not.

The updates are those of torch.optim's defaults, op for op: `SGD` (dampening 0, L2 weight decay
added to the gradient, momentum buffer started at the first gradient, optional Nesterov) and `Adam`
(L2 weight decay added to the gradient, bias correction, no AMSGrad). They use the `torch._foreach_*`
list ops that torch.optim uses on GPUs (a few kernel launches for all parameters instead of a few
per tensor; on CPU they loop over the tensors in C++ with the same per-tensor ops as torch.optim's
CPU path, bit for bit), so results match torch.optim on either device. One parameter group, all on
one device. `state_dict()` has torch.optim's layout: checkpoints written with torch.optim load here,
and the other way round.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


class _Optimizer:
    """One parameter group: `param_groups[0]` holds the hyper-parameters ("lr", ...) and "params";
    `state[i]` the buffers of parameter i (created on its first step with a gradient)."""

    # Options torch.optim has and these classes do not implement: a checkpoint that used a value
    # other than these is refused rather than continued with different updates.
    UNSUPPORTED: dict[str, Any] = {"maximize": False}

    def __init__(self, params: Iterable[torch.Tensor], **hyper: Any):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if any(not isinstance(p, torch.Tensor) for p in params):
            raise TypeError("optimizer takes tensors only (one parameter group, no group dicts)")
        if hyper["lr"] < 0 or hyper["weight_decay"] < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {hyper}")
        self.param_groups: list[dict[str, Any]] = [{**hyper, "params": params}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def _with_grad(self) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Indices, parameters and gradients of the parameters that have a gradient."""
        indices = [i for i, p in enumerate(self.param_groups[0]["params"]) if p.grad is not None]
        params = [self.param_groups[0]["params"][i] for i in indices]
        return indices, params, [p.grad for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: buffers}, "param_groups": [{hyper-parameters, "params": indices}]}; the
        tensors are the live buffers (as torch.optim's are): copy or save them before stepping on."""
        group = self.param_groups[0]
        return {
            "state": {i: dict(s) for i, s in self.state.items()},
            "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                              "params": list(range(len(group["params"])))}],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load our own or a torch.optim state dict: hyper-parameters (lr included) and buffers,
        copied onto each parameter's device (and dtype, except Adam's CPU "step" counter)."""
        if len(state_dict["param_groups"]) != 1:
            raise ValueError(f"state dict has {len(state_dict['param_groups'])} parameter groups, we use one")
        saved = state_dict["param_groups"][0]
        params = self.param_groups[0]["params"]
        if len(saved["params"]) != len(params):
            raise ValueError(f"state dict has {len(saved['params'])} parameters, optimizer {len(params)}")
        for key, value in self.UNSUPPORTED.items():
            if saved.get(key, value) != value:
                raise ValueError(f"{type(self).__name__} implements only {key}={value!r}, "
                                 f"the state dict has {saved[key]!r}")
        position = {index: i for i, index in enumerate(saved["params"])}
        self.param_groups = [{**{k: v for k, v in saved.items() if k != "params"}, "params": params}]
        self.state = {}
        for index, buffers in state_dict["state"].items():
            p = params[position[int(index)]]
            self.state[position[int(index)]] = {
                key: value.clone() if key == "step"
                else value.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None, copy=True)
                for key, value in buffers.items()
            }


class SGD(_Optimizer):
    """torch.optim.SGD with dampening 0: g = grad + weight_decay·p; buf = g on the first step, then
    buf = momentum·buf + g; update direction buf, or g + momentum·buf with nesterov; p -= lr·direction."""

    UNSUPPORTED = {"maximize": False, "dampening": 0}

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        # "dampening" is kept (always 0) so a torch.optim.SGD can load our state dict.
        super().__init__(params, lr=lr, momentum=momentum, dampening=0, weight_decay=weight_decay,
                         nesterov=nesterov)

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        indices, params, grads = self._with_grad()
        if not params:
            return
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            bufs, old_bufs, old_grads = [], [], []
            for i, grad in zip(indices, grads):
                state = self.state.setdefault(i, {})
                if "momentum_buffer" in state:  # buf = momentum·buf + g
                    old_bufs.append(state["momentum_buffer"])
                    old_grads.append(grad)
                else:  # first step: the buffer starts as this gradient, not decayed
                    state["momentum_buffer"] = grad.detach().clone()
                bufs.append(state["momentum_buffer"])
            if old_bufs:
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_grads)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])


class Adam(_Optimizer):
    """torch.optim.Adam without AMSGrad: g = grad + weight_decay·p; m = β1·m + (1−β1)·g;
    v = β2·v + (1−β2)·g²; p -= lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps)."""

    UNSUPPORTED = {"maximize": False, "amsgrad": False, "decoupled_weight_decay": False}

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps < 0:
            raise ValueError(f"need 0 <= betas < 1 and eps >= 0, got betas={betas} eps={eps}")
        # "amsgrad" is kept (always False) so a torch.optim.Adam can load our state dict.
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         amsgrad=False)

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        indices, params, grads = self._with_grad()
        if not params:
            return
        for i, p in zip(indices, params):
            if i not in self.state:
                # The step count is a CPU float32 tensor, as in torch.optim (its checkpoints too).
                self.state[i] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        states = [self.state[i] for i in indices]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        for s in states:
            s["step"] += 1
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        # Bias corrections in Python floats, per parameter (their step counts can differ).
        steps = [s["step"].item() for s in states]
        step_sizes = [-group["lr"] / (1 - beta1**t) for t in steps]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in steps])
        torch._foreach_add_(denoms, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)


class LambdaLR:
    """torch.optim.lr_scheduler.LambdaLR for one parameter group: lr = base lr × factor(n), where n
    counts `step()` calls; construction applies factor(0). Call `step()` after `optimizer.step()`.

    `state_dict()` has torch's keys ("base_lrs", "last_epoch", ...), so either loads the other's.
    Like torch, loading restores the counter only: the optimizer's own state dict restores its lr.
    """

    def __init__(self, optimizer: _Optimizer, factor: Callable[[int], float]):
        self.optimizer = optimizer
        self.factor = factor
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # as torch: the base lr survives checkpoints
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * self.factor(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        # "_step_count", "_last_lr" and "lr_lambdas" only so torch's LambdaLR can load this.
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch,
                "_step_count": self.last_epoch + 1, "_last_lr": self.get_last_lr(),
                "lr_lambdas": [None] * len(self.base_lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"state dict has {len(state_dict['base_lrs'])} base lrs, "
                             f"optimizer {len(self.optimizer.param_groups)} parameter groups")
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])
