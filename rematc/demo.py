"""``rematc demo``: train a built-in GPT at 40% of its no-remat peak and compare with plain autograd."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

from profiler.meter import MemoryMeter
from solvers import format_bytes

from .api import Rockmate
from .models import TinyGPT, TinyGPTConfig, lm_loss


@dataclass(frozen=True)
class DemoResult:
    """The figures ``rematc demo`` prints (all measured except the predictions)."""

    baseline_predicted_bytes: int
    plain_measured_bytes: int
    budget_bytes: int
    predicted_bytes: int
    measured_bytes: int
    step_time_ratio: float
    max_grad_diff: float
    plan_seconds: float

    def table(self) -> str:
        rows = [
            ("no-remat peak (predicted)", format_bytes(self.baseline_predicted_bytes)),
            ("plain autograd peak (measured)", format_bytes(self.plain_measured_bytes)),
            ("budget", format_bytes(self.budget_bytes)),
            ("rematc peak (predicted)", format_bytes(self.predicted_bytes)),
            ("rematc peak (measured)", format_bytes(self.measured_bytes)),
            ("step time / plain autograd", f"{self.step_time_ratio:.2f}x"),
            ("max |grad - plain grad|", f"{self.max_grad_diff:.3g}"),
            ("planning time", f"{self.plan_seconds:.2f} s"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    @property
    def within_budget(self) -> bool:
        return self.measured_bytes <= self.budget_bytes


def run_demo(
    config: TinyGPTConfig = TinyGPTConfig(), batch_size: int = 8, budget: float | int | str = 0.4, steps: int = 5
) -> DemoResult:
    """Train TinyGPT with rematc and with plain autograd side by side (CPU, one thread)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyGPT(config)
    plain = copy.deepcopy(model)
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.seq_len + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rm = Rockmate(model, inputs, budget, loss_fn=lm_loss, loss_args=(targets,))

    optimizers = {
        "rematc": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "plain": torch.optim.AdamW(plain.parameters(), lr=1e-3),
    }
    steps_of = {
        "rematc": lambda: rm(inputs, loss_args=(targets,)),
        "plain": lambda: lm_loss(plain(inputs), targets),
    }
    seconds: dict[str, list[float]] = {"rematc": [], "plain": []}
    peaks: dict[str, int] = {}
    max_grad_diff = 0.0
    for step in range(steps):
        for name in ("plain", "rematc"):  # interleaved, same seed: same dropout masks
            optimizers[name].zero_grad(set_to_none=True)
            torch.manual_seed(step)
            started = time.perf_counter()
            with MemoryMeter("cpu") as meter:
                steps_of[name]().backward()
            seconds[name].append(time.perf_counter() - started)
            peaks[name] = max(peaks.get(name, 0), meter.peak_bytes)
        for p, q in zip(model.parameters(), plain.parameters()):
            max_grad_diff = max(max_grad_diff, (p.grad - q.grad).abs().max().item())
        for optimizer in optimizers.values():
            optimizer.step()
    return DemoResult(
        baseline_predicted_bytes=rm.baseline_peak_bytes,
        plain_measured_bytes=peaks["plain"],
        budget_bytes=rm.budget_bytes,
        predicted_bytes=rm.predicted_peak_bytes,
        measured_bytes=peaks["rematc"],
        step_time_ratio=statistics.median(seconds["rematc"]) / statistics.median(seconds["plain"]),
        max_grad_diff=max_grad_diff,
        plan_seconds=rm.plan_seconds,
    )
