"""Out-of-distribution detection (Hendrycks, Mazeika, Kadavath, Song 2019, section 4): scores, OOD
sets that need no download, and the detection measures.

Scores are *anomaly* scores: higher means "more likely out-of-distribution".

- `msp`: the maximum softmax probability baseline (Hendrycks and Gimpel 2017), as −max_c p(c|x).
- `rotation`: the seed paper's score,
  −KL(U ‖ p(y|x)) + ¼ Σ_{r∈{0°,90°,180°,270°}} KL(one_hot(r) ‖ p_rot(·|rot_r(x))).
  The first term is low for confident class predictions; KL from a one-hot target is the rotation
  cross-entropy, so the second term is the mean rotation-prediction loss over the four rotations.
  It needs the rotation head (`ssl_task: rotation`); a λ = 0 model has that head untrained.

OOD sets, all in [0, 1] pixels with the in-distribution image shape, fixed by the trial seed:

- `gaussian`: iid N(0.5, 0.25²) pixels clipped to [0, 1] (Hendrycks' N(0, 0.5²) in [−1, 1] space);
- `rademacher`: iid pixels 0 or 1 with probability ½ each;
- `blobs`: Bernoulli(0.7) pixels, Gaussian blur σ = 1.5 per channel, values below 0.75 set to 0;
- `mnist`: the MNIST test split through `trainables.data` (never downloaded here: its files must
  already be on disk; for 3-channel 32×32 datasets it is zero-padded and repeated per channel).

Measures (implemented here with numpy; tied scores are handled exactly, a tie counts one half
for AUROC and a group of tied scores is one threshold for the curves). The convention is the one
of Hendrycks' code (`get_measures(-in_score, -out_score)`): **in-distribution test images are the
positive class**, ranked by confidence (the negated anomaly score):

- AUROC: P(an in-distribution image is ranked above an OOD one) + ½·P(tie);
- AUPR: average precision with in-distribution as positive ("AUPR-In"),
  Σ_k (R_k − R_{k−1})·P_k over the distinct thresholds, as sklearn's average_precision_score;
- FPR95: the fraction of OOD images accepted at the highest threshold that accepts at least 95%
  of the in-distribution images (the lowest FPR among operating points with TPR ≥ 0.95; Hendrycks'
  code takes the operating point whose recall is nearest 0.95, which can differ slightly).
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from .config import OOD_SCORES, OOD_SETS
from .data import DatasetInfo, DatasetUnavailable, dataset_info, default_data_dir, load_split, to_float
from .device import autocast
from .records import EvalRecord
from .ssl import rotate

SCORES = OOD_SCORES
MEASURES = ("auroc", "aupr", "fpr95")
TPR_LEVEL = 0.95


# ---------------------------------------------------------------------------------------------
# Measures: `pos` are the scores of the positive class, higher = more positive.


def _arrays(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.asarray(neg, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("detection measures need at least one positive and one negative score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("detection scores must be finite (got NaN or inf)")
    return pos, neg


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auroc(pos, neg) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic over n_pos·n_neg (ties count ½)."""
    pos, neg = _arrays(pos, neg)
    ranks = _average_ranks(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _threshold_counts(pos, neg) -> tuple[np.ndarray, np.ndarray, int, int]:
    """True and false positives when accepting every score ≥ t, for each distinct score t in
    descending order (a group of tied scores is accepted together)."""
    pos, neg = _arrays(pos, neg)
    scores = np.concatenate([pos, neg])
    positive = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(positive)[last_of_group]
    fp = (last_of_group + 1) - tp
    return tp, fp, len(pos), len(neg)


def aupr(pos, neg) -> float:
    """Average precision of the positive class (step-wise area under precision-recall)."""
    tp, fp, n_pos, _ = _threshold_counts(pos, neg)
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(pos, neg, level: float = TPR_LEVEL) -> float:
    """False-positive rate at the highest threshold whose true-positive rate is ≥ level."""
    if not 0 < level <= 1:
        raise ValueError(f"TPR level must be in (0, 1], got {level}")
    tp, fp, n_pos, n_neg = _threshold_counts(pos, neg)
    needed = math.ceil(level * n_pos - 1e-9)  # integer count: no float round-off at e.g. 19/20
    index = int(np.argmax(tp >= needed))  # tp is non-decreasing and reaches n_pos
    return float(fp[index] / n_neg)


def detection_measures(in_anomaly, out_anomaly) -> dict[str, float]:
    """AUROC, AUPR and FPR95 of anomaly scores, in-distribution as the positive class."""
    pos, neg = -np.asarray(in_anomaly, dtype=np.float64), -np.asarray(out_anomaly, dtype=np.float64)
    return {"auroc": auroc(pos, neg), "aupr": aupr(pos, neg), "fpr95": fpr_at_tpr(pos, neg)}


# ---------------------------------------------------------------------------------------------
# OOD sets


def _set_generator(name: str, seed: int) -> torch.Generator:
    # Fixed per (trial seed, set): the same images whatever other sets are evaluated.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def gaussian_noise(n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    return (0.5 + 0.25 * torch.randn((n, *shape), generator=generator)).clamp_(0.0, 1.0)


def rademacher_noise(n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n, *shape), generator=generator).float()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def blobs(n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    x = torch.bernoulli(torch.full((n, *shape), 0.7), generator=generator)
    x = _gaussian_blur(x, 1.5)
    x[x < 0.75] = 0.0
    return x.clamp_(0.0, 1.0)


def _fit_shape(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """A held-out dataset's images in the in-distribution shape (centre pad/crop, channels)."""
    size = info.size
    if x.shape[-1] != size:
        diff = size - x.shape[-1]
        if diff > 0:
            x = F.pad(x, (diff // 2, diff - diff // 2, diff // 2, diff - diff // 2))
        else:
            start = -diff // 2
            x = x[..., start : start + size, start : start + size]
    if x.shape[1] != info.channels:
        x = x.mean(1, keepdim=True) if info.channels == 1 else x.expand(-1, info.channels, -1, -1)
    return x.contiguous()


def heldout_dataset(name: str, n: int, info: DatasetInfo, data_dir=None, seed: int = 0) -> torch.Tensor:
    """n test images of another dataset (never downloaded: its files must be on disk)."""
    root = data_dir if data_dir is not None else default_data_dir()
    try:
        split = load_split(name, False, data_dir, subset=n, seed=seed, download=False)
    except DatasetUnavailable as err:
        detail = str(err).split(": ", 1)[-1].split("; looked in")[0]
        if detail.startswith("not found"):
            detail = "its files are not on disk"
        raise DatasetUnavailable(
            f"OOD set '{name}' unavailable ({detail}): OOD sets are never downloaded; put the "
            f"{dataset_info(name).name} test files under {root} (for mnist: MNIST/raw/t10k-*-ubyte[.gz]), "
            f"pass --data-dir / set SSLROBUST_DATA_DIR to a directory that has them, or drop '{name}' "
            f"from ood_sets"
        ) from None
    return _fit_shape(to_float(split.images), info)


def ood_images(name: str, n: int, info: DatasetInfo, seed: int = 0, data_dir=None) -> torch.Tensor:
    """The OOD set `name` as n float images in [0, 1] of the in-distribution shape (CPU)."""
    shape = (info.channels, info.size, info.size)
    generator = _set_generator(name, seed)
    if name == "gaussian":
        return gaussian_noise(n, shape, generator)
    if name == "rademacher":
        return rademacher_noise(n, shape, generator)
    if name == "blobs":
        return blobs(n, shape, generator)
    if name == "mnist":
        if info.name == "mnist":
            raise ValueError("OOD set 'mnist' is the in-distribution dataset itself")
        return heldout_dataset("mnist", n, info, data_dir, seed)
    raise ValueError(f"unknown OOD set {name!r}; choose one of {', '.join(OOD_SETS)}")


def check_available(sets, info: DatasetInfo, data_dir=None) -> None:
    """Fail fast (before training) when an OOD set that is read from disk is missing."""
    for name in sets:
        if name == "mnist" and info.name != "mnist":
            ood_images(name, 1, info, data_dir=data_dir)


# ---------------------------------------------------------------------------------------------
# Scores


@torch.no_grad()
def anomaly_scores(model, x: torch.Tensor, scores=SCORES, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Anomaly scores (higher = more OOD) of images x (float in [0, 1]) in the model's eval mode."""
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown OOD score {unknown[0]!r}; choose from {', '.join(SCORES)}")
    use_rotation = "rotation" in scores
    if use_rotation and "rotation" not in getattr(model, "ssl_heads", {}):
        raise ValueError("OOD score 'rotation' needs a model with a rotation head (ssl_task: rotation)")
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {s: [] for s in scores}
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        n = len(xb)
        with autocast(device):
            if use_rotation:
                features = model.features(torch.cat([rotate(xb, k) for k in range(4)]))
                logits = model.head(features[:n])
                rot_logits = model.ssl_heads["rotation"](features)
            else:
                logits = model(xb)
        log_p = F.log_softmax(logits.float(), dim=1)
        if "msp" in scores:
            out["msp"].append(-log_p.exp().max(1).values)
        if use_rotation:
            num_classes = log_p.shape[1]
            kl_uniform = -math.log(num_classes) - log_p.mean(1)  # KL(U ‖ p)
            targets = torch.arange(4, device=device).repeat_interleave(n)
            rot_ce = F.cross_entropy(rot_logits.float(), targets, reduction="none").view(4, n).mean(0)
            out["rotation"].append(-kl_uniform + rot_ce)
    return {s: torch.cat(v).cpu().numpy().astype(np.float64) for s, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Records for the results table


def ood_records(model, x_in: torch.Tensor, config: dict, data_dir=None, clean_acc: float | None = None,
                info: DatasetInfo | None = None) -> list[EvalRecord]:
    """One record per OOD set × score × measure (kind OOD: attack "none", the measure in `value`,
    n_examples the number of OOD images; norm, eps_test, robust_acc and the attack's settings
    empty). Empty when config["ood_sets"] is empty."""
    sets = list(config.get("ood_sets") or [])
    if not sets:
        return []
    scores = list(config.get("ood_scores") or SCORES)
    info = info or getattr(model, "info", None) or dataset_info(config["dataset"])
    batch_size = int(config.get("eval_batch_size", 500))
    seed = int(config.get("seed", 0))
    n_ood = config.get("ood_examples") or len(x_in)
    in_scores = anomaly_scores(model, x_in, scores, batch_size)
    records = []
    for name in sets:
        x_out = ood_images(name, int(n_ood), info, seed=seed, data_dir=data_dir)
        out_scores = anomaly_scores(model, x_out, scores, batch_size)
        for score in scores:
            for measure, value in detection_measures(in_scores[score], out_scores[score]).items():
                records.append(EvalRecord(
                    attack="none", n_examples=int(len(x_out)),
                    clean_acc=float("nan") if clean_acc is None else float(clean_acc),
                    ood_set=name, score=score, measure=measure, value=float(value),
                ))
    return records
