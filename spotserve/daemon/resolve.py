"""From the planner's migration plan to exact moves: which elements of which tensor go from which GPU to which.

The planner (planner/migration.py) reasons in fractions (lo, hi, den) of a tensor's tp dimension;
they are exact only when every tp degree splits every dimension evenly. Here a planner transfer
means "`dst` gets, from `src`, the part of its new shard that `src`'s old shard holds, preferring
the fraction the plan names". Per destination and plan unit (embed, layer i, head, KV of a
request at layer i) the parts are assigned in passes:
  1. each named live source gives its holding inside the plan's fraction (exact for even splits);
  2. each named live source gives whatever else of the need it holds (uneven boundaries);
  3. a live holder the plan did not name gives the rest (only when the plan named no disk read);
  4. the checkpoint gives what is still missing (weights); KV with no live holder is lost.
What a GPU already holds in its old position stays (a LOCAL move, a copy or nothing at all).
Every worker runs the same deterministic resolution, so all agree on the moves without talking.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

from spotserve.daemon.layout import KVRequest, Layout, full_shape, unit_of
from spotserve.models.spec import ModelSpec
# One definition of interval cutting and fraction rounding: the planner counts bytes with the same
# rounding the executor moves them with, which is what makes planned bytes exact.
from spotserve.planner.pieces import cut as _cut
from spotserve.planner.pieces import frac_elem as _frac
from spotserve.planner.types import Transfer

LOCAL = -1  # kept on the destination from its old position
EXTRA = -2  # a source (or disk read) the plan did not name: uneven-split boundaries


@dataclass(frozen=True)
class Move:
    """Elements [start, end) along `dim` of weight `name` (kind "w"), or kv heads [start, end) of
    request `name` at layers [layer, layer_end) for positions [t0, t1) (kind "kv"; whole KV blocks
    travel, so nbytes counts the last block's padding), from `src` (None: checkpoint) to `dst`."""

    src: str | None
    dst: str
    kind: str
    name: str
    layer: int
    dim: int
    start: int
    end: int
    t0: int
    t1: int
    nbytes: int
    unit: tuple[str, int]
    transfer: int  # index into the plan's transfers, LOCAL or EXTRA
    replicated: bool = False
    layer_end: int = -1

    def units(self) -> list[tuple[str, int]]:
        """Progress units this move completes a part of."""
        return [("kv", i) for i in range(self.layer, self.layer_end)] if self.kind == "kv" else [self.unit]


@dataclass
class ByteCheck:
    """One planner transfer: the bytes the planner counted and the exact bytes of its moves."""

    index: int
    planner: int
    exact: int

    @property
    def diff(self) -> int:
        return self.exact - self.planner


@dataclass
class Resolution:
    moves: list[Move]
    lost_kv: set[str] = field(default_factory=set)
    checks: list[ByteCheck] = field(default_factory=list)

    def summary(self) -> dict:
        """Totals: planned vs exact bytes, moves and bytes the plan did not name, transfers whose bytes differ."""
        extra = [m for m in self.moves if m.transfer == EXTRA]
        return {"planner_bytes": sum(c.planner for c in self.checks), "exact_bytes": sum(c.exact for c in self.checks),
                "extra_moves": len(extra), "extra_bytes": sum(m.nbytes for m in extra),
                "extra_disk_bytes": sum(m.nbytes for m in extra if m.src is None),
                "mismatched_transfers": sum(1 for c in self.checks if abs(c.diff) > 1),
                "max_abs_diff": max((abs(c.diff) for c in self.checks), default=0.0)}


class _Resolver:
    def __init__(self, spec: ModelSpec, old: Layout | None, new: Layout, requests, dtype_bytes: int, live):
        self.spec, self.old, self.new, self.db = spec, old, new, dtype_bytes
        self.bs = old.block_size if old is not None else new.block_size
        gpus_old = old.gpus() if old is not None else []
        self.live = [g for g in gpus_old if live is None or g in live]
        self.old_w = {g: old.weight_ranges(spec, g) for g in self.live}
        self.old_kv = {g: old.kv_ranges(spec, g) for g in self.live}
        self.need = {g: new.weight_ranges(spec, g) for g in new.gpus()}
        self.first = {g: new.position(g).stage == 0 for g in new.gpus()}
        self.rem: dict[tuple, list[tuple[int, int]]] = {}
        self.reqs = {r.request_id: r for r in requests}
        self.moves: list[Move] = []
        for g, rs in self.need.items():
            for n, r in rs.items():
                self.rem[("w", g, n, -1)] = [(r.start, r.end)]
            rep, layers, heads = new.kv_ranges(spec, g)
            for r in requests:
                if r.new_replica == rep and r.num_tokens > 0:
                    for layer in range(*layers):
                        self.rem[("kv", g, r.request_id, layer)] = [heads]

    # --- sizes ------------------------------------------------------------------------------------
    def row_bytes(self, name: str, dim: int) -> int:
        shape = full_shape(self.spec, name)
        n = self.db
        for d, s in enumerate(shape):
            if d != dim:
                n *= s
        return n

    def kv_bytes(self, rid: str, heads: int, whole_blocks: bool = True) -> int:
        t = self.reqs[rid].num_tokens
        if whole_blocks:
            t = -(-t // self.bs) * self.bs
        return t * 2 * heads * self.spec.head_dim * self.db

    # --- holders ---------------------------------------------------------------------------------
    def holding(self, gpu: str | None, key: tuple) -> tuple[int, int] | None:
        """The interval of `key`'s tensor that live old GPU `gpu` holds."""
        if gpu is None or gpu not in self.old_w:
            return None
        kind, _, name, layer = key
        if kind == "w":
            h = self.old_w[gpu].get(name)
            return None if h is None else (h.start, h.end)
        held = self.old_kv[gpu]
        req = self.reqs[name]
        if held is None or held[0] != req.old_replica or not held[1][0] <= layer < held[1][1]:
            return None
        return held[2]

    def take(self, key: tuple, src: str | None, a: int, b: int, transfer: int) -> None:
        inside, rest = _cut(self.rem[key], a, b)
        self.rem[key] = rest
        kind, dst, name, layer = key
        for x, y in inside:
            if kind == "w":
                r = self.need[dst][name]
                self.moves.append(Move(src, dst, "w", name, -1, r.dim, x, y, 0, 0, (y - x) * self.row_bytes(name, r.dim),
                                       unit_of(self.spec, name, self.first[dst]), transfer, r.replicated))
            else:
                t = self.reqs[name].num_tokens
                self.moves.append(Move(src, dst, "kv", name, layer, 0, x, y, 0, t, self.kv_bytes(name, y - x),
                                       ("kv", layer), transfer, layer_end=layer + 1))

    # --- passes ----------------------------------------------------------------------------------
    def keep_local(self) -> None:
        for key in list(self.rem):
            h = self.holding(key[1], key)
            if h is not None:
                self.take(key, key[1], h[0], h[1], LOCAL)

    def keys_of(self, dst: str, t: Transfer) -> list[tuple]:
        if t.tensor == "kv":
            if t.request not in self.reqs:
                raise ValueError(f"plan moves KV of request {t.request!r}, which is not among the executor's requests")
            key = ("kv", dst, t.request, t.layer)
            if key not in self.rem:
                raise ValueError(f"plan sends KV of {t.request} layer {t.layer} to {dst}, whose new position "
                                 f"does not continue it")
            return [key]
        unit = ("layer", t.layer) if t.tensor == "layer" else (t.tensor, -1)
        return [("w", dst, n, -1) for n in self.need.get(dst, {})
                if unit_of(self.spec, n, self.first[dst]) == unit]

    def group(self, dst: str, items: list[tuple[int, Transfer]]) -> None:
        if dst not in self.need:
            raise ValueError(f"plan sends to {dst}, which has no position in the new layout")
        keys = self.keys_of(dst, items[0][1])
        for i, t in items:  # pass 1: the plan's fraction
            for key in keys:
                h = self.holding(t.src, key)
                if h is None or (key[0] == "w" and self.need[dst][key[2]].replicated):
                    continue
                n = self.spec.kv_heads if key[0] == "kv" else full_shape(self.spec, key[2])[self.need[dst][key[2]].dim]
                lo, hi, den = t.slice or (0, 1, 1)
                self.take(key, t.src, max(h[0], _frac(lo, n, den)), min(h[1], _frac(hi, n, den)), i)
        for i, t in items:  # pass 2: the rest of what the named sources hold
            for key in keys:
                h = self.holding(t.src, key)
                if h is not None:
                    self.take(key, t.src, h[0], h[1], i)
        disk = next((i for i, t in items if t.src is None), None)
        named = [t.src for _, t in items if t.src is not None]
        for key in keys:
            self.finish(key, named, disk)

    def finish(self, key: tuple, named: list[str], disk: int | None) -> None:
        """Passes 3 and 4 for one key: unnamed live holders (unless the plan chose the disk), then disk / lost."""
        if not self.rem.get(key):
            return
        if disk is None or key[0] == "kv":
            for g in sorted(self.live, key=lambda g: (g not in named, g)):
                h = self.holding(g, key)
                if h is not None and g != key[1]:
                    self.take(key, g, h[0], h[1], EXTRA)
        if self.rem[key] and key[0] == "w":
            for a, b in list(self.rem[key]):
                self.take(key, None, a, b, EXTRA if disk is None else disk)


def resolve(spec: ModelSpec, old: Layout | None, new: Layout, transfers: list[Transfer],
            requests: list[KVRequest] = (), dtype_bytes: int = 2, live=None) -> Resolution:
    """Exact moves (in plan order: local keeps first, then per destination unit as the plan lists them).

    `live`: old GPUs that still hold their context (default: every GPU of `old`); `requests`: the
    requests whose KV moves. Requests with KV no live GPU holds are returned in `lost_kv` and none
    of their KV moves are kept. Raises ValueError when the plan names a GPU or request the
    layouts do not know.
    """
    r = _Resolver(spec, old, new, list(requests), dtype_bytes, live)
    r.keep_local()
    groups: OrderedDict[tuple, list[tuple[int, Transfer]]] = OrderedDict()
    for i, t in enumerate(transfers):
        groups.setdefault((t.dst, t.tensor, t.layer, t.request), []).append((i, t))
    for (dst, *_), items in groups.items():
        r.group(dst, items)
    for key in list(r.rem):  # needs the plan did not list (exact ranges beyond the plan's fractions)
        r.finish(key, [], None)
    lost = {key[2] for key, ivs in r.rem.items() if ivs and key[0] == "kv"}
    moves = [m for m in r.moves if not (m.kind == "kv" and m.name in lost)]
    return Resolution(_merge_layers(moves), lost, _checks(r, transfers, moves))


def _merge_layers(moves: list[Move]) -> list[Move]:
    """Joins a request's KV moves of consecutive layers with the same source, destination and heads into
    one (placed where its first layer was): whole pieces then travel as one contiguous box."""
    out: list[Move] = []
    last: dict[tuple, int] = {}
    for m in moves:
        if m.kind != "kv":
            out.append(m)
            continue
        key = (m.src, m.dst, m.name, m.start, m.end, m.transfer < 0 and m.transfer)
        i = last.get(key)
        if i is not None and out[i].layer_end == m.layer:
            out[i] = replace(out[i], layer_end=m.layer_end, nbytes=out[i].nbytes + m.nbytes)
            continue
        last[key] = len(out)
        out.append(m)
    return out


def _checks(r: _Resolver, transfers: list[Transfer], moves: list[Move]) -> list[ByteCheck]:
    exact = [0] * len(transfers)
    for m in moves:
        if m.transfer >= 0:  # KV: token-exact bytes, as the planner counts them (blocks carry padding)
            exact[m.transfer] += m.nbytes if m.kind == "w" else r.kv_bytes(m.name, m.end - m.start, False)
    return [ByteCheck(i, t.nbytes, exact[i]) for i, t in enumerate(transfers)]
