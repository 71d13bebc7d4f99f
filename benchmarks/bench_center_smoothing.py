"""Throughput of center smoothing's noise samples on the default model, against two references.

    python benchmarks/bench_center_smoothing.py [--repeats 5] [--n 1000] [--loop-n 100]

The default model: small_cnn on Fashion-MNIST (untrained weights: throughput does not depend on
them), in eval mode with BatchNorm folded, the function `center_smoothing_records` certifies. Timed,
interleaved (A B C D, D C B A, ...):

- batched: the n noisy copies of one test image through `model.features` as one batch, noise drawn
  in one call (`trainables.center_smoothing.noisy_features`, what the certificate runs);
- loop: noisy copies one at a time (batch of one, a noise draw each; loop-n of them, as the loop
  is slow): the reference the batching is measured against;
- plain: one forward pass of n clean test images (no noise): the model's own throughput, the
  ceiling for the batched sampling;
- certify: `center_certify` of one image with the default settings (n0 = 100 samples for the
  centre, 100 for its check, n = 1000 for the bound; ε grid 0.05, 0.1, 0.2), samples counted as
  n0 + n0 + n.

Printed: samples per second of each, and the paired ratios of the time per sample: loop/batched
(the speed-up of batching), batched/plain and certify/plain (relative to a plain forward).
"""
from __future__ import annotations

import argparse

import torch

import common
from trainables import center_smoothing as cs
from trainables.config import resolve
from trainables.datafiles import dataset_info
from trainables.device import prepare_input
from trainables.folding import folded_for_eval
from trainables.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--loop-n", type=int, default=100)
    args = parser.parse_args()
    common.setup()
    print(common.machine())
    print(f"load average before: {common.load_average()}")
    defaults = resolve({})
    x, _ = common.load_fmnist(args.n)
    model = build_model("small_cnn", dataset_info("fashion_mnist")).eval().to(memory_format=torch.channels_last)
    folded = folded_for_eval(model)

    def features(batch):
        return folded.features(prepare_input(batch))

    image = x[:1]
    sigma = defaults["center_smoothing_sigma"]
    n0, n = defaults["center_smoothing_n0"], defaults["center_smoothing_n"]

    @torch.no_grad()
    def batched():
        g = torch.Generator().manual_seed(0)
        return cs.noisy_features(features, image, args.n, sigma, g, batch_size=args.n)

    @torch.no_grad()
    def loop():
        g = torch.Generator().manual_seed(0)
        return torch.cat([features(image + sigma * torch.randn(image.shape, generator=g)) for _ in range(args.loop_n)])

    @torch.no_grad()
    def plain():
        return features(x[: args.n])

    def certify():
        return cs.center_certify(features, image, sigma=sigma, eps=defaults["center_smoothing_eps"], n0=n0, n=n,
                                 alpha=defaults["center_smoothing_alpha"], delta=defaults["center_smoothing_delta"],
                                 batch_size=defaults["eval_batch_size"], seed=0)

    times = common.interleaved(dict(batched=batched, loop=loop, plain=plain, certify=certify), args.repeats)
    samples = {"batched": args.n, "loop": args.loop_n, "plain": args.n, "certify": 2 * n0 + n}
    for name, count in samples.items():
        print(f"{name:8s} {count / common.median(times[name]):9.0f} samples/s  ({common.summary(times[name])}, "
              f"{count} samples)")
    per_sample = {k: [t / samples[k.split(":")[0]] for t in v] for k, v in times.items()}
    print(common.ratio_line("loop / batched (time per sample)", per_sample, "loop", "batched")[1])
    print(common.ratio_line("batched / plain (time per sample, noisy vs clean)", per_sample, "batched", "plain")[1])
    print(common.ratio_line("certify / plain (time per sample)", per_sample, "certify", "plain")[1])
    print(f"load average after: {common.load_average()}")


if __name__ == "__main__":
    main()
