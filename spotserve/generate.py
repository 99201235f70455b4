"""Offline generation with one engine per replica: `[mpirun -np N] python -m spotserve.generate ...`.

Each MPI rank (or torchrun-style RANK) is one worker; N must equal dp * pp * tp. Rank 0 prints
{"model", "dp", "pp", "tp", "outputs": [[ids...] per prompt]} as one JSON line on stdout. With
--log-steps every worker writes one JSON event per step to stderr. When a peer dies, the
surviving workers print an error naming it and exit with status 3 instead of hanging.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("empty prompt")
    return ids


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spotserve.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("--dp", type=int, default=1, help="replicas (prompts are dealt round-robin)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per replica")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel shards per stage")
    p.add_argument("--prompt-ids", type=_ids, action="append", required=True,
                   help="comma-separated prompt token ids; repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (request i uses seed + i)")
    p.add_argument("--stop-token-ids", type=_ids, default=None, help="comma-separated ids that end a request")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout-s", type=float, default=60.0, help="limit of every collective call")
    p.add_argument("--log-steps", action="store_true", help="one JSON event per step on stderr")
    p.add_argument("--step-delay-s", type=float, default=0.0, help="pause between steps (demos, fault injection)")
    return p.parse_args(argv)


def _event(**fields) -> None:
    print(json.dumps(fields), file=sys.stderr, flush=True)


def _gather_outputs(ctx, world, dp: int, mine: dict[int, list[int]]) -> dict[int, list[int]] | None:
    """Collect every replica's {prompt index: ids} at world rank 0 (JSON bytes over point-to-point)."""
    import torch
    import torch.distributed as dist

    if dp == 1:
        return mine if world.rank == 0 else None
    leader = ctx.rank_of(0, 0)
    if world.rank == 0:
        out = dict(mine)
        for rep in range(1, dp):
            src = ctx.rank_of(0, 0, rep)
            size = torch.zeros(1, dtype=torch.long)
            ctx.guard(f"recv from {ctx.describe(src)}", lambda: dist.recv(size, src))
            buf = torch.empty(int(size), dtype=torch.uint8)
            ctx.guard(f"recv from {ctx.describe(src)}", lambda: dist.recv(buf, src))
            out.update({int(k): v for k, v in json.loads(bytes(buf.tolist()).decode()).items()})
        return out
    if world.rank == leader:
        raw = json.dumps(mine).encode()
        ctx.guard("send to rank 0", lambda: dist.send(torch.tensor([len(raw)], dtype=torch.long), 0))
        ctx.guard("send to rank 0", lambda: dist.send(torch.frombuffer(bytearray(raw), dtype=torch.uint8), 0))
    return None


def run(args: argparse.Namespace) -> int:
    from spotserve.engine.config import EngineConfig
    from spotserve.engine.dist import CollectiveError, init_world, make_contexts
    from spotserve.engine.engine import Engine
    from spotserve.engine.sequence import SamplingParams

    world = init_world(args.timeout_s)
    n = args.dp * args.pp * args.tp
    if world.size != n:
        raise ValueError(f"dp*pp*tp = {n} workers, but the job has {world.size} processes")
    try:
        ctx = make_contexts(world, args.dp, args.pp, args.tp)
        config = EngineConfig(args.model_dir, pp=args.pp, tp=args.tp, block_size=args.block_size,
                              num_blocks=args.num_blocks, max_batch=args.max_batch,
                              micro_batches=args.micro_batches, dtype=args.dtype, device=args.device,
                              timeout_s=args.timeout_s)
        engine = Engine(config, ctx)
        stops = tuple(args.stop_token_ids or ())
        for i, prompt in enumerate(args.prompt_ids):
            if i % args.dp == ctx.replica:
                params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed + i, stops)
                engine.add_request(str(i), prompt, params)

        def on_step(eng, new):
            if args.log_steps:
                _event(event="step", rank=world.rank, replica=ctx.replica, step=eng.steps, tokens=new)
            if args.step_delay_s:
                time.sleep(args.step_delay_s)

        outputs = engine.run(on_step)
        merged = _gather_outputs(ctx, world, args.dp, {int(k): v for k, v in outputs.items()})
    except CollectiveError as exc:
        _event(event="error", rank=world.rank, error=type(exc).__name__, message=str(exc),
               lost=getattr(exc, "lost", []))
        print(f"spotserve.generate: {exc}", file=sys.stderr, flush=True)
        world.linger()
        # The process group is broken; skip its teardown, which could block on the dead peer.
        os._exit(3)
    except Exception as exc:
        if world.size == 1:
            raise
        # A failure of this rank alone (bad checkpoint, bad request): peers report it by name.
        print(f"spotserve.generate: rank {world.rank}: error: {exc}", file=sys.stderr, flush=True)
        world.abort(f"{type(exc).__name__}: {exc}")
        os._exit(2)
    if merged is not None:
        print(json.dumps({"model": engine.spec.name, "dp": args.dp, "pp": args.pp, "tp": args.tp,
                          "outputs": [merged[i] for i in range(len(args.prompt_ids))]}), flush=True)
    world.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"spotserve.generate: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
