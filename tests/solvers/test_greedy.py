"""The recompute-schedule builder, its fast simulator, the greedy planner and ``solve``."""

from __future__ import annotations

import functools
import random

import pytest

import solvers.greedy as greedy
from solvers import (
    METHODS,
    BudgetInfeasible,
    Graph,
    Schedule,
    build_remat_schedule,
    check,
    greedy_schedule,
    min_feasible_peak,
    no_remat_schedule,
    schedule_from_order,
    simulate,
    solve,
)
from solvers.greedy import min_feasible_peak_greedy
from solvers.recompute import remat_context
from tests.solvers.graphs import GraphBuilder, chain_graph, mlp_chain_graph, random_training_graph


@functools.cache
def _random_graph(seed: int, n_forward_ops: int) -> Graph:
    rng = random.Random(seed)
    return random_training_graph(
        rng, n_forward_ops, extra_forward_outputs=seed % 3, kept_forward_values=seed % 2,
        non_recomputable_prob=(0.0, 0.05, 0.2)[seed % 3], multi_output_prob=(0.1, 0.3)[seed % 2],
    )


RANDOM_GRAPHS = [(seed, n) for n in (3, 12, 40, 100) for seed in range(4)]


def _computes(schedule: Schedule) -> list[int]:
    return [*schedule.computes("forward"), *schedule.computes("backward")]


def _made_by_recomputable_op(graph: Graph, value: int) -> bool:
    producer = graph.values[value].producer
    assert producer is not None
    return graph.ops[producer].recomputable


# --- the builder ------------------------------------------------------------------------------
def _weight_copy_graph() -> Graph:
    """``y = mm(x, W)``; the backward reads ``t(W)``, a copy no forward op needs."""
    b = GraphBuilder()
    x, w = b.resident("x"), b.resident("W")
    (h,) = b.add("mm", [x, w], [100])                                  # op 0
    (wt,) = b.add("t", [w], [50])                                      # op 1: forward, backward-only
    (a,) = b.add("relu", [h], [100])                                   # op 2
    (loss,) = b.add("loss", [a], [1])                                  # op 3
    (dl,) = b.add("d_loss", [], [1], is_backward=True, recomputable=False, is_input=True)  # op 4
    (da,) = b.add("loss_bwd", [dl, a], [100], is_backward=True)       # op 5
    (dh,) = b.add("relu_bwd", [da, a], [100], is_backward=True)       # op 6
    (dx,) = b.add("mm_bwd", [dh, wt], [100], is_backward=True)        # op 7
    return b.build(forward_outputs=[loss], required_at_end=[dx])


def test_no_remat_runs_backward_only_forward_ops_once_just_before_first_use() -> None:
    graph = _weight_copy_graph()
    schedule = no_remat_schedule(graph)
    assert schedule.computes("forward") == (0, 2, 3)
    assert schedule.computes("backward") == (4, 5, 6, 1, 7)  # t(W) right before mm_bwd
    check(graph, schedule)


def test_unsaved_value_is_recomputed_just_in_time_with_its_missing_inputs() -> None:
    graph = mlp_chain_graph(2)  # ops: linear0 relu0 linear1 relu1 loss | d_loss loss_bwd ...
    relu0 = next(v for v, value in enumerate(graph.values) if value.name == "relu0")
    schedule = build_remat_schedule(graph, [relu0])
    names = [graph.ops[i].name for i in schedule.computes("backward")]
    # relu0 is first read by linear1_bwd; recomputing it needs linear0's output, which the
    # forward freed (only relu0 read it), so linear0 runs again first, in graph order.
    assert names == ["d_loss", "loss_bwd", "relu1_bwd", "linear0", "relu0", "linear1_bwd",
                     "relu0_bwd", "linear0_bwd"]
    check(graph, schedule)


def test_non_recomputable_values_are_kept_even_if_listed() -> None:
    b = GraphBuilder()
    x = b.resident("x")
    y, mask = b.add("dropout", [x], [100, 50], recomputable=False)
    (loss,) = b.add("loss", [y], [1])
    (dl,) = b.add("d_loss", [], [1], is_backward=True, recomputable=False, is_input=True)
    (dy,) = b.add("loss_bwd", [dl, y], [100], is_backward=True)
    (dx,) = b.add("dropout_bwd", [dy, mask], [100], is_backward=True)
    graph = b.build(forward_outputs=[loss], required_at_end=[dx])
    assert build_remat_schedule(graph, [y, mask]) == no_remat_schedule(graph)


