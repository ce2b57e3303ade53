"""``rematc plan`` and ``rematc show``: precompute schedule files and read them.

``rematc plan MODULE:FACTORY --budget B`` imports ``MODULE`` (a dotted module
path or a ``.py`` file), calls ``FACTORY()`` for ``(model, sample)``,
``(model, sample, loss_fn)`` or ``(model, sample, loss_fn, loss_args)``,
plans with :class:`~rematc.Rockmate`, writes the schedule file and fills the
schedule cache, so that a training run with the same model, shapes, budget,
device and method finds its plan there and skips profiling and solving.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .budget import parse_budget


def budget_argument(text: str) -> int | float | str:
    """``--budget``: an int is bytes, a float a fraction of the no-remat peak, else a size string."""
    value: int | float | str
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = text
    try:
        parse_budget(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def factory_argument(text: str) -> tuple[str, str]:
    """``MODULE:FACTORY``, split at the last colon (a Windows path has one too)."""
    module, sep, factory = text.rpartition(":")
    if not sep or not module or not factory.isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected MODULE:FACTORY (e.g. examples/tiny_gpt.py:factory or mypkg.models:make), got {text!r}"
        )
    return module, factory


def load_factory(module: str, factory: str) -> Any:
    """The callable ``factory`` of ``module`` (an importable module path, or a path to a ``.py`` file)."""
    if module.endswith(".py") or Path(module).is_file():
        path = Path(module)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {module}")
        _prepend_to_sys_path(path.resolve().parent)  # as `python file.py` does: siblings import
        spec = importlib.util.spec_from_file_location(f"rematc_factory_{path.stem}", path)
        assert spec is not None and spec.loader is not None, f"cannot load {path}"
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded  # dataclasses and pickling look modules up by name
        spec.loader.exec_module(loaded)
    else:
        _prepend_to_sys_path(Path.cwd())  # as `python -m` does; the console script's path is its bin/
        loaded = importlib.import_module(module)
    if not hasattr(loaded, factory):
        raise AttributeError(f"module {module} has no attribute {factory!r}")
    return getattr(loaded, factory)


def _prepend_to_sys_path(directory: Path) -> None:
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))


def _unpack(made: Any, name: str) -> tuple[Any, Any, Any, tuple]:
    if not isinstance(made, tuple) or not 2 <= len(made) <= 4:
        raise TypeError(
            f"{name}() must return (model, sample), (model, sample, loss_fn) or "
            f"(model, sample, loss_fn, loss_args); got {type(made).__name__}"
            + (f" of length {len(made)}" if isinstance(made, tuple) else "")
        )
    model, sample, loss_fn, loss_args = (*made, *(None, ())[len(made) - 2:])
    if not isinstance(loss_args, (tuple, list)):
        raise TypeError(f"{name}(): loss_args must be a tuple, got {type(loss_args).__name__}")
    return model, sample, loss_fn, tuple(loss_args)


def run_plan(args: argparse.Namespace) -> int:
    import torch
    from torch.utils._pytree import tree_map

    from .api import Rockmate
    from solvers import format_bytes

    module, factory_name = args.factory
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("rematc plan: %(message)s"))
    logger = logging.getLogger("rematc")
    logger.addHandler(progress)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        print(f"rematc plan: building {factory_name}() from {module}", file=sys.stderr, flush=True)
        model, sample, loss_fn, loss_args = _unpack(load_factory(module, factory_name)(), factory_name)
        if args.device:
            device = torch.device(args.device)
            model = model.to(device)
            sample, loss_args = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t,
                                         (sample, loss_args))
        print("rematc plan: capture: TorchDynamo + AOTAutograd joint graph", file=sys.stderr, flush=True)
        started = time.perf_counter()
        rm = Rockmate(model, sample, args.budget, loss_fn=loss_fn, loss_args=loss_args, method=args.method,
                      profile=args.profile, cache=not args.no_cache, cache_dir=args.cache_dir)
        seconds = time.perf_counter() - started
    finally:
        logger.removeHandler(progress)
        logger.setLevel(previous_level)
    out = Path(args.out) if args.out else Path(f"{Path(module).stem.replace('.', '_')}.{factory_name}.schedule.json")
    rm.save_schedule(out)
    plan = rm.plan
    if rm.cache_hit:
        source = f"cache hit: loaded and checked in {plan.profile_seconds:.3f} s, nothing profiled or solved"
    else:
        source = f"profile {plan.profile_seconds:.2f} s, solve {plan.solve_seconds:.2f} s"
    print(f"wrote {out}")
    print(f"  graph {rm.graph_hash}")
    print(f"  budget {format_bytes(rm.budget_bytes)}, predicted peak {format_bytes(rm.predicted_peak_bytes)} "
          f"(no remat {format_bytes(rm.baseline_peak_bytes)}), predicted time "
          f"{rm.predicted_step_seconds * 1e3:.4g} ms (no remat {rm.baseline_step_seconds * 1e3:.4g} ms)")
    print(f"  planned in {seconds:.2f} s ({source})")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from .schedule_file import read_schedule_file
    from .schedule_show import plot_schedule_file, summarize_schedule_file

    sf = read_schedule_file(args.file)
    print(summarize_schedule_file(sf, args.file, top=args.top))
    if args.plot:
        print(f"plot: {plot_schedule_file(sf, args.plot, title=Path(args.file).name)}")
    return 0


def add_schedule_commands(commands: Any) -> None:
    """Register ``plan`` and ``show`` on the CLI's subparsers."""
    plan = commands.add_parser(
        "plan", help="plan a model's schedule ahead of training: write a schedule file and fill the cache",
        description="Import MODULE, call FACTORY() for (model, sample[, loss_fn[, loss_args]]), plan under "
                    "the budget, write the schedule file and fill the schedule cache. A training run with the "
                    "same model, shapes, budget, device and method then skips profiling and solving.",
    )
    plan.add_argument("factory", metavar="MODULE:FACTORY", type=factory_argument,
                      help="a module path (pkg.mod) or a .py file, and the name of a function in it")
    plan.add_argument("--budget", required=True, type=budget_argument,
                      help="int bytes (1000000), a size string (512MiB, 3GB) or a fraction of the no-remat "
                           "peak in (0, 1] (0.4); use the same value as in training to share the cache entry")
    plan.add_argument("--out", help="schedule file to write (default MODULE.FACTORY.schedule.json)")
    plan.add_argument("--device", help="move the model and sample there first (e.g. cuda)")
    plan.add_argument("--cache-dir", help="schedule cache root (default $REMATC_CACHE_DIR or ~/.cache/rematc)")
    plan.add_argument("--no-cache", action="store_true", help="neither read nor fill the cache")
    plan.add_argument("--method", default="auto", help="solver method (default auto)")
    plan.add_argument("--profile", choices=("measure", "analytic"), default=None,
                      help="profiler mode (default: measure on CUDA, analytic on CPU)")
    plan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks on errors")
    plan.set_defaults(run=run_plan)

    show = commands.add_parser(
        "show", help="summarize a schedule file: kept and recomputed values, bytes, predicted peak and time",
        description="Print what a schedule file keeps and recomputes, with bytes and the predicted peak and "
                    "time, per block if the plan has blocks; --plot draws the predicted memory over the step.",
    )
    show.add_argument("file", metavar="FILE", help="a schedule file (from rematc plan or Rockmate.save_schedule)")
    show.add_argument("--plot", metavar="OUT.png",
                      help="write a PNG of predicted memory over the step: schedule, no remat, budget")
    show.add_argument("--top", type=int, default=15, help="rows of the kept and recomputed lists (default 15)")
    show.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks on errors")
    show.set_defaults(run=run_show)
