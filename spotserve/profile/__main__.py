"""`python -m spotserve.profile --model NAME --out FILE.json`: measure the engine here, write its cost-model profile."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from spotserve.models.spec import get_spec
from spotserve.profile.profiler import profile_engine
from spotserve.profile.weights import random_weights

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="spec name or alias (opt-6.7b, gpt-neox-20b, 6.7B, ...)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--batches", type=_ints, default=(1, 2, 4, 8, 16, 32), help="1,2,4,... (powers of two)")
    ap.add_argument("--prefill-batches", type=_ints, default=None, help="subset of --batches to prefill (default all)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        spec = get_spec(args.model)
    except KeyError as exc:
        ap.error(str(exc))
    dtype = DTYPES[args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    t0 = time.perf_counter()
    weights = random_weights(spec, dtype, args.device, args.seed)
    try:
        profile = profile_engine(spec, weights, args.device, dtype, args.batches, args.prompt_len,
                                 args.prefill_batches, args.decode_steps)
    except ValueError as exc:
        ap.error(str(exc))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, indent=1) + "\n")
    rows = profile["tp-1"]
    print(f"{spec.name} on {profile['device']} ({time.perf_counter() - t0:.0f} s) -> {args.out}")
    print(f"{'batch':>6} {'prefill ms/layer':>17} {'decode ms/layer':>16} {'embed+head ms':>14}")
    for i, (key, row) in enumerate(rows.items()):
        print(f"{key[4:]:>6} {row['init']:>17.4f} {row['incr']:>16.5f} {profile['embed'][i]:>14.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
