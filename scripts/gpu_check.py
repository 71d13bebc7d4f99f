"""The project's GPU check: one command for the few minutes a CUDA machine is at hand.

    python scripts/gpu_check.py [--steps 40] [--eval-images 1000] [--peak-tflops N] [--skip-study]

On a CUDA machine it
1. trains one `paper`-scale trial of the `hendrycks2019` study (WRN-40-2, CIFAR-10 shape, PGD-10 at
   8/255 with the four rotations perturbed independently, λ = 0.5) for `--steps` optimiser steps
   through the project's own Trainer, so bf16 autocast, channels_last, cuDNN autotuning and data
   held on the GPU as uint8 are the code paths measured, and prints training images per second
   (after one warm-up epoch), peak GPU memory, the fraction of a step's wall time in which the GPU
   runs no kernel (torch.profiler over a few steps), the FLOPs of one training image and one
   forward pass (torch.utils.flop_counter), and the achieved fraction of the GPU's bf16 peak (MFU);
2. evaluates that model as a trial does (the study's evaluation settings at ε_test = 8/255, every
   example attacked) and prints attacked images per second;
3. runs four trials of `resources.gpu: 0.25` side by side on the one GPU through the study command
   (`hendrycks2019 --scale smoke` on CIFAR-10-format files) and checks that all four finish with
   results.

The CIFAR-10 images are random pixels written in the official on-disk format (the machine may have
no internet): the throughput figures do not depend on pixel values, the accuracies printed mean
nothing. Without CUDA the script says so in one line and exits 0. Record what it prints in
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts, no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}


def write_cifar10_files(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images as `cifar-10-batches-py` (five training batches and a test batch, each a
    pickled dict of uint8 rows of 3,072 = R, G, B planes and integer labels), as torchvision and
    `trainables.datafiles` read them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = -(-n_train // 5)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f, protocol=2)


def bf16_peak(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return tflops
    return None


def paper_config(steps: int) -> dict:
    from orchestrator.spec import load_study

    spec = load_study("hendrycks2019", "paper", [])
    trial = next(t for t in spec.trials() if t.config["ssl_weight"] > 0)
    return {**trial.config, "train_subset": steps * trial.config["batch_size"], "epochs": 1000}


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gpu_idle_fraction(trainer) -> float:
    """1 − (time with a kernel running) / wall time, over one short epoch under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        trainer.train_epoch()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    intervals = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, current_start, current_end = 0.0, None, None  # union of kernel intervals, in µs
    for start_us, end_us in intervals:
        if current_end is None or start_us > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start_us, end_us
        else:
            current_end = max(current_end, end_us)
    if current_end is not None:
        busy += current_end - current_start
    return max(0.0, 1.0 - busy * 1e-6 / wall)


