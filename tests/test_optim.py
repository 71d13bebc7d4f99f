"""Tests for trainables/optim.py: our SGD, Adam and LambdaLR follow torch.optim step for step, their
state dicts load both ways (checkpoints of the torch.optim-based trainer still resume), and a
Trainer epoch never imports torch._dynamo (the reason they exist)."""
from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainables import optim

STEPS = 20
LATE = 5  # the `late` layer gets gradients from this step on (momentum buffers created mid-run)

SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=5e-4),
    "all": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
}
ADAM_CASES = {
    "plain": dict(lr=1e-2),
    "weight_decay": dict(lr=1e-2, weight_decay=1e-2),
    "betas_eps": dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=5e-4),
}
CASES = [("SGD", name, kw) for name, kw in SGD_CASES.items()] + [("Adam", name, kw) for name, kw in ADAM_CASES.items()]
CASE_IDS = [f"{cls}-{name}" for cls, name, _ in CASES]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and noise on a busy machine)
    yield
    torch.set_num_threads(before)


def cosine(step: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, STEPS) / STEPS))


class Net(torch.nn.Module):
    """Conv + batch norm + linear; `late` is used only from step LATE on, `unused` never (no grad)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)
        self.late = torch.nn.Linear(4 * 6 * 6, 3)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x, step):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc(h) + (self.late(h) if step >= LATE else 0)


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


def _make(kind: str, cls: str, kwargs: dict, model: Net, **torch_options):
    if kind == "torch":
        opt = getattr(torch.optim, cls)(model.parameters(), **kwargs, **torch_options)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    opt = getattr(optim, cls)(model.parameters(), **kwargs)
    return opt, optim.LambdaLR(opt, cosine)


def _train_step(model, opt, sched, batch, step) -> None:
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x, step), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def _assert_close(a: torch.nn.Module, b: torch.nn.Module, where: str) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=lambda m: f"{where} {name}: {m}")


def _saved(state: dict) -> dict:
    """What a checkpoint gives back: through torch.save and torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,name,kwargs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("foreach", [False, True], ids=["torch-cpu-path", "torch-foreach-path"])
def test_tracks_torch_optim_step_for_step(cls, name, kwargs, foreach):
    data = _data()
    ours_model, torch_model = _model(), _model()
    ours, ours_sched = _make("ours", cls, kwargs, ours_model)
    ref, ref_sched = _make("torch", cls, kwargs, torch_model, foreach=foreach)
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == kwargs["lr"]  # factor(0) = 1
    for step, batch in enumerate(data):
        _train_step(ours_model, ours, ours_sched, batch, step)
        _train_step(torch_model, ref, ref_sched, batch, step)
        _assert_close(ours_model, torch_model, f"step {step}")
        assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12, abs=0)
    assert ours.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached its end
    assert ours_model.unused.weight.grad is None and not {8, 9} & set(ours.state)  # untouched, like torch
    # The whole run moved the weights (so the comparison above is not vacuous).
    assert not torch.allclose(ours_model.fc.weight, _model().fc.weight, atol=1e-3)


def test_zero_grad_without_set_to_none_keeps_zeroed_tensors():
    model = _model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 2, 8, 8), 0).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(model.fc.weight.grad, torch.zeros_like(model.fc.weight))
    assert model.unused.weight.grad is None
    opt.zero_grad()
    assert model.fc.weight.grad is None


def test_lambda_lr_counts_steps_like_torch():
    for factor in (cosine, lambda i: 0.5 ** i):
        ours = optim.LambdaLR(optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2), factor)
        ref = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2), factor)
        for _ in range(5):
            assert ours.get_last_lr() == ref.get_last_lr()
            assert ours.optimizer.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"]
            ours.step()
            ref.optimizer.step()
            ref.step()
        assert ours.last_epoch == ref.last_epoch == 5


# --- state dicts and checkpoints --------------------------------------------------------------