@pytest.mark.parametrize("bad", [-1, 10**6, "1", 1.0])
def test_build_remat_schedule_rejects_non_indices(bad: object) -> None:
    with pytest.raises(ValueError, match="unsaved_values must hold value indices"):
        build_remat_schedule(chain_graph([10, 10]), [bad])  # type: ignore[list-item]


def test_build_remat_schedule_rejects_residents_and_backward_values() -> None:
    graph = chain_graph([10, 10])
    with pytest.raises(ValueError, match=r"value 0 \(x\) is resident"):
        build_remat_schedule(graph, [0])
    with pytest.raises(ValueError, match="made by a backward op"):
        build_remat_schedule(graph, [graph.required_at_end[0]])


@pytest.mark.parametrize(("seed", "n_forward_ops"), RANDOM_GRAPHS)
def test_fast_simulation_matches_simulate(seed: int, n_forward_ops: int) -> None:
    graph = _random_graph(seed, n_forward_ops)
    context = remat_context(graph)
    rng = random.Random(seed)
    candidates = [v for p in context.forward_phase for v in graph.ops[p].outputs]
    for fraction in (0.0, 0.2, 0.5, 1.0):
        unsaved = [v for v in candidates if rng.random() < fraction]
        schedule = build_remat_schedule(graph, unsaved)
        reference = simulate(graph, schedule)  # also checks the schedule
        recomputable = [v for v in unsaved if _made_by_recomputable_op(graph, v)]
        backward = context.backward_order(recomputable)
        assert schedule == schedule_from_order(graph, context.forward_phase, backward)
        fast = context.simulate(backward)
        assert fast is not None
        assert (fast.peak_bytes, fast.time_ms) == (reference.peak_bytes, reference.time_ms)
        assert context.simulate(backward, give_up_above=reference.peak_bytes - 1) is None or \
            reference.peak_bytes == 0
        for i, op in enumerate(graph.ops):  # non-recomputable ops run exactly once
            if not op.recomputable:
                assert _computes(schedule).count(i) == 1


