"""CLI: `list` prints the model names (one a line); `random` writes a random-weight HF checkpoint folder."""
from __future__ import annotations

import argparse
import sys

from spotserve.models.spec import get_spec, list_specs


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on bad arguments, as argparse does)."""
    p = argparse.ArgumentParser(prog="python -m spotserve.checkpoint", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the model names, one a line (test shapes end in -tiny)")
    r = sub.add_parser("random", help="write config.json + *.safetensors with random weights")
    r.add_argument("--model", required=True, help="a name from `list`")
    r.add_argument("--out", required=True, help="output folder (must not hold a checkpoint yet)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    r.add_argument("--max-shard-mb", type=int, default=2048, help="largest safetensors file, MiB")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(list_specs()))
        return 0
    try:
        spec = get_spec(args.model)
    except KeyError as e:
        p.error(str(e.args[0]))
    if args.max_shard_mb <= 0:
        p.error("--max-shard-mb must be positive")
    # torch is imported only here so `list` stays instant.
    from spotserve.models.checkpoint import write_random_checkpoint

    try:
        files = write_random_checkpoint(spec, args.out, seed=args.seed, dtype=args.dtype,
                                        max_shard_bytes=args.max_shard_mb << 20)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {spec.name} ({args.dtype}, seed {args.seed}) to {args.out}: {len(files)} weight file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
