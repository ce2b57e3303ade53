"""Check one fuzz seed against eager autograd and the memory meter; shrink a failing one.

For a seed (or a :class:`~tests.fuzz.grammar.ModelSpec`), :func:`check_spec`
plans the model with ``Rockmate`` at three budgets: the no-remat peak (1.0),
the smallest feasible peak (``BudgetTooSmall.min_budget_bytes`` of a plan at
1 byte, then a plan at exactly that) and the midpoint. For each it runs one
training step through rematc and compares it with the same step in eager
autograd from the same parameters and the same RNG seed:

- ``output-mismatch``: the loss or an output differs (``torch.equal``);
- ``grad-mismatch``: a parameter or input gradient differs, or exists on one side only;
- ``aot-numerics``: outputs or gradients differ from eager, but equal bitwise
  what AOTAutograd's own joint graph gives (``default_partition``, no rematc):
  PyTorch's decompositions, not rematc's plan, change the numerics;
- ``buffer-mismatch``: a buffer (BatchNorm running statistics) differs afterwards;
- ``rng-mismatch``: the RNG state after the step differs (a random op ran again or not at all);
- ``over-budget``: the measured peak (``MemoryMeter``) exceeds ``rm.budget_bytes``;
- ``peak-mismatch``: measured and ``rm.predicted_peak_bytes`` differ by more
  than :data:`PEAK_TOLERANCE_BYTES`;
- ``error:<Type>``: rematc raised one of its own errors (``RematcError``, ``BudgetInfeasible``);
- ``crash:<Type>``: any other exception inside rematc;
- ``aot-crash:<Type>``: a crash (or a ``CaptureError`` around one) that
  TorchDynamo + AOTAutograd with PyTorch's default partition (no rematc)
  raises too: inherited from PyTorch, though rematc may still work around it;
- ``invalid-model``: eager itself failed (a bug of the grammar, not of rematc).

A result's ``failure_class`` is the most severe of its failures (in the
order of :data:`SEVERITY`). :func:`shrink` cuts blocks and simplifies the
loss, head, stem and block parameters while the same failure persists (class
and signature: the budget and the direction of a peak gap, or the exception's
message), and :func:`reproducer` prints the result as a command and a short
Python script.

Seconds per seed (2-core CPU, ``torch.set_num_threads(1)``): about 3-10,
sometimes a minute; the four plans (the 1-byte one included), and in them
the MILP at the smallest budget, are nearly all of it.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_map

import rematc
import solvers
from profiler.meter import MemoryMeter
from rematc import Rockmate
from tests.fuzz.grammar import Built, ModelSpec, build, generate

#: How far (bytes) the measured peak may be from the predicted one. The model is meant to be exact.
PEAK_TOLERANCE_BYTES = 0
#: ``Rockmate(verify=...)``. Off: the fuzzer tests the memory model itself (predicted == measured),
#: which verification papers over (it plans again with the gap as a margin, and at the smallest
#: budget turns a gap into ``BudgetTooSmall``). ``benchmarks/fuzz.py --verify`` tests it on.
VERIFY = False
#: The seed set before each step, so that rematc and eager draw the same dropout masks.
STEP_SEED = 1234
SEVERITY = ("invalid-model", "crash", "error", "aot-crash", "output-mismatch", "grad-mismatch", "buffer-mismatch", "rng-mismatch",
            "over-budget", "peak-mismatch", "aot-numerics")


@dataclass
class Failure:
    cls: str
    message: str
    budget: str  # "max", "min", "mid" or "" (before any plan)
    # What the shrinker keeps equal besides the class: for errors the exception's type and message
    # without numbers; otherwise the budget (a gap without recomputation is another bug than one
    # with), and for peaks the direction of the gap.
    signature: str = ""

    def __post_init__(self) -> None:
        if not self.signature:
            self.signature = self.budget

    def rank(self) -> int:
        return SEVERITY.index(self.cls.split(":")[0])


@dataclass
class SeedResult:
    """What :func:`check_spec` found for one spec."""

    seed: int
    spec: ModelSpec
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    plan_seconds: float = 0.0
    budgets: dict[str, int] = field(default_factory=dict)
    verify: bool = False

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def primary(self) -> Failure | None:
        return min(self.failures, key=Failure.rank) if self.failures else None

    @property
    def failure_class(self) -> str | None:
        return self.primary.cls if self.primary else None

    @property
    def message(self) -> str:
        return self.primary.message if self.primary else "ok"

    def has(self, failure: Failure) -> bool:
        """Whether this result fails the way ``failure`` did (same class and signature)."""
        return any(f.cls == failure.cls and f.signature == failure.signature for f in self.failures)

    def line(self) -> str:
        if self.passed:
            return f"seed {self.seed}: ok ({self.seconds:.1f} s)"
        others = sorted({f.cls for f in self.failures} - {self.failure_class})
        also = f" (also {', '.join(others)})" if others else ""
        return f"seed {self.seed}: {self.failure_class}: {self.message}{also}"


# -- one step ---------------------------------------------------------------------------------
def _autocast(spec: ModelSpec) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if spec.autocast else contextlib.nullcontext()


@dataclass
class StepResult:
    output: Any
    loss: torch.Tensor
    peak_bytes: int
    rng: torch.Tensor
    input_grads: list[torch.Tensor | None]


def _forward(built: Built, module: torch.nn.Module, sample: tuple, loss_args: tuple, planned: bool) -> Any:
    if planned:
        return module(*sample, loss_args=loss_args)
    output = module(*sample)
    return output if built.loss_fn is None else built.loss_fn(output, *loss_args)


def run_step(built: Built, module: torch.nn.Module, planned: bool) -> StepResult:
    """One forward+backward on the spec's batch under the meter (the region test_zoo measures).

    A model that computes its own loss returns ``{"loss", "out", "extras"}``.
    Unless the spec holds the outputs (``Rockmate(hold_outputs=True)``), it is
    called the ordinary way, ``module(*batch)["loss"].backward()``: the other
    outputs are dropped before the backward, and compared on a separate
    forward of the same batch and seed (as test_zoo does).
    """
    drop = built.loss_fn is None and not built.spec.hold_outputs
    compared = None
    if drop:
        sample, loss_args = built.make_batch()
        torch.manual_seed(STEP_SEED)
        with _autocast(built.spec):
            compared = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                _forward(built, module, sample, loss_args, planned))
    sample, loss_args = built.make_batch()
    torch.manual_seed(STEP_SEED)
    with _autocast(built.spec), MemoryMeter("cpu") as meter:
        output = _forward(built, module, sample, loss_args, planned)
        loss = built.loss_of(output)
        if drop:
            output = None
        loss.backward()
    grads = [t.grad for t in (*sample, *loss_args) if isinstance(t, torch.Tensor) and t.requires_grad]
    return StepResult(output if compared is None else compared, loss.detach(), meter.peak_bytes, torch.get_rng_state(), grads)


def _diff(got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
    if got.dtype == torch.bool or not got.is_floating_point():
        return f"{int((got != want).sum())} elements differ"
    return f"max abs diff {(got.double() - want.double()).abs().max().item():.3g}"


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    return got == want


def compare(built: Built, model: torch.nn.Module, got: StepResult, reference: torch.nn.Module,
            want: StepResult) -> list[tuple[str, str]]:
    """(class, message) for every way the rematc step differs from the eager one."""
    found: list[tuple[str, str]] = []
    if not _same(got.loss, want.loss):
        found.append(("output-mismatch", f"loss {got.loss.float().item():.6g} vs eager {want.loss.float().item():.6g}"))
    got_leaves, got_spec = tree_flatten(got.output)
    want_leaves, want_spec = tree_flatten(want.output)
    if got_spec != want_spec:
        found.append(("output-mismatch", f"output structure {got_spec} vs eager {want_spec}"))
    else:
        for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
            g = g.detach() if isinstance(g, torch.Tensor) else g
            w = w.detach() if isinstance(w, torch.Tensor) else w
            if not _same(g, w):
                found.append(("output-mismatch", f"output leaf {i}: " + (_diff(g, w) if isinstance(w, torch.Tensor) else f"{g!r} vs {w!r}")))
                break
    bad_grads = []
    for (name, p), rp in zip(model.named_parameters(), reference.parameters()):
        if (p.grad is None) != (rp.grad is None):
            bad_grads.append(f"{name}: grad is {'None' if p.grad is None else 'set'}, eager {'None' if rp.grad is None else 'set'}")
        elif rp.grad is not None and not _same(p.grad, rp.grad):
            bad_grads.append(f"{name}: {_diff(p.grad, rp.grad)}")
    for i, (g, rg) in enumerate(zip(got.input_grads, want.input_grads)):
        if (g is None) != (rg is None) or (rg is not None and not _same(g, rg)):
            bad_grads.append(f"input {i}: " + (_diff(g, rg) if g is not None and rg is not None else "None on one side"))
    if bad_grads:
        found.append(("grad-mismatch", f"{len(bad_grads)} gradients differ, first {bad_grads[0]}"))
    for (name, b), rb in zip(model.named_buffers(), reference.buffers()):
        if not _same(b, rb):
            found.append(("buffer-mismatch", f"buffer {name}: {_diff(b, rb)}"))
            break
    if not torch.equal(got.rng, want.rng):
        found.append(("rng-mismatch", "the RNG state after the step differs from eager's"))
    return found


# -- AOTAutograd without rematc ----------------------------------------------------------------
class _WithLoss(torch.nn.Module):
    """``model`` and ``loss_fn`` called like a ``Rockmate``: ``module(*sample, loss_args=...)``."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., Any] | None) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *sample: Any, loss_args: tuple = ()) -> Any:
        output = self.model(*sample)
        return output if self.loss_fn is None else self.loss_fn(output, *loss_args)