def _cross_load(cls, kwargs, source: str, target: str) -> None:
    """Train with `source` for 8 steps, checkpoint; continue `source`, and a fresh `target` optimiser
    (built as the Trainer builds it, then loaded) on a copy of the model: both must agree."""
    data = _data()
    model = _model()
    opt, sched = _make(source, cls, kwargs, model)
    for step in range(8):
        _train_step(model, opt, sched, data[step], step)
    checkpoint = _saved({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    resumed = _model()
    with torch.no_grad():  # disturb what the checkpoint must restore
        for p in resumed.parameters():
            p.add_(0.01)
    r_opt, r_sched = _make(target, cls, kwargs, resumed)
    r_opt.param_groups[0]["lr"] = 123.0
    resumed.load_state_dict(checkpoint["model"])
    r_opt.load_state_dict(checkpoint["optimizer"])
    r_sched.load_state_dict(checkpoint["scheduler"])
    assert r_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for step in range(8, STEPS):
        _train_step(model, opt, sched, data[step], step)
        _train_step(resumed, r_opt, r_sched, data[step], step)
        _assert_close(resumed, model, f"{source}->{target} step {step}")
        assert r_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0)


RESUME_CASES = {"SGD-momentum": ("SGD", SGD_CASES["momentum"]), "SGD-all": ("SGD", SGD_CASES["all"]),
                "Adam-weight_decay": ("Adam", ADAM_CASES["weight_decay"])}


@pytest.mark.parametrize("case", list(RESUME_CASES))
@pytest.mark.parametrize("source,target", [("ours", "ours"), ("torch", "ours"), ("ours", "torch")])
def test_checkpoint_resumes_exactly(case, source, target):
    # torch -> ours: a checkpoint of the torch.optim-based trainer resumes with ours.
    _cross_load(*RESUME_CASES[case], source, target)


@pytest.mark.parametrize("cls,kwargs", [("SGD", SGD_CASES["all"]), ("Adam", ADAM_CASES["weight_decay"])])
def test_state_dict_has_torch_layout(cls, kwargs):
    data = _data()
    layouts = []
    for kind in ("ours", "torch"):
        model = _model()
        opt, sched = _make(kind, cls, kwargs, model)
        for step in range(LATE + 2):
            _train_step(model, opt, sched, data[step], step)
        state = opt.state_dict()
        layouts.append((
            {i: {k: (tuple(v.shape), v.dtype, v.device) for k, v in s.items()} for i, s in state["state"].items() if s},
            state["param_groups"][0]["params"],
            sched.state_dict()["last_epoch"], sched.state_dict()["base_lrs"],
        ))
        missing = {"lr", "weight_decay", "initial_lr"} - set(state["param_groups"][0])
        assert not missing, (kind, missing)
    assert layouts[0] == layouts[1]


def test_state_dict_copies_on_load():
    # Loading must not alias the source's buffers (a torch.optim state_dict hands out its live ones).
    model = _model()
    ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 2, 8, 8), 0).sum().backward()
    ref.step()
    ours = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ours.load_state_dict(ref.state_dict())
    before = ref.state_dict()["state"][0]["momentum_buffer"].clone()
    ours.step()
    assert torch.equal(ref.state_dict()["state"][0]["momentum_buffer"], before)


@pytest.mark.parametrize("cls,option", [("Adam", dict(amsgrad=True)), ("SGD", dict(dampening=0.1)),
                                        ("SGD", dict(maximize=True))])
def test_refuses_torch_options_it_does_not_implement(cls, option):
    model = _model()
    ref = getattr(torch.optim, cls)(model.parameters(), lr=0.1, **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        getattr(optim, cls)(model.parameters(), lr=0.1).load_state_dict(ref.state_dict())


# --- the reason for all this ----------------------------------------------------------------

NO_DYNAMO = textwrap.dedent("""
    import io, sys
    import torch
    from trainables.train import Trainer, pretrain_rotation

    torch.set_num_threads(1)
    tiny = dict(dataset="fashion_mnist", arch="small_cnn", train_subset=32, test_subset=16, epochs=1,
                batch_size=16, ssl_task="rotation", rotations="one", attack_variant="joint", eps_train=0.1,
                train_attack_steps=1, eval_attack_steps=1, eval_eps_linf=[0.0, 0.1], pretrain_epochs=1, seed=0)
    for extra in ({}, {"optimizer": "adam", "schedule": "piecewise"}):
        trainer = Trainer({**tiny, **extra}, device="cpu")
        trainer.train_epoch()
        buffer = io.BytesIO()
        torch.save(trainer.state_dict(), buffer)
        buffer.seek(0)
        trainer.load_state_dict(torch.load(buffer, weights_only=True))
    pretrain_rotation(tiny, device="cpu")
    trainer.evaluate()
    print("torch._dynamo" in sys.modules)
""")


def test_a_trainer_epoch_does_not_import_torch_dynamo():
    # torch.optim's optimisers import torch._dynamo on first use: 1.2-1.6 s per Ray worker.
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", NO_DYNAMO], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False", "something in a trial imports torch._dynamo again"
