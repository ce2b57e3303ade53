"""``simulate`` against peaks computed by hand, and ``check`` against broken schedules.

Every expected number is derived in a comment next to it, step by step:
``held`` is the bytes held while a compute step runs (live + its new outputs
+ its workspace), ``trace`` the bytes live after each step.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from solvers import Graph, Schedule, ScheduleError, Step, check, simulate
from tests.solvers.graphs import GraphBuilder, chain_graph


def C(i: int) -> Step:
    return Step("compute", i)


def D(v: int) -> Step:
    return Step("free", v)


def test_solvers_never_import_torch() -> None:
    code = "import solvers, sys; assert 'torch' not in sys.modules, 'solvers imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- a chain ------------------------------------------------------------------------------
# chain_graph([100, 200, 300]):
#   ops    0 f0(x)->v1[100]  1 f1(v1)->v2[200]  2 f2(v2)->v3[300] (forward output)
#          3 d_out()->v4[300]  4 f2_bwd(v4, v2)->v5[200]  5 f1_bwd(v5, v1)->v6[100] (required)
CHAIN = chain_graph([100, 200, 300])
CHAIN_NO_REMAT = Schedule(
    (C(0), C(1), C(2)),
    (D(3), C(3), C(4), D(2), D(4), C(5), D(1), D(5)),
)


def test_chain_peak_time_and_trace() -> None:
    result = simulate(CHAIN, CHAIN_NO_REMAT)
    # Forward: C0 held 100; C1 100+200 = 300; C2 300+300 = 600 (nothing freed: v1, v2 are
    # saved, v3 is a forward output). Backward: D3 (v3 dropped at backward start) -> 300;
    # C3 300+300 = 600; C4 600+200 = 800 (the peak, step 5); D2 -> 600; D4 -> 300;
    # C5 300+100 = 400; D1 -> 300; D5 -> 100 (v6 required, kept).
    assert result.peak_bytes == 800
    assert result.peak_step == 5
    assert result.memory_trace == (100, 300, 600, 300, 600, 800, 600, 300, 400, 300, 100)
    assert result.live_after_forward_bytes == 600  # v1 + v2 + v3
    assert result.time_ms == 5.0  # five ops of 1 ms; the input op costs nothing


def test_forward_output_freed_at_backward_start_and_required_kept() -> None:
    result = simulate(CHAIN, CHAIN_NO_REMAT)
    assert result.memory_trace[3] == 300  # after D3, the first backward step: v3's 300 B gone
    assert result.memory_trace[-1] == 100  # v6 is required at the end: never freed


# --- views ---------------------------------------------------------------------------------
def _views_graph() -> tuple[Graph, dict[str, int]]:
    b = GraphBuilder()
    x = b.resident("x")
    (a,) = b.add("a", [x], [100])                   # op 0
    (va,) = b.add("view_a", [a], [0], view_of=[a])  # op 1: shares a's storage
    (xt,) = b.add("view_x", [x], [0], view_of=[x])  # op 2: a view of a resident
    (y,) = b.add("y", [va, xt], [10])               # op 3
    (dy,) = b.add("d_y", [], [10], is_backward=True, recomputable=False, is_input=True)  # op 4
    (da,) = b.add("y_bwd", [dy, va], [100], is_backward=True)  # op 5
    graph = b.build(forward_outputs=[y], required_at_end=[da])
    return graph, {"a": a, "va": va, "xt": xt, "y": y, "dy": dy, "da": da}


def test_view_keeps_storage_alive_and_resident_view_allocates_nothing() -> None:
    graph, v = _views_graph()
    schedule = Schedule(
        (C(0), C(1), D(v["a"]), C(2), C(3), D(v["xt"])),
        (D(v["y"]), C(4), C(5), D(v["va"]), D(v["dy"])),
    )
    result = simulate(graph, schedule)
    # C0 held 100; C1 a view: +0 -> 100; D(a) -> still 100 (view_a holds the storage);
    # C2 a view of x: +0 -> 100; C3 +10 -> 110; D(xt) -> 110.
    # Backward: D(y) -> 100; C4 +10 -> 110; C5 +100 -> 210 (peak, step 8);
    # D(va) -> 110 (the last alias: a's storage is released); D(dy) -> 100.
    assert result.memory_trace == (100, 100, 100, 100, 110, 110, 100, 110, 210, 110, 100)
    assert (result.peak_bytes, result.peak_step) == (210, 8)


def test_freeing_the_base_before_the_view_changes_nothing_but_the_order() -> None:
    graph, v = _views_graph()
    # Free view first, then base: the storage goes with the second free.
    schedule = Schedule(
        (C(0), C(1), C(2), C(3), D(v["xt"])),
        (D(v["y"]), C(4), C(5), D(v["va"]), D(v["a"]), D(v["dy"])),
    )
    result = simulate(graph, schedule)
    # ... C5 210; D(va) -> 210 (a still holds it); D(a) -> 110; D(dy) -> 100.
    assert result.memory_trace[-3:] == (210, 110, 100)


# --- workspace, multi-output ---------------------------------------------------------------
def test_workspace_counts_only_while_its_op_runs() -> None:
    b = GraphBuilder()
    x = b.resident("x")
    (h,) = b.add("conv", [x], [100], workspace_bytes=1000)
    (y,) = b.add("relu", [h], [100], workspace_bytes=50)
    graph = b.build(forward_outputs=[y])
    result = simulate(graph, Schedule((C(0), C(1), D(h)), ()))
    # C0 held 100 + 1000 workspace = 1100 (peak); after it 100 live;
    # C1 held 100 + 100 + 50 = 250; D(h) -> 100.
    assert (result.peak_bytes, result.peak_step) == (1100, 0)
    assert result.memory_trace == (100, 200, 100)


def test_multi_output_op_with_an_unused_output() -> None:
    b = GraphBuilder()
    x = b.resident("x")
    y, mask = b.add("dropout", [x], [100, 25], recomputable=False)
    (z,) = b.add("relu", [y], [100])
    graph = b.build(forward_outputs=[z])
    result = simulate(graph, Schedule((C(0), D(mask), C(1), D(y)), ()))
    # C0 allocates both outputs: 125 (peak candidate); D(mask) -> 100;
    # C1 100 + 100 = 200 (peak, step 2); D(y) -> 100.
    assert result.memory_trace == (125, 100, 200, 100)
    assert (result.peak_bytes, result.peak_step) == (200, 2)


# --- recomputation ------------------------------------------------------------------------
def test_recomputed_value_is_allocated_and_timed_twice() -> None:
    # CHAIN with v1 freed after the forward and recomputed before f1_bwd.
    schedule = Schedule(
        (C(0), C(1), D(1), C(2)),
        (D(3), C(3), C(4), D(2), D(4), C(0), C(5), D(1), D(5)),
    )
    result = simulate(CHAIN, schedule)
    # Forward: C0 100; C1 300; D1 -> 200; C2 200+300 = 500. Backward: D3 -> 200;
    # C3 500; C4 700 (peak, step 6); D2 -> 500; D4 -> 200; C0 again 200+100 = 300;
    # C5 400; D1 -> 300; D5 -> 100. Time: 6 compute steps of 1 ms (f0 twice).
    assert result.memory_trace == (100, 300, 200, 500, 200, 500, 700, 500, 200, 300, 400, 300, 100)
    assert (result.peak_bytes, result.peak_step) == (700, 6)
    assert result.time_ms == 6.0
    assert result.live_after_forward_bytes == 500  # v2 + v3


# --- check --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("forward", "backward", "message"),
    [
        # f1 reads v1 before f0 made it.
        ((C(1),), (), r"step 0 \(compute 1\): op f1 reads f0, which is not live"),
        # v1 freed, then read.
        ((C(0), D(1), C(1)), (), r"step 2 \(compute 1\): op f1 reads f0, which is not live"),
        ((C(0), C(1), D(1), D(1)), (), r"step 3 \(free 1\): value f0 is freed while not live"),
        ((D(0),), (), r"step 0 \(free 0\): resident value x is freed"),
        ((C(0), C(1), C(2), C(3)), (), r"step 3 \(compute 3\): backward op d_out in the forward phase"),
        # A recompute (f0) before the input op d_out.
        ((C(0), C(1), C(2)), (C(0), C(3)), r"step 4 \(compute 3\): input op d_out after other"),
        # A backward op run twice.
        ((C(0), C(1), C(2)), (C(3), C(4), C(4)), r"step 5 \(compute 4\): op f2_bwd may run only once"),
    ],
)
def test_check_names_the_faulty_step(forward: tuple, backward: tuple, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        check(CHAIN, Schedule(forward, backward))


def test_check_rejects_recomputing_a_non_recomputable_op() -> None:
    b = GraphBuilder()
    x = b.resident("x")
    (y,) = b.add("dropout", [x], [10], recomputable=False)
    graph = b.build(forward_outputs=[y])
    with pytest.raises(ScheduleError, match=r"step 1 \(compute 0\): op dropout may run only once"):
        check(graph, Schedule((C(0), C(0)), ()))


def test_check_rejects_missing_forward_output_required_value_and_unrun_op() -> None:
    # f2 (the forward output) never runs before the backward starts.
    with pytest.raises(ScheduleError, match="values not live at the end of the forward phase: f2"):
        check(CHAIN, Schedule((C(0), C(1)), (C(2), C(3), C(4), C(5))))
    # v6 (required) freed at the end.
    with pytest.raises(ScheduleError, match="values not live at the end of the step: f1_bwd"):
        check(CHAIN, Schedule(CHAIN_NO_REMAT.forward, (*CHAIN_NO_REMAT.backward, D(6))))
    # f1_bwd never runs.
    with pytest.raises(ScheduleError, match=r"op 5 \(f1_bwd\) never runs"):
        check(CHAIN, Schedule(CHAIN_NO_REMAT.forward, CHAIN_NO_REMAT.backward[:5]))


def test_simulate_validates_unless_told_not_to() -> None:
    broken = Schedule((C(1),), ())
    with pytest.raises(ScheduleError):
        simulate(CHAIN, broken)
    check(CHAIN, CHAIN_NO_REMAT)  # the reference schedule itself is valid
