"""The chain DP: equal to brute force on random small chains, and conservative when discretised."""

from __future__ import annotations

import math
import random

import pytest

from solvers.rotor import (ChainBlock, ChainOption, brute_force_chain, chain_peak_bytes, min_chain_budget,
                           solve_chain)


def _random_chain(rng: random.Random, n_blocks: int) -> list[ChainBlock]:
    blocks = []
    for b in range(n_blocks):
        x = 0 if b == 0 else rng.randint(1, 10)
        grad = 0 if b == n_blocks - 1 else rng.randint(1, 10)
        options = []
        for _ in range(rng.randint(1, 3)):
            forward_peak = x + rng.randint(1, 20)
            kept = rng.randint(0, 15)
            backward_peak = grad + kept + rng.randint(0, 20)
            reads_output = rng.random() < 0.4
            if rng.random() < 0.5:  # keep-mode numbers derived conservatively
                options.append(ChainOption(round(rng.uniform(1, 10), 2), forward_peak, kept, backward_peak,
                                           reads_output))
            else:
                options.append(ChainOption(
                    round(rng.uniform(1, 10), 2), forward_peak, kept, backward_peak, reads_output,
                    forward_peak + rng.randint(0, x), max(0, kept - rng.randint(0, 3)),
                    backward_peak + rng.randint(0, x)))
        tails = tuple(ChainOption(round(rng.uniform(0.5, 8), 2), x + rng.randint(0, 5), 0,
                                  grad + rng.randint(1, 30)) for _ in range(rng.randint(0, 2)))
        checkpointable = rng.random() < 0.8
        blocks.append(ChainBlock(
            x, grad, rng.randint(0, 3), tuple(options),
            round(rng.uniform(0.5, 4), 2) if checkpointable else math.inf,
            x + rng.randint(1, 15), x + rng.randint(1, 15), tails))
    return blocks


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        blocks = _random_chain(rng, rng.randint(1, 4))
        for budget in range(0, 110, 9):
            brute = brute_force_chain(blocks, budget)
            # One byte per unit: the DP is exact and must find the same optimum.
            dp = solve_chain(blocks, budget, slots=max(budget, 1))
            assert (brute is None) == (dp is None), (blocks, budget, brute, dp)
            if dp is not None and brute is not None:
                assert dp.time_ms == pytest.approx(brute.time_ms)
                assert dp.peak_bytes == chain_peak_bytes(blocks, dp.moves) <= budget


@pytest.mark.parametrize("seed", range(4))
def test_coarse_units_stay_within_budget(seed: int) -> None:
    rng = random.Random(100 + seed)
    for _ in range(20):
        blocks = _random_chain(rng, rng.randint(2, 6))
        for budget in (40, 60, 90, 140):
            exact = solve_chain(blocks, budget, slots=budget)
            coarse = solve_chain(blocks, budget, slots=7)
            if coarse is not None:
                assert chain_peak_bytes(blocks, coarse.moves) <= budget
                assert exact is not None and exact.time_ms <= coarse.time_ms + 1e-9


def test_time_does_not_grow_with_budget() -> None:
    rng = random.Random(7)
    blocks = _random_chain(rng, 6)
    times = [plan.time_ms for budget in range(0, 200, 5)
             if (plan := solve_chain(blocks, budget, slots=max(budget, 1))) is not None]
    assert times and all(a >= b - 1e-9 for a, b in zip(times, times[1:]))


def test_min_chain_budget_is_feasible_and_tight() -> None:
    rng = random.Random(3)
    blocks = _random_chain(rng, 5)
    low = min_chain_budget(blocks, 300, slots=300)
    assert low is not None
    assert solve_chain(blocks, low, slots=max(low, 1)) is not None
    assert solve_chain(blocks, low - 1, slots=max(low - 1, 1)) is None


def test_checkpointing_beats_keeping_everything_when_memory_is_short() -> None:
    # Four identical blocks: keeping everything needs 4 x 10 kept bytes plus the last
    # block's peak; checkpointing keeps only inputs and recomputes forwards.
    option = ChainOption(time_ms=2.0, forward_peak_bytes=12, kept_bytes=10, backward_peak_bytes=14)
    blocks = [ChainBlock(0 if b == 0 else 2, 0 if b == 3 else 2, 0, (option,), 1.0, 4, 4) for b in range(4)]
    roomy = solve_chain(blocks, 100, slots=100)
    tight = solve_chain(blocks, 30, slots=30)
    assert roomy is not None and tight is not None
    assert roomy.time_ms == pytest.approx(8.0)
    assert tight.time_ms > roomy.time_ms
    assert any(kind == "Fck" for kind, _, _ in tight.moves)
    assert tight.peak_bytes <= 30


def test_non_checkpointable_block_runs_once() -> None:
    option = ChainOption(time_ms=2.0, forward_peak_bytes=12, kept_bytes=10, backward_peak_bytes=14)
    once = ChainBlock(2, 2, 0, (option,))  # forward_only_ms = inf
    blocks = [ChainBlock(0, 2, 0, (option,), 1.0, 4, 4), once, ChainBlock(2, 0, 0, (option,), 1.0, 4, 4)]
    for budget in range(20, 80, 3):
        plan = solve_chain(blocks, budget, slots=budget)
        if plan is not None:
            forwards_of_1 = [m for m in plan.moves if m[1] == 1 and m[0] != "B" and m[0] != "Bk"]
            assert len(forwards_of_1) == 1


def test_repr_is_short() -> None:
    block = ChainBlock(0, 0, 0, (ChainOption(3.0, 10, 0, 10),))
    assert repr(solve_chain([block], 10)) == "ChainPlan(Fall0.0 B0.0; 3 ms, 10 B)"
