"""The ``rematc`` command line. Exit codes: 0 success, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import sys
import traceback

from .schedule_commands import add_schedule_commands


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(f"rematc demo: TinyGPT (4 layers, n_embd 128, seq 64, batch 8) at budget {args.budget} "
          "of the no-remat peak, CPU, 1 thread", flush=True)
    result = run_demo(budget=args.budget, steps=args.steps)
    print(result.table())
    if not result.within_budget:
        print("FAILED: the measured peak exceeds the budget", file=sys.stderr)
        return 1
    print("OK: measured peak is within the budget")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rematc", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a built-in GPT under 40%% of its no-remat peak")
    demo.add_argument("--budget", type=float, default=0.4, help="fraction of the no-remat peak (default 0.4)")
    demo.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    demo.set_defaults(run=_demo)
    add_schedule_commands(commands)  # plan, show
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    try:
        return args.run(args)
    except Exception as error:  # one clear line; the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"rematc {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
