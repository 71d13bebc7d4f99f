import math

import pytest
import torch
import torch.nn.functional as F

from trainables import data, models
from trainables.config import ConfigError

SMALL = {
    "small_cnn": {},
    "preact_resnet18": {},
    "wrn": {"depth": 10, "width": 1},
}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar100"])
@pytest.mark.parametrize("arch", list(SMALL))
def test_shapes(arch, dataset):
    info = data.dataset_info(dataset)
    torch.manual_seed(0)
    model = models.build_model(arch, info, **SMALL[arch])
    x = torch.rand(3, info.channels, info.size, info.size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, info.num_classes)
    assert model.features(x).shape == (3, model.feature_dim)
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == model.feature_dim
    assert isinstance(model.ssl_heads, torch.nn.ModuleDict) and len(model.ssl_heads) == 0
    # Attacks need input gradients.
    F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_reference_sizes():
    cifar = data.dataset_info("cifar10")
    assert 2.1e6 < n_params(models.build_model("wrn", cifar, depth=40, width=2)) < 2.3e6
    assert 11.1e6 < n_params(models.build_model("preact_resnet18", cifar)) < 11.3e6
    assert n_params(models.build_model("small_cnn", cifar)) < 1e6


def test_bad_arch_and_depth():
    info = data.dataset_info("cifar10")
    with pytest.raises(ConfigError, match="small_cnn"):
        models.build_model("resnet50", info)
    with pytest.raises(ConfigError, match="6n\\+4") as err:
        models.build_model("wrn", info, depth=12, width=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", list(SMALL))
def test_normalisation_is_inside_the_model(arch):
    info = data.dataset_info("cifar10")
    model = models.build_model(arch, info, **SMALL[arch]).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    manual = model.head(model.backbone((x - mean) / std))
    assert torch.allclose(model(x), manual, atol=1e-5)
    assert {name for name, _ in model.normalize.named_buffers()} == {"mean", "std"}


def test_backbone_state_round_trip():
    info = data.dataset_info("fashion_mnist")
    torch.manual_seed(0)
    source = models.build_model("wrn", info, depth=10, width=1)
    source.ssl_heads["rotation"] = torch.nn.Linear(source.feature_dim, 4)
    # Give BatchNorm non-default running stats so buffers are part of the check.
    source.train()
    source(torch.rand(8, 1, 28, 28))
    source.eval()
    state = models.backbone_state(source)
    assert state and all(k.startswith(("backbone.", "normalize.")) for k in state)
    assert any("running_mean" in k for k in state)

    torch.manual_seed(1)
    target = models.build_model("wrn", info, depth=10, width=1).eval()
    head_before = target.head.weight.clone()
    models.load_backbone(target, state)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(target.features(x), source.features(x))
    assert torch.equal(target.head.weight, head_before)

    # The checkpoint is a copy, not a view of the live weights.
    with torch.no_grad():
        next(source.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(iter(state.values())), next(source.backbone.parameters()))

    with pytest.raises(ConfigError, match="does not fit"):
        models.load_backbone(models.build_model("small_cnn", info), state)
    with pytest.raises(ConfigError, match="shapes differ"):
        rgb = data.dataset_info("cifar10")
        models.load_backbone(models.build_model("wrn", rgb, depth=10, width=1), state)


@pytest.mark.slow
def test_small_cnn_learns_fashion_mnist():
    if not (data.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    info = data.dataset_info("fashion_mnist")
    train = data.load_split("fashion_mnist", True, subset=3000, seed=0, download=False)
    test = data.load_split("fashion_mnist", False, subset=2000, seed=1, download=False)
    torch.manual_seed(0)
    model = models.build_model("small_cnn", info)
    batch_size = 32
    steps = len(train) // batch_size
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    for x, y in data.iterate_batches(train, batch_size, torch.Generator().manual_seed(0)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in data.iterate_batches(test, 500, None, shuffle=False, drop_last=False):
            correct += (model(x).argmax(1) == y).sum().item()
    assert correct / len(test) >= 0.75