# --- greedy -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("seed", "n_forward_ops"), RANDOM_GRAPHS)
def test_greedy_fits_every_budget_or_says_why(seed: int, n_forward_ops: int) -> None:
    graph = _random_graph(seed, n_forward_ops)
    baseline = simulate(graph, no_remat_schedule(graph))
    minimum = min_feasible_peak_greedy(graph)
    assert minimum <= baseline.peak_bytes
    # From the no-remat peak down to 0, with the minimum and just below it.
    budgets = {baseline.peak_bytes * k // 12 for k in range(13)} | {minimum, max(minimum - 1, 0)}
    previous_time_ms = 0.0
    for budget in sorted(budgets, reverse=True):
        try:
            schedule = greedy_schedule(graph, budget)
        except BudgetInfeasible as error:
            assert error.min_feasible_bytes > budget
            assert error.min_feasible_bytes == minimum
            assert error.method == "greedy"
            continue
        result = simulate(graph, schedule)  # checks it too
        assert result.peak_bytes <= budget
        assert budget >= minimum
        assert result.time_ms >= previous_time_ms - 1e-9  # lower budget, never faster
        previous_time_ms = result.time_ms
        for i, op in enumerate(graph.ops):
            if not op.recomputable or op.is_backward:
                assert _computes(schedule).count(i) == 1, f"{op.name} must run exactly once"
    assert simulate(graph, greedy_schedule(graph, minimum)).peak_bytes == minimum
    if minimum > 0:
        with pytest.raises(BudgetInfeasible):
            greedy_schedule(graph, minimum - 1)


@pytest.mark.parametrize(("seed", "n_forward_ops"), RANDOM_GRAPHS)
def test_greedy_at_the_no_remat_peak_costs_nothing_extra(seed: int, n_forward_ops: int) -> None:
    graph = _random_graph(seed, n_forward_ops)
    baseline = simulate(graph, no_remat_schedule(graph))
    result = simulate(graph, greedy_schedule(graph, baseline.peak_bytes))
    assert result.time_ms <= baseline.time_ms
    assert result.peak_bytes <= baseline.peak_bytes


def test_greedy_lowers_the_peak_on_an_mlp() -> None:
    graph = mlp_chain_graph(8, activation_bytes=1000)
    baseline = simulate(graph, no_remat_schedule(graph))
    minimum = min_feasible_peak_greedy(graph)
    assert minimum < 0.7 * baseline.peak_bytes
    schedule = greedy_schedule(graph, (baseline.peak_bytes + minimum) // 2)
    assert simulate(graph, schedule).time_ms > baseline.time_ms  # it did recompute


class _ExhaustiveRun(greedy._GreedyRun):
    """Greedy without branch and bound: every candidate simulated to the end."""

    def _advance(self) -> bool:
        if self.exhausted:
            return False
        peak = self.state.profile.peak_bytes
        best = None
        for candidate in self._candidates():
            profile = self.context.simulate(self.context.backward_order(candidate.unsaved))
            assert profile is not None
            ratio = greedy._ratio(peak - profile.peak_bytes, candidate.added_ms)
            assert profile.time_ms == pytest.approx(self.state.profile.time_ms + candidate.added_ms)
            assert ratio <= candidate.ratio_bound * (1 + 1e-12), "the bound is not a bound"
            key = (ratio, -candidate.root)
            if ratio >= 0 and (best is None or key > best[0]):
                best = (key, candidate, profile)
        if best is None:
            self.exhausted = True
            return False
        _, candidate, profile = best
        self.accepted.append(tuple(sorted(candidate.unsaved - self.state.unsaved)))
        self.state = greedy._State(self.context, candidate.unsaved, profile)
        self.peaks_bytes.append(profile.peak_bytes)
        return True


@pytest.mark.parametrize("seed", range(10))
def test_branch_and_bound_picks_what_exhaustive_search_picks(seed: int) -> None:
    graph = _random_graph(seed, 30 + 5 * seed)
    fast, slow = greedy._GreedyRun(graph), _ExhaustiveRun(graph)
    fast.first_state_within(-1)
    slow.first_state_within(-1)
    assert fast.accepted == slow.accepted
    assert fast.peaks_bytes == slow.peaks_bytes


def test_greedy_trajectory_is_cached_and_resumed() -> None:
    graph = _random_graph(1, 60)
    peak = simulate(graph, no_remat_schedule(graph)).peak_bytes
    first = greedy_schedule(graph, peak * 3 // 4)
    minimum = min_feasible_peak_greedy(graph)  # resumes the same run to its end
    assert greedy_schedule(graph, peak * 3 // 4) == first
    fresh = _random_graph.__wrapped__(1, 60)  # an equal graph, no cache
    assert min_feasible_peak_greedy(fresh) == minimum
    assert greedy_schedule(fresh, peak * 3 // 4) == first


# --- solve ------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [-1, 1.5, "1GiB", None, True])
def test_solve_rejects_bad_budgets_naming_the_argument(budget: object) -> None:
    with pytest.raises(ValueError, match=r"budget_bytes must be an int >= 0, got"):
        solve(chain_graph([10, 10]), budget)  # type: ignore[arg-type]


def test_solve_rejects_unknown_methods_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"method must be 'auto' or one of \['greedy', 'hierarchical', 'hybrid', 'ilp', 'none'\], got 'magic'"):
        solve(chain_graph([10, 10]), 100, method="magic")
    with pytest.raises(ValueError, match="method must be"):
        min_feasible_peak(chain_graph([10, 10]), method="magic")


@pytest.mark.parametrize("method", ["auto", *sorted(METHODS)])
def test_solve_returns_checked_schedules_within_budget(method: str) -> None:
    graph = _random_graph(2, 40)
    minimum = min_feasible_peak(graph, method)
    schedule = solve(graph, minimum, method=method)
    assert simulate(graph, schedule).peak_bytes <= minimum
    if minimum > 0:
        with pytest.raises(BudgetInfeasible) as info:
            solve(graph, minimum - 1, method=method)
        assert info.value.min_feasible_bytes == minimum


def test_solve_none_is_the_no_remat_schedule() -> None:
    graph = chain_graph([100, 200, 300])
    assert solve(graph, 800, method="none") == no_remat_schedule(graph)
    with pytest.raises(BudgetInfeasible, match="'none'") as info:
        solve(graph, 799, method="none")
    assert info.value.min_feasible_bytes == 800


def test_solve_accepts_numpy_integers() -> None:
    np = pytest.importorskip("numpy")
    graph = chain_graph([100, 200, 300])
    assert solve(graph, np.int64(800), method="none") == no_remat_schedule(graph)
