"""Command line of the experiment driver. Subcommands are filled in by the simulator work."""
from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = {
    "demo": "run a short paper cell end to end (the README's main job)",
    "e2e": "end-to-end latency and cost of spotserve and the baselines on an availability trace",
    "cost": "spot vs static on-demand clusters",
    "workload": "fluctuating arrival rate",
    "ablation": "spotserve with one component switched off at a time",
    "plot": "figures from a finished run's outputs",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spotserve.experiment", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from spotserve.models.spec import get_spec

        spec = get_spec("20B")
        print(f"spotserve demo: {spec.name}: {spec.total_params() / 1e9:.1f}B parameters")
        return 0
    print(f"{args.command}: not available yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
