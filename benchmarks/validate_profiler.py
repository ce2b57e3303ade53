"""Does the cost model predict the real step? Predicted (simulate + measured costs) vs measured.

For plain autograd (predicted by the no-remat schedule) and rematc at two
budgets, on a GPT-2-style model and a CNN: the step time ``simulate`` predicts
from the measured per-op costs against the measured median step time
(interleaved runs), and the predicted peak against the meter.

Usage:
    python benchmarks/validate_profiler.py [--device cpu|cuda] [--repeats 9]

Goals (issue 4): time within 20% on CPU, 10% on GPU; peak within 3% on GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiler.meter import MemoryMeter  # noqa: E402
from rematc import BudgetTooSmall, Rockmate  # noqa: E402
from rematc.models import TinyGPT, TinyGPTConfig, lm_loss  # noqa: E402


def gpt(device: str):
    config = TinyGPTConfig(vocab_size=1024, seq_len=128, n_layer=4, n_head=4, n_embd=192, dropout=0.0)
    model = TinyGPT(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (8, config.seq_len + 1), device=device)
    return "gpt (4x192, seq 128, batch 8)", model, tokens[:, :-1], tokens[:, 1:], lm_loss


def cnn(device: str):
    layers: list[torch.nn.Module] = []
    chans = [3, 32, 64, 64, 128]
    for a, b in zip(chans, chans[1:]):
        layers += [torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.BatchNorm2d(b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10)).to(device)
    x = torch.randn(16, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    return "cnn (4 conv+bn, 32x32, batch 16)", model, x, y, torch.nn.functional.cross_entropy


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def validate(make, device: str, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    name, model, x, y, loss_fn = make(device)
    plain = copy.deepcopy(model)
    full = Rockmate(model, x, 1.0, loss_fn=loss_fn, loss_args=(y,), profile="measure")
    try:
        Rockmate(model, x, 1, loss_fn=loss_fn, loss_args=(y,), profile="measure")
    except BudgetTooSmall as err:
        low = err.min_budget_bytes
    high = full.baseline_peak_bytes
    variants = {"plain autograd": None}
    for label, budget in (("rematc 70% of range", int(low + 0.7 * (high - low))), ("rematc min", low)):
        variants[label] = Rockmate(model, x, budget, loss_fn=loss_fn, loss_args=(y,), profile="measure")
    steps = {
        label: (lambda rm=rm: rm(x, loss_args=(y,)).backward()) if rm is not None
        else (lambda: loss_fn(plain(x), y).backward())
        for label, rm in variants.items()
    }
    seconds = {label: [] for label in steps}
    peaks = {}
    for label, step in steps.items():  # warm-up and memory
        step()
        model.zero_grad(set_to_none=True), plain.zero_grad(set_to_none=True)
        with MemoryMeter(device) as meter:
            step()
        peaks[label] = meter.peak_bytes
    for _ in range(repeats):  # interleaved timing
        for label, step in steps.items():
            model.zero_grad(set_to_none=True), plain.zero_grad(set_to_none=True)
            seconds[label].append(timed(step, device))
    rows = []
    for label, rm in variants.items():
        predicted_s = full.baseline_step_seconds if rm is None else rm.predicted_step_seconds
        predicted_b = full.baseline_peak_bytes if rm is None else rm.predicted_peak_bytes
        measured_s = statistics.median(seconds[label])
        rows.append((name, label, predicted_s, measured_s, predicted_b, peaks[label]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    os.environ.setdefault("REMATC_CACHE_DIR", tempfile.mkdtemp(prefix="rematc-validate-"))
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, 1 thread"
    print(f"device: {args.device} ({machine}), torch {torch.__version__}, repeats {args.repeats}\n")
    print("| model | schedule | predicted step ms | measured step ms | time error | predicted peak MiB | measured peak MiB | peak error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for make in (gpt, cnn):
        for name, label, ps, ms, pb, mb in validate(make, args.device, args.repeats):
            print(
                f"| {name} | {label} | {ps * 1e3:.1f} | {ms * 1e3:.1f} | {100 * (ps - ms) / ms:+.1f}% "
                f"| {pb / 2**20:.2f} | {mb / 2**20:.2f} | {100 * (pb - mb) / mb:+.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
