"""Cuts resolved moves into rounds of point-to-point messages that fit a worker's staging budget.

Every worker computes the same rounds from the same moves. A move of at least `solo_bytes` whose
box is dense in its source or destination tensor (`dense(move) -> (src, dst)`, from the layouts
alone, so all workers agree) travels as its own message and that side sends or receives it with no
staging copy; smaller moves of one (src, dst) pair in a round are coalesced into one staged
message (KV blocks and biases are small: NCCL runs 80 GB/s at 8 MiB messages but 365 GB/s at
1 GiB ones). Per round and worker, staged bytes (sends plus receives) stay within `limit` (the
executor keeps `depth` rounds in flight, so staging stays within depth * limit) and the bytes it
sends, and those it receives, within `round_bytes` (the size of one NCCL group). Moves larger
than that are split (weights along their sliced dimension, KV along whole blocks) unless a
split would make a dense box strided. Without `dense`, every side counts as staged (the
executor still sends a solo move's contiguous side directly). Local keeps and checkpoint
reads are paced over the rounds in proportion to the network bytes, so the local copies of a
worker neither hold back the first sends nor wait for the last one.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable

from spotserve.daemon.resolve import Move

ALIGN = 64  # every staged move starts on a 64-byte boundary (any dtype view is aligned)
Dense = Callable[[Move], tuple[bool, bool]]


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Message:
    """One send/recv between two workers: `moves` packed at `offsets` (staged), or one solo move.
    src_staged / dst_staged: whether that side goes through staging (what prepare() sizes buffers by)."""

    src: str
    dst: str
    moves: list[Move]
    offsets: list[int]
    nbytes: int
    solo: bool
    src_staged: bool = True
    dst_staged: bool = True

    def staged_on(self, gpu: str) -> bool:
        return self.src_staged if gpu == self.src else self.dst_staged


@dataclass
class Round:
    messages: list[Message] = field(default_factory=list)
    local: list[Move] = field(default_factory=list)  # LOCAL keeps and checkpoint reads, run by their dst


def _bounds(units: int, unit_bytes: int, limit: int) -> list[int]:
    """Cut points of `units` into as few pieces as `limit` allows, of sizes differing by at most one
    unit (no small tail message)."""
    pieces = -(-units // max(1, limit // unit_bytes))
    return [i * units // pieces for i in range(pieces + 1)]


def split(move: Move, limit: int, block_size: int) -> list[Move]:
    """`move` cut into pieces of at most `limit` bytes (at least one row or KV block each), of
    balanced sizes (KV pieces start on block boundaries)."""
    if move.nbytes <= limit:
        return [move]
    if move.kind == "w":
        row = move.nbytes // (move.end - move.start)
        cut = _bounds(move.end - move.start, row, limit)
        return [replace(move, start=move.start + a, end=move.start + b, nbytes=(b - a) * row)
                for a, b in zip(cut, cut[1:])]
    first = move.t0 // block_size
    blocks = -(-move.t1 // block_size) - first
    per_block = move.nbytes // blocks
    cut = _bounds(blocks, per_block, limit)
    out = []
    for a, b in zip(cut, cut[1:]):
        t0, t1 = max(move.t0, (first + a) * block_size), min(move.t1, (first + b) * block_size)
        out.append(replace(move, t0=t0, t1=t1, nbytes=(b - a) * per_block))
    return out


def _pieces(move: Move, limit: int, cap: int, solo_bytes: int, block_size: int,
            dense: Dense | None) -> list[tuple[Move, bool, bool, bool]]:
    """(piece, solo, src staged, dst staged) of one network move."""
    if dense is None:
        return [(p, p.nbytes >= solo_bytes, True, True) for p in split(move, limit, block_size)]
    if move.nbytes >= solo_bytes:
        s, d = dense(move)
        if s and d:  # no staging: only the round size bounds it, and only where pieces stay dense
            ps = split(move, cap, block_size)
            if len(ps) > 1 and not all(all(dense(p)) for p in ps):
                ps = [move]
            return [(p, True, False, False) for p in ps]
        if s or d:
            out = []
            for p in split(move, limit, block_size):
                ps, pd = dense(p) if p is not move else (s, d)
                solo = p.nbytes >= solo_bytes and (ps or pd)
                out.append((p, solo, not (solo and ps), not (solo and pd)))
            return out
    return [(p, False, True, True) for p in split(move, limit, block_size)]


def plan_rounds(moves: list[Move], limit: int, solo_bytes: int, block_size: int, dense: Dense | None = None,
                round_bytes: int | None = None) -> list[Round]:
    """Rounds of messages in plan order (module docstring). limit: staged bytes per worker and
    round; round_bytes (default limit): bytes a worker sends, and receives, per round.
    Raises ValueError for a non-positive limit or round_bytes."""
    cap = limit if round_bytes is None else round_bytes
    if limit <= 0 or cap <= 0:
        raise ValueError(f"staging limit and round bytes must be positive, got {limit}, {cap}")
    rounds: list[Round] = []
    net: list[tuple[Move, bool, bool, bool]] = []
    local: list[Move] = []
    staged: dict[str, int] = defaultdict(int)
    out_b: dict[str, int] = defaultdict(int)
    in_b: dict[str, int] = defaultdict(int)
    for move in moves:
        if move.src is None or move.src == move.dst:
            local.append(move)
            continue
        for piece in _pieces(move, limit, cap, solo_bytes, block_size, dense):
            p, _, s_st, d_st = piece
            n = align(p.nbytes)
            if net and (staged[p.src] + n * s_st > limit or staged[p.dst] + n * d_st > limit
                        or out_b[p.src] + n > cap or in_b[p.dst] + n > cap):
                rounds.append(_messages(net))
                net, staged, out_b, in_b = [], defaultdict(int), defaultdict(int), defaultdict(int)
            net.append(piece)
            staged[p.src] += n * s_st
            staged[p.dst] += n * d_st
            out_b[p.src] += n
            in_b[p.dst] += n
    if net:
        rounds.append(_messages(net))
    if not rounds and local:
        rounds.append(Round())
    _pace(rounds, local)
    return rounds


def _pace(rounds: list[Round], local: list[Move]) -> None:
    """Spreads each destination's local moves (in order) over the rounds: the local bytes done by
    the end of a round keep up with the share of the network bytes sent by then."""
    total = sum(msg.nbytes for r in rounds for msg in r.messages)
    ends, acc = [], 0
    for r in rounds:
        acc += sum(msg.nbytes for msg in r.messages)
        ends.append(acc / total if total else 1.0)
    mine: dict[str, list[Move]] = defaultdict(list)
    for m in local:
        mine[m.dst].append(m)
    for ms in mine.values():
        whole, done, k = sum(m.nbytes for m in ms) or 1, 0, 0
        for m in ms:
            while k < len(rounds) - 1 and done / whole >= ends[k]:
                k += 1
            rounds[k].local.append(m)
            done += m.nbytes


def _messages(net: list[tuple[Move, bool, bool, bool]]) -> Round:
    pairs: dict[tuple[str, str], list] = {}
    for piece in net:
        pairs.setdefault((piece[0].src, piece[0].dst), []).append(piece)
    out = Round()
    for (src, dst), ps in pairs.items():
        small = [p for p, solo, _, _ in ps if not solo]
        if small:
            offsets, pos = [], 0
            for m in small:
                offsets.append(pos)
                pos += align(m.nbytes)
            out.messages.append(Message(src, dst, small, offsets, pos, False))
        out.messages += [Message(src, dst, [p], [0], align(p.nbytes), True, s_st, d_st)
                         for p, solo, s_st, d_st in ps if solo]
    return out