def _aot_backend(faithful_layouts: bool) -> Callable[..., Any]:
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    from rematc.layouts import make_layouts_faithful

    def boxed(g: torch.fx.GraphModule, _: Any) -> Callable[..., Any]:
        return make_boxed_func(g.forward)

    def partition(joint: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        if faithful_layouts:
            make_layouts_faithful(joint)
        return default_partition(joint, *args, **kwargs)

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        return aot_module_simplified(gm, example_inputs, fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition)

    return backend


def aot_step(built: Built, original: torch.nn.Module, faithful_layouts: bool = True) -> tuple[torch.nn.Module, StepResult]:
    """The same step through TorchDynamo + AOTAutograd with PyTorch's default partition (no rematc).

    ``faithful_layouts``: apply rematc's layouts pass (NOTE: [Runtime
    layouts]) to the joint graph first. It changes no value, and without it
    AOTAutograd crashes on some graphs that rematc runs; the numerics
    reference uses it, the crash diagnosis does not.
    """
    model = copy.deepcopy(original)
    compiled = torch.compile(_WithLoss(model, built.loss_fn), backend=_aot_backend(faithful_layouts), fullgraph=True)
    return model, run_step(built, compiled, planned=True)


# -- one spec -------------------------------------------------------------------------------
def _error_failure(error: BaseException, budget: str, phase: str) -> Failure:
    domain = isinstance(error, (rematc.RematcError, solvers.BudgetInfeasible))
    cls = f"{'error' if domain else 'crash'}:{type(error).__name__}"
    text = " ".join(str(error).split())
    cause = error.__cause__ or error.__context__
    if domain and cause is not None:
        text = f"{text} [cause {type(cause).__name__}: {' '.join(str(cause).split())}]"
    signature = type(error).__name__ + ":" + re.sub(r"[0-9]+", "N", text)[:80]
    return Failure(cls, f"at {budget or 'the'} budget, {phase}: {text[:300]}", budget, signature)


def _diagnose_crash(built: Built, original: torch.nn.Module, error: BaseException, failure: Failure) -> Failure:
    """``aot-crash:<Type>`` when AOTAutograd without rematc fails with the same exception type."""
    cause = error.__cause__ if isinstance(error, rematc.CaptureError) and error.__cause__ is not None else error
    try:
        aot_step(built, original, faithful_layouts=False)
    except Exception as aot_error:
        inner = getattr(aot_error, "inner_exception", None) or aot_error  # Dynamo's BackendCompilerFailed
        if type(inner) is type(cause):
            return Failure(f"aot-crash:{type(cause).__name__}",
                           f"{failure.message} (AOTAutograd's default partition fails the same way)",
                           failure.budget, failure.signature)
    return failure


def _plan(built: Built, model: torch.nn.Module, budget: int | float, verify: bool) -> Rockmate:
    sample, loss_args = built.make_batch()
    with _autocast(built.spec):
        return Rockmate(model, sample, budget, loss_fn=built.loss_fn, loss_args=loss_args, cache=False,
                        hold_outputs=built.spec.hold_outputs, verify=verify)


def check_spec(spec: ModelSpec, verify: bool | None = None) -> SeedResult:
    """Plan ``spec`` at the three budgets and compare each step with eager (see the module docstring).

    ``verify``: ``Rockmate(verify=...)``, default :data:`VERIFY`.
    """
    verify = VERIFY if verify is None else verify
    result = SeedResult(spec.seed, spec, verify=verify)
    started = time.perf_counter()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _check(spec, result, verify)
        finally:
            result.seconds = time.perf_counter() - started
    return result


def _check(spec: ModelSpec, result: SeedResult, verify: bool) -> None:
    built = build(spec)
    original = copy.deepcopy(built.model)
    reference = copy.deepcopy(original)
    try:
        want = run_step(built, reference, planned=False)
    except Exception as error:  # the grammar made a model eager rejects: our bug, not rematc's
        result.failures.append(Failure("invalid-model", f"eager step failed: {type(error).__name__}: {error}"[:300], ""))
        return

    aot: list[tuple[torch.nn.Module, StepResult] | None] = []  # computed on the first mismatch

    def plan_and_check(name: str, budget: int | float) -> Rockmate | None:
        model = copy.deepcopy(original)
        phase = "plan"
        try:
            t = time.perf_counter()
            rm = _plan(built, model, budget, verify)
            result.plan_seconds += time.perf_counter() - t
            phase = "step"
            got = run_step(built, rm, planned=True)
        except Exception as error:
            failure = _error_failure(error, name, phase)
            if failure.cls.startswith("crash:") or failure.cls == "error:CaptureError":
                failure = _diagnose_crash(built, original, error, failure)
            result.failures.append(failure)
            return None
        result.budgets[name] = rm.budget_bytes
        found = compare(built, model, got, reference, want)
        if any(cls in ("output-mismatch", "grad-mismatch") for cls, _ in found):
            if not aot:
                try:
                    aot.append(aot_step(built, original))
                except Exception as error:
                    aot.append(None)
                    result.failures.append(_error_failure(error, name, "AOTAutograd without rematc (diagnosis)"))
            if aot[0] is not None and not compare(built, model, got, *aot[0]):
                numerics = ("output-mismatch", "grad-mismatch")
                found = [(cls, message) if cls not in numerics else
                         ("aot-numerics", f"{message} (as AOTAutograd's default partition, bitwise)") for cls, message in found]
        for cls, message in found:
            result.failures.append(Failure(cls, f"at {name} budget {rm.budget_bytes} B: {message}", name))
        predicted, measured = rm.predicted_peak_bytes, got.peak_bytes
        numbers = (f"predicted {predicted}, measured {measured} (diff {measured - predicted:+d} B), "
                   f"budget {rm.budget_bytes}, no-remat {rm.baseline_peak_bytes}, eager {want.peak_bytes}")
        if measured > rm.budget_bytes:
            result.failures.append(Failure("over-budget", f"at {name} budget: {numbers}", name))
        if abs(measured - predicted) > PEAK_TOLERANCE_BYTES:
            direction = "under-predicted" if measured > predicted else "over-predicted"
            result.failures.append(Failure("peak-mismatch", f"at {name} budget ({direction}): {numbers}", name,
                                           f"{name}:{direction}"))
        return rm

    rm = plan_and_check("max", 1.0)
    if rm is None:
        return
    high = rm.baseline_peak_bytes
    try:
        t = time.perf_counter()
        _plan(built, copy.deepcopy(original), 1, verify)
        result.failures.append(Failure("error:NoBudgetTooSmall", "a 1-byte budget was accepted", "min"))
        return
    except rematc.BudgetTooSmall as error:
        low = error.min_budget_bytes
    except Exception as error:
        result.failures.append(_error_failure(error, "min", "finding the smallest budget"))
        return
    finally:
        result.plan_seconds += time.perf_counter() - t
    if low > high:
        result.failures.append(Failure("error:MinAboveBaseline", f"min feasible {low} > no-remat peak {high}", "min"))
        return
    if low < high:
        plan_and_check("min", low)
        if low + 1 < high:
            plan_and_check("mid", (low + high) // 2)


def check_seed(seed: int, verify: bool | None = None) -> SeedResult:
    return check_spec(generate(seed), verify)


# -- shrinking ------------------------------------------------------------------------------
def _replace(spec: ModelSpec, **changes: Any) -> ModelSpec:
    data = {**spec.__dict__, **changes}
    return ModelSpec(**copy.deepcopy(data))


def _candidates(spec: ModelSpec) -> Iterator[tuple[str, ModelSpec]]:
    """(what changed, a simpler spec), most aggressive first; every step makes the spec smaller."""
    n = len(spec.blocks)
    for size in sorted({n // 2, n // 4, 2, 1} - {0}, reverse=True):  # chunks of blocks, then single blocks
        for start in range(0, n - size + 1):
            yield (f"drop blocks {start}..{start + size - 1}",
                   _replace(spec, blocks=spec.blocks[:start] + spec.blocks[start + size:]))
    # Only losses with no known bug of their own, only ever simpler (so shrinking ends).
    simple_losses = ({"kind": "sum"}, {"kind": "mean"})
    rank = next((i for i, loss in enumerate(simple_losses) if spec.loss == loss), len(simple_losses))
    for loss in simple_losses[:rank]:
        yield f"loss {loss['kind']}", _replace(spec, loss=loss)
    for key in list(spec.loss):
        if key != "kind":
            yield f"loss without {key}", _replace(spec, loss={k: v for k, v in spec.loss.items() if k != key})
    if spec.autocast:
        yield "no autocast", _replace(spec, autocast=False)
    if not spec.loss_inside:
        yield "loss inside Rockmate", _replace(spec, loss_inside=True, hold_outputs=False)
    elif spec.hold_outputs:  # meaningless with the loss inside: drop it from the reproducer
        yield "hold_outputs off", _replace(spec, hold_outputs=False)
    if spec.head != {"kind": "dense", "K": 4}:
        yield "dense head", _replace(spec, head={"kind": "dense", "K": 4})
    for key in ("grad", "noncontig", "channels_last", "unused", "padding_idx", "frozen"):
        if spec.stem.get(key):
            yield f"stem without {key}", _replace(spec, stem={k: v for k, v in spec.stem.items() if k != key})
    if spec.batch > 2:
        yield f"batch {spec.batch // 2}", _replace(spec, batch=spec.batch // 2)
    for i, block in enumerate(spec.blocks):
        for key, value in block.items():
            if key == "kind":
                continue
            simpler: list[Any] = []
            if isinstance(value, list) and len(value) > 1:
                simpler = [value[:j] + value[j + 1:] for j in range(len(value))]
            elif value is True:
                simpler = [False]
            elif isinstance(value, float) and value > 0 and key in ("dropout", "p"):
                simpler = [0.0]
            elif isinstance(value, str) and key in ("norm", "act", "mask", "last") and value not in ("none", "relu"):
                simpler = ["none"]
            for v in simpler:
                blocks = copy.deepcopy(spec.blocks)
                blocks[i][key] = v
                yield f"block {i} {key}={v!r}", _replace(spec, blocks=blocks)


def shrink(result: SeedResult, max_checks: int = 150, log: Callable[[str], None] | None = None,
           verify: bool | None = None) -> SeedResult:
    """The smallest spec found that still fails like ``result``'s primary failure (greedy, to a fixpoint).

    "Like" is the same class and signature (see :class:`Failure`), so the
    shrinker does not slip from one bug to another.
    """
    assert result.primary is not None, "shrink a failing result"
    target = result.primary
    best, checks = result, 0
    progress = True
    while progress and checks < max_checks:
        progress = False
        for change, candidate in _candidates(best.spec):
            if checks >= max_checks:
                break
            checks += 1
            try:
                found = check_spec(candidate, verify)
            except Exception:  # a candidate the grammar cannot build: skip it
                continue
            if found.has(target):
                best, progress = found, True
                if log:
                    log(f"  shrink: {change}: still {target.cls} ({len(best.spec.blocks)} blocks)")
                break
    return best


def reproducer(result: SeedResult) -> str:
    """A command and a short script that rebuild ``result.spec`` and check it again."""
    text = result.spec.to_json()
    return "\n".join([
        f"# {result.failure_class}: {result.message}",
        f"# python benchmarks/fuzz.py{' --verify' if result.verify else ''} --spec '{text}'",
        "from tests.fuzz.check import check_spec",
        "from tests.fuzz.grammar import ModelSpec",
        f"spec = ModelSpec.from_json('{text}')",
        "print(spec.describe())",
        f"print(check_spec(spec, verify={result.verify}).line())",
    ])
