"""GPU tier: measured profiling, workspace and the meter's CUDA path. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_meter_cuda_path_counts_a_known_allocation():
    from profiler.meter import MemoryMeter

    torch.cuda.synchronize()
    with MemoryMeter("cuda") as meter:
        x = torch.empty(1 << 20, device="cuda")  # 4 MiB, a multiple of the allocator's 512 B blocks
        del x
    assert meter.peak_bytes == 4 << 20
    assert meter.end_bytes == 0


def test_workspace_is_read_from_the_cuda_allocator():
    from tests.profiler.test_measure import capture_joint
    from profiler.workspace import measure_op_memory

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Dropout(0.1)).cuda()
    joint, _ = capture_joint(model, torch.randn(64, 256, device="cuda"))
    memory = measure_op_memory(joint, "cuda")
    assert set(memory) == {n.name for n in joint.graph.nodes}
    assert all(m.workspace_bytes >= 0 for m in memory.values())


@pytest.mark.parametrize("budget", [1.0, 0.6])
def test_rockmate_on_cuda_measured_profile_exact_and_under_budget(budget, tmp_path, monkeypatch):
    monkeypatch.setenv("REMATC_CACHE_DIR", str(tmp_path))
    from profiler.meter import MemoryMeter
    from rematc import BudgetTooSmall, Rockmate
    from rematc.models import TinyGPT, TinyGPTConfig, lm_loss

    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(n_layer=2, dropout=0.0)).cuda()
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 512, (8, 65), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    try:
        rm = Rockmate(model, x, budget, loss_fn=lm_loss, loss_args=(y,))
    except BudgetTooSmall as err:
        rm = Rockmate(model, x, err.min_budget_bytes, loss_fn=lm_loss, loss_args=(y,))
    assert rm.profile == "measure"
    with MemoryMeter("cuda") as meter:
        rm(x, loss_args=(y,)).backward()
    lm_loss(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert meter.peak_bytes <= rm.budget_bytes
    assert abs(rm.predicted_peak_bytes - meter.peak_bytes) <= 0.05 * meter.peak_bytes