def check_training_and_evaluation(args, data_dir: Path) -> None:
    from trainables.data import ImageTensors
    from trainables.evaluate_model import evaluate_model
    from trainables.train import Trainer

    config = paper_config(args.steps)
    print(f"trial: hendrycks2019 paper scale, arch {config['arch']}-{config['depth']}-{config['width']}, "
          f"batch {config['batch_size']}, PGD-{config['train_attack_steps']} at ε {config['eps_train']:.4f}, "
          f"rotations {config['rotations']} ({config['ssl_perturbation']}), λ {config['ssl_weight']}")
    trainer = Trainer(config, data_dir=str(data_dir), device="cuda")
    config = trainer.config
    if not trainer.train_data.images.is_cuda:
        print("WARNING: the training data are not on the GPU")
    torch.cuda.reset_peak_memory_stats()
    warm = trainer.train_epoch()  # cuDNN autotuning and the allocator's first growth
    timed = trainer.train_epoch()
    print(f"training: {timed['images_per_second']:.0f} images/s ({args.steps} steps of {config['batch_size']}; "
          f"warm-up epoch {warm['images_per_second']:.0f} images/s), peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    full = trainer.train_data
    few = max(2, min(args.steps, 10)) * config["batch_size"]
    trainer.train_data = ImageTensors(full.images[:few], full.labels[:few], full.info)
    print(f"GPU idle during training steps: {gpu_idle_fraction(trainer):.1%} of wall time (torch.profiler, "
          f"{few // config['batch_size']} steps)")
    one_batch = config["batch_size"]
    trainer.train_data = ImageTensors(full.images[:one_batch], full.labels[:one_batch], full.info)
    step_flops = flops_of(trainer.train_epoch)
    x = torch.rand(one_batch, *full.images.shape[1:], device="cuda")
    trainer.model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        forward_flops = flops_of(lambda: trainer.model(x))
    per_image = step_flops / one_batch
    achieved = per_image * timed["images_per_second"] / 1e12
    peak = bf16_peak(torch.cuda.get_device_name(), args.peak_tflops)
    mfu = f"{achieved / peak:.1%} of {peak:.0f} TFLOP/s bf16" if peak else "n/a (pass --peak-tflops)"
    print(f"model FLOPs: {forward_flops / one_batch / 1e9:.2f} GFLOP per forward image, "
          f"{per_image / 1e9:.1f} GFLOP per training image (attack + SSL + update); "
          f"achieved {achieved:.1f} TFLOP/s, MFU {mfu}")

    test = trainer.test_data()
    n = min(args.eval_images, len(test))
    x, y = test.images[:n].float() / 255, test.labels[:n]
    eval_config = {**trainer.config, "eval_eps_linf": [8 / 255], "eval_norms": ["linf"]}
    model, _ = trainer.selected_model()
    evaluate_model(model, x[:64], y[:64], eval_config)  # warm-up at the evaluation's shapes
    torch.cuda.synchronize()
    start = time.perf_counter()
    records = evaluate_model(model, x, y, eval_config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    attacked = [r for r in records if r.get("eps_test") and r["eps_test"] > 0]
    attack = attacked[0]["attack"] if attacked else "?"
    print(f"evaluation ({attack}, {config['eval_attack_steps']} steps, ε 8/255): {n / seconds:.0f} images/s "
          f"over {n} test images ({seconds:.1f} s; only correctly classified images are attacked)")


def check_four_trials_share_the_gpu(data_dir: Path, work: Path) -> bool:
    storage, tracking = work / "runs", f"sqlite:///{work / 'mlflow.db'}"
    command = [sys.executable, "-m", "orchestrator.study", "hendrycks2019", "--scale", "smoke",
               "--set", "dataset=cifar10", "--set", "seeds=[0,1]", "--resources", "cpu=1,gpu=0.25",
               "--data-dir", str(data_dir), "--storage", str(storage), "--tracking-uri", tracking]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f"four trials at gpu 0.25: FAILED (exit {done.returncode}); last output:\n" + done.stdout[-3000:]
              + done.stderr[-3000:])
        return False
    from orchestrator import results

    table = results.load("hendrycks2019", str(storage))
    trials = table["config_hash"].nunique()
    ok = trials == 4
    print(f"four trials at gpu 0.25 through the study command: {trials} of 4 finished with results "
          f"in {seconds:.0f} s ({'ok' if ok else 'FAILED'})")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per timed epoch")
    parser.add_argument("--eval-images", type=int, default=1000, help="test images attacked")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not known here")
    parser.add_argument("--skip-study", action="store_true", help="skip the four-trial study check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build "
              f"{torch.version.cuda or 'none'}); nothing to check on this machine")
        return 0
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    with tempfile.TemporaryDirectory(prefix="sslrobust-gpu-check-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        write_cifar10_files(data_dir, n_train=max(5000, args.steps * 128), n_test=max(1000, args.eval_images))
        ok = guarded("training and evaluation", check_training_and_evaluation, args, data_dir)
        if not args.skip_study:
            ok = guarded("four trials at gpu 0.25", check_four_trials_share_the_gpu, data_dir, work) and ok
    return 0 if ok else 1


def guarded(what: str, check, *args) -> bool:
    """Run one check; a failure is printed and the next check still runs (GPU minutes are few)."""
    try:
        return check(*args) is not False
    except Exception as exc:  # noqa: BLE001 - reported, and the script exits 1 at the end
        import traceback

        traceback.print_exc()
        print(f"{what}: FAILED ({type(exc).__name__}: {exc})")
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
