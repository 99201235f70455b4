"""Cuts resolved moves into rounds of point-to-point messages that fit a worker's staging budget.

Every worker computes the same rounds from the same moves. A round holds, per worker, at most
`limit` bytes of sends plus receives (the executor keeps `depth` rounds in flight, so staging
stays within depth * limit). Inside a round the moves of one (src, dst) pair are coalesced into one message (KV
blocks are small: NCCL runs 80 GB/s at 8 MiB messages but 365 GB/s at 1 GiB ones); a move of at
least `solo_bytes` travels alone, so a contiguous slice can go from tensor to tensor with no
staging copy. Moves larger than `limit` are split (weights along their sliced dimension, KV along
whole blocks). Local keeps and checkpoint reads ride in the round where the plan lists them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from spotserve.daemon.resolve import Move

ALIGN = 64  # every staged move starts on a 64-byte boundary (any dtype view is aligned)


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Message:
    """One send/recv between two workers: `moves` packed at `offsets` (staged), or one solo move."""

    src: str
    dst: str
    moves: list[Move]
    offsets: list[int]
    nbytes: int
    solo: bool


@dataclass
class Round:
    messages: list[Message] = field(default_factory=list)
    local: list[Move] = field(default_factory=list)  # LOCAL keeps and checkpoint reads, run by their dst


def split(move: Move, limit: int, block_size: int) -> list[Move]:
    """`move` cut into pieces of at most `limit` bytes (KV pieces start on block boundaries)."""
    if move.nbytes <= limit:
        return [move]
    if move.kind == "w":
        row = move.nbytes // (move.end - move.start)
        step = max(1, limit // row)
        return [replace(move, start=a, end=min(a + step, move.end), nbytes=(min(a + step, move.end) - a) * row)
                for a in range(move.start, move.end, step)]
    blocks = -(-move.t1 // block_size) - move.t0 // block_size
    per_block = move.nbytes // blocks
    step = max(1, limit // per_block) * block_size
    out = []
    for a in range(move.t0, move.t1, step):
        b = min(a + step, move.t1)
        out.append(replace(move, t0=a, t1=b, nbytes=(-(-b // block_size) - a // block_size) * per_block))
    return out


def plan_rounds(moves: list[Move], limit: int, solo_bytes: int, block_size: int) -> list[Round]:
    """Rounds of messages in plan order; raises ValueError for a non-positive limit."""
    if limit <= 0:
        raise ValueError(f"staging limit must be positive, got {limit}")
    rounds: list[Round] = []
    net: list[Move] = []
    local: list[Move] = []
    load: dict[str, int] = defaultdict(int)

    def close():
        rounds.append(_messages(net, local, solo_bytes))

    for move in moves:
        if move.src is None or move.src == move.dst:
            local.append(move)
            continue
        for piece in split(move, limit, block_size):
            n = align(piece.nbytes)
            if net and (load[piece.src] + n > limit or load[piece.dst] + n > limit):
                close()
                net, local, load = [], [], defaultdict(int)
            net.append(piece)
            load[piece.src] += n
            load[piece.dst] += n
    if net or local:
        close()
    return rounds


def _messages(net: list[Move], local: list[Move], solo_bytes: int) -> Round:
    pairs: dict[tuple[str, str], list[Move]] = {}
    for m in net:
        pairs.setdefault((m.src, m.dst), []).append(m)
    out = Round(local=list(local))
    for (src, dst), ms in pairs.items():
        small = [m for m in ms if m.nbytes < solo_bytes]
        if small:
            offsets, pos = [], 0
            for m in small:
                offsets.append(pos)
                pos += align(m.nbytes)
            out.messages.append(Message(src, dst, small, offsets, pos, False))
        out.messages += [Message(src, dst, [m], [0], align(m.nbytes), True) for m in ms if m.nbytes >= solo_bytes]
    return out

