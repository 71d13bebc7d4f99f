"""Natural image corruptions in the style of CIFAR-10-C, and accuracy under them.

The corruptions and their severity constants follow Hendrycks & Dietterich (ICLR 2019),
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations". The constants
were checked against the CIFAR-10-C generation script of the authors' repository,
hendrycks/robustness, file ``ImageNet-C/create_c/make_cifar_c.py`` (functions ``gaussian_noise``,
``shot_noise``, ``impulse_noise``, ``gaussian_blur``, ``contrast``, ``brightness`` and
``jpeg_compression``). The code here is a fresh PyTorch implementation of those definitions,
vectorised over the batch; it draws its randomness from a ``torch.Generator``, so the noise is
not the same as in the released CIFAR-10-C files (which used NumPy's global RNG).

Definitions (x in [0, 1], severity s = 1..5, c = constant[s - 1]; every output is clipped to [0, 1]):

- ``gaussian_noise``  c = [0.04, 0.06, 0.08, 0.09, 0.10]: x + N(0, c^2), independently per element.
- ``shot_noise``      c = [500, 250, 100, 75, 50]: Poisson(x * c) / c, per element.
- ``impulse_noise``   c = [0.01, 0.02, 0.03, 0.05, 0.07]: salt-and-pepper as in
  ``skimage.util.random_noise(mode='s&p', amount=c)``: each element (each channel of each pixel,
  independently) is replaced with probability c, by 1 or 0 with equal probability.
- ``gaussian_blur``   sigma = [0.4, 0.6, 0.7, 0.8, 1.0]: as ``skimage.filters.gaussian`` (i.e.
  ``scipy.ndimage.gaussian_filter``): separable sampled Gaussian, kernel radius
  int(4 * sigma + 0.5), normalised to sum 1, edges padded by replicating the border ("nearest"),
  each channel blurred separately.
- ``contrast``        c = [0.75, 0.5, 0.4, 0.3, 0.15]: (x - m) * c + m, where m is the mean of the
  image over its pixels, taken per channel as in the published code (``np.mean(x, axis=(0, 1))``
  on an HWC image). This keeps every channel mean, hence the image mean, unchanged.
- ``brightness``      c = [0.05, 0.1, 0.15, 0.2, 0.3]: convert RGB to HSV, V <- min(V + c, 1),
  convert back. Because HSV -> RGB is linear in V for fixed H and S, this equals scaling each
  pixel by V' / V with V = max over channels (a black pixel, V = 0, has S = 0 and becomes the
  gray V' = c); that closed form is what is computed. For 1-channel images V is the intensity,
  so the result is min(x + c, 1).
- ``jpeg``            quality = [80, 65, 58, 50, 40]: each image is quantised to 8 bits (rounded),
  encoded with PIL's JPEG encoder at that quality (PIL defaults otherwise, as in the published
  code) and decoded. Only 1- and 3-channel images. Deterministic; uses no randomness.

Random numbers are drawn on the generator's device and then moved to ``x``'s device, so a CPU
generator gives the same noise whichever device ``x`` is on.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import numbers
import math
from typing import Iterable

import numpy as np
import torch

from trainables.config import CORRUPTIONS, ConfigError

__all__ = ["CORRUPTIONS", "SEVERITIES", "CONSTANTS", "corrupt", "corruption_accuracy"]

SEVERITIES = (1, 2, 3, 4, 5)

# Severity constants from make_cifar_c.py (see the module docstring), indexed by severity - 1.
CONSTANTS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # photon count scale
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper amount
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # Gaussian sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to V in HSV
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}
assert set(CONSTANTS) == set(CORRUPTIONS)

# corruption_accuracy corrupts the data in chunks of this many examples, each with its own
# generator, so its result does not depend on batch_size.
_CHUNK = 256


# ----------------------------------------------------------------------------- validation


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in CONSTANTS:
        hint = ""
        if isinstance(name, str):
            close = difflib.get_close_matches(name, CORRUPTIONS, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown corruption {name!r}{hint}; choose one of {', '.join(CORRUPTIONS)}")
    return name


def _check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or int(severity) not in SEVERITIES:
        raise ConfigError(f"corruption severity must be an integer from 1 to 5, got {severity!r}")
    return int(severity)


def _check_images(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"corrupt: x must be a float tensor of shape (N, C, H, W), got {what}")


# ----------------------------------------------------------------------------- corruptions
# Each takes x in a float32/float64 working dtype and returns the unclipped-or-clipped result;
# corrupt() clips and casts back.


def _rand(shape, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)


def _gaussian_noise(x, c, g):
    noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
    return x + noise * c


def _shot_noise(x, c, g):
    rate = (x.clamp_min(0) * c).to(g.device)
    return torch.poisson(rate, generator=g).to(x.device) / c


def _impulse_noise(x, amount, g):
    flipped = _rand(x.shape, x, g) < amount
    salted = _rand(x.shape, x, g) < 0.5
    out = x.clamp(0, 1)  # skimage clips the input for 's&p'
    out = torch.where(flipped & salted, torch.ones_like(out), out)
    return torch.where(flipped & ~salted, torch.zeros_like(out), out)


def _gaussian_kernel1d(sigma: float, dtype, device) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage.gaussian_filter with truncate=4.0
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _blur_matrix(size: int, kernel: torch.Tensor) -> torch.Tensor:
    """(size, size) matrix M with (M @ v)[i] = sum_j kernel[j] * v[clamp(i + j - r, 0, size - 1)]."""
    r = (kernel.numel() - 1) // 2
    idx = torch.arange(size, device=kernel.device)
    rows = idx.repeat_interleave(kernel.numel())
    cols = (idx[:, None] + torch.arange(-r, r + 1, device=kernel.device)).clamp(0, size - 1)
    m = torch.zeros(size, size, dtype=kernel.dtype, device=kernel.device)
    m.index_put_((rows, cols.reshape(-1)), kernel.repeat(size), accumulate=True)
    return m


def _gaussian_blur(x, sigma, g):
    # Separable blur with replicated borders, written as two matrix products (fast for small images).
    k = _gaussian_kernel1d(sigma, x.dtype, x.device)
    blur_h = _blur_matrix(x.shape[2], k)
    blur_w = _blur_matrix(x.shape[3], k)
    return torch.matmul(torch.matmul(blur_h, x), blur_w.T)


def _contrast(x, c, g):
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _brightness(x, c, g):
    if x.shape[1] == 1:
        return x + c
    if x.shape[1] != 3:
        raise ValueError(f"corrupt: brightness needs 1- or 3-channel images, got {x.shape[1]} channels")
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(max=1.0)
    scale = v_new / v.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(v > 0, x * scale, v_new.expand_as(x))


def _jpeg(x, quality, g):
    from PIL import Image

    n, ch, h, w = x.shape
    if ch not in (1, 3):
        raise ValueError(f"corrupt: jpeg needs 1- or 3-channel images, got {ch} channels")
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    mode = "L" if ch == 1 else "RGB"
    for i in range(n):
        img = Image.fromarray(arr[i, :, :, 0] if ch == 1 else arr[i], mode=mode)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert(mode))
        out[i] = dec[:, :, None] if ch == 1 else dec
    y = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype)
    return y / 255.0


_FUNCS = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "jpeg": _jpeg,
}


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1-5) to a batch x of shape (N, C, H, W) in [0, 1].

    Returns a new tensor of the same shape, dtype and device, clipped to [0, 1]. Random draws come
    from `generator` (on its own device), so the result is a deterministic function of x and the
    generator's state; the generator is advanced. Raises ConfigError for an unknown name or
    severity and ValueError for a tensor that is not a 4-D float batch.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    _check_images(x)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"corrupt: generator must be a torch.Generator, got {type(generator).__name__}")
    c = CONSTANTS[name][severity - 1]
    work_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        y = _FUNCS[name](x.detach().to(work_dtype), c, generator)
        return y.clamp(0.0, 1.0).to(x.dtype)


# ----------------------------------------------------------------------------- evaluation


def _chunk_seed(seed: int, name: str, severity: int, chunk: int) -> int:
    """A stable 63-bit seed for one chunk of one (corruption, severity): independent of order."""
    digest = hashlib.sha256(f"sslrobust-corruption|{seed}|{name}|{severity}|{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _model_device(model, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return fallback


def corruption_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: Iterable[str],
    severities: Iterable[int],
    batch_size: int = 500,
    seed: int = 0,
) -> list[dict]:
    """Top-1 accuracy of `model` on x corrupted by each (name, severity).

    `model(batch)` must return class logits of shape (B, num_classes). The model is put in eval
    mode (its previous train/eval mode is restored afterwards) and run under torch.no_grad.
    Returns one record per (name, severity), names outer and severities inner, in the order given:
    ``{"corruption": name, "severity": s, "n_examples": N, "accuracy": float}``.

    The data are corrupted on the model's device in fixed chunks of 256 examples, each chunk with a
    CPU generator seeded from (seed, name, severity, chunk index); so results do not depend on the
    order of `names`/`severities`, on which other corruptions are evaluated, or on `batch_size`.
    """
    names = [_check_name(n) for n in names]
    severities = [_check_severity(s) for s in severities]
    _check_images(x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"corruption_accuracy: batch_size must be a positive integer, got {batch_size!r}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"corruption_accuracy: x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    n_total = int(x.shape[0])
    device = _model_device(model, x.device)
    was_training = model.training
    model.eval()
    records = []
    try:
        with torch.no_grad():
            for name in names:
                for severity in severities:
                    correct = _count_correct(model, x, y, name, severity, int(batch_size), int(seed), device)
                    acc = correct / n_total if n_total else math.nan
                    records.append(
                        {"corruption": name, "severity": severity, "n_examples": n_total, "accuracy": float(acc)}
                    )
    finally:
        model.train(was_training)
    return records


def _count_correct(model, x, y, name, severity, batch_size, seed, device) -> int:
    correct = 0
    pending_x: list[torch.Tensor] = []
    pending_y: list[torch.Tensor] = []
    pending = 0

    def run(bx: torch.Tensor, by: torch.Tensor) -> int:
        logits = model(bx)
        return int((logits.argmax(dim=1) == by).sum().item())

    n_total = x.shape[0]
    for chunk, start in enumerate(range(0, n_total, _CHUNK)):
        g = torch.Generator(device="cpu")
        g.manual_seed(_chunk_seed(seed, name, severity, chunk))
        xc = corrupt(x[start : start + _CHUNK].to(device), name, severity, g)
        pending_x.append(xc)
        pending_y.append(y[start : start + _CHUNK].to(device))
        pending += xc.shape[0]
        while pending >= batch_size:
            bx, by = torch.cat(pending_x), torch.cat(pending_y)
            correct += run(bx[:batch_size], by[:batch_size])
            pending_x, pending_y = [bx[batch_size:]], [by[batch_size:]]
            pending -= batch_size
    if pending:
        correct += run(torch.cat(pending_x), torch.cat(pending_y))
    return correct
