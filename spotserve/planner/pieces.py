"""Exact weight transfers of one (destination, unit): sources in tp fractions, bytes in exact elements.

The migration planner picks a source for every part of the fraction [lo, hi) of a unit a destination
misses (planner/migration.py). Here those parts become transfers whose ``nbytes`` are exact
(planner/exact.py): heads-split bytes by the fraction; the unevenly split dimension (ffn, vocab) by
element ranges from ``sharding.partition``, given in the same order a receiver resolves them:
1. each live source gives its elements inside the rounded fraction round(x * n / den) of its part;
2. each live source then gives what else of the need it holds;
3. a disk part of the unit takes whatever is left; else live holders the parts did not name fill
   the gaps at uneven boundaries (one extra transfer per contiguous range, ``slice = (lo, hi, n)``,
   after the unit's other transfers), else the disk;
replicated tensors go whole with the first transfer whose source holds them (or the first disk read).
"""
from __future__ import annotations

from spotserve.models.sharding import partition
from spotserve.planner.exact import UnitBytes


def cut(ivs: list[tuple[int, int]], a: int, b: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(parts of the intervals ivs inside [a, b), ivs minus [a, b))."""
    inside, rest = [], []
    for lo, hi in ivs:
        x, y = max(lo, a), min(hi, b)
        if x >= y:
            rest.append((lo, hi))
            continue
        inside.append((x, y))
        rest += [iv for iv in ((lo, x), (y, hi)) if iv[0] < iv[1]]
    return inside, sorted(rest)


def frac_elem(x: int, n: int, den: int) -> int:
    """Element of an n-element dimension at fraction x / den, rounded to the nearest."""
    return (x * n + den // 2) // den


def _merge(ivs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ivs):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


class ExactPieces:
    """Builds the exact weight transfers of a destination's units (state shared over one migration)."""

    def __init__(self, old, new, old_at: dict[str, int], den: int, tied: bool, instance_of: dict[str, str],
                 send_time: dict[str, float], sources):
        self.old, self.new, self.old_at, self.den, self.tied = old, new, old_at, den, tied
        self.instance_of, self.send_time, self.sources = instance_of, send_time, sources
        tps = {int(t) for t in new.tp} | ({int(t) for t in old.tp} if old is not None else set())
        self._even: dict[int, bool] = {}  # n -> every tp involved splits n evenly (fractions are exact)
        self._tps = tps
        self._parts: dict[tuple[int, int, int], tuple[int, int]] = {}

    def _part(self, n: int, tp: int, k: int) -> tuple[int, int]:
        key = (n, tp, k)
        if key not in self._parts:
            self._parts[key] = partition(n, tp, k)
        return self._parts[key]

    def _is_even(self, n: int) -> bool:
        if n not in self._even:
            self._even[n] = all(n % t == 0 for t in self._tps)
        return self._even[n]

    def _held(self, gid: str, n: int) -> tuple[int, int]:
        j = self.old_at[gid]
        return self._part(n, int(self.old.tp[j]), int(self.old.shard[j]))

    def _has_rep(self, gid: str, kind: str) -> bool:
        j = self.old_at[gid]
        return kind == "layer" or bool(self.old.first[j] if kind == "embed" else self.old.last[j])

    def _pick(self, cands: list[str], dst: str) -> str:
        local = [g for g in cands if self.instance_of[g] == self.instance_of[dst]]
        return min(local or cands, key=lambda g: (self.send_time[g], g))

    def weights(self, dst: str, i: int, key: tuple, a: int, b: int, mine: dict, holders: list,
                ub: dict[str, UnitBytes]) -> list[tuple]:
        """[(src, slice, nbytes, elems)] in order for weight unit ``key`` of new position ``i`` on ``dst``,
        which needs the fraction [a, b); ``mine`` is what dst holds now, ``holders`` the live
        (gid, lo, hi) holders of the unit's tp-split part."""
        old, new, den = self.old, self.new, self.den
        kind = key[0]
        first = bool(new.first[i])
        u = ub["head_tied_first"] if kind == "head" and first else ub[kind]
        j = self.old_at.get(dst)
        have = mine.get(key)
        if have is None and self.tied and kind != "layer" and j is not None and (old.first[j] or old.last[j]):
            have = (int(old.f_lo[j]), int(old.f_hi[j]))  # a tied vocab held in its other role
        pieces: list[list] = []  # [src, lo, hi, elems]
        if u.even or u.per_elem:
            missing = [(a, b)] if have is None else cut([(a, b)], *have)[1]
            for lo, hi in missing:
                for s_lo, s_hi, src in self.sources(key, lo, hi, holders, dst, self.instance_of, self.send_time):
                    pieces.append([src, s_lo, s_hi, []])
        if kind == "layer" and (not u.per_elem or self._is_even(u.n)):
            return self._even_layer(u, pieces, u.replicated and key not in mine, a, b, holders, dst)
        gaps: list[list] = []  # [src, elems]
        if u.per_elem and self._is_even(u.n):  # every boundary is a fraction: elements follow the parts
            n = u.n
            for p in pieces:
                p[3].append((p[1] * n // den, p[2] * n // den))
        elif u.per_elem:
            n = u.n
            rem = [self._part(n, int(new.tp[i]), int(new.shard[i]))]
            if have is not None:
                rem = cut(rem, *self._held(dst, n))[1]
            for p in pieces:  # 1: the rounded fraction of each live source
                if p[0] is not None and rem:
                    h = self._held(p[0], n)
                    got, rem = cut(rem, max(h[0], frac_elem(p[1], n, den)), min(h[1], frac_elem(p[2], n, den)))
                    p[3] += got
            for p in pieces:  # 2: whatever else the named sources hold
                if p[0] is not None and rem:
                    got, rem = cut(rem, *self._held(p[0], n))
                    p[3] += got
            disk = next((p for p in pieces if p[0] is None), None)
            if rem and disk is not None:  # 3: the unit's disk read takes the rest
                disk[3] += rem
                rem = []
            live = [h[0] for h in holders if h[0] != dst]
            while rem:  # 3: unnamed holders at uneven boundaries, else the disk
                x = rem[0][0]
                cands = [g for g in live if self._held(g, n)[0] <= x < self._held(g, n)[1]]
                if cands:
                    src = self._pick(cands, dst)
                    got, rem = cut(rem, *self._held(src, n))
                    gaps += [[src, [iv]] for iv in got]
                else:
                    nxt = min([self._held(g, n)[0] for g in live if self._held(g, n)[0] > x] + [rem[0][1]])
                    got, rem = cut(rem, x, nxt)
                    d = next((g for g in gaps if g[0] is None), None)
                    if d is None:
                        gaps.append([None, got])
                    else:
                        d[1] += got
        carrier = None
        if u.replicated and not (key in mine):
            items = [p[0] for p in pieces] + [g[0] for g in gaps]
            carrier = next((k for k, s in enumerate(items) if s is not None and self._has_rep(s, kind)), None)
            if carrier is None:
                carrier = next((k for k, s in enumerate(items) if s is None), None)
            if carrier is None:
                cands = [g for g in {h[0] for h in holders} if g != dst and self._has_rep(g, kind)]
                gaps.append([self._pick(cands, dst) if cands else None, []])
                carrier = len(items)
        out = []
        for k, p in enumerate(pieces):
            nbytes = u.even * (p[2] - p[1]) // den + u.per_elem * sum(y - x for x, y in p[3]) + \
                (u.replicated if k == carrier else 0)
            if nbytes:
                elems = None if not u.per_elem else tuple(p[3]) if len(p[3]) < 2 else _merge(p[3])
                out.append((p[0], (p[1], p[2], den), nbytes, elems))
        for k, (src, ivs) in enumerate(gaps, start=len(pieces)):
            nbytes = u.per_elem * sum(y - x for x, y in ivs) + (u.replicated if k == carrier else 0)
            if ivs:
                m = _merge(ivs)
                slc = (m[0][0], m[-1][1], u.n)
            else:
                slc = (a, b, den)
            out.append((src, slc, nbytes, _merge(ivs) if u.per_elem else None))
        return out

    def _even_layer(self, u: UnitBytes, pieces: list, rep: bool, a: int, b: int, holders: list, dst: str) -> list:
        """Fast path of ``weights`` for a decoder layer whose splits are all even (the common case):
        elements follow the fractions and every holder of a layer holds its replicated tensors."""
        den, n = self.den, u.n
        out = []
        carrier = -1
        if rep:
            carrier = next((k for k, p in enumerate(pieces) if p[0] is not None), None)
            if carrier is None:
                carrier = 0 if pieces else None
        for k, (src, lo, hi, _) in enumerate(pieces):
            e0, e1 = lo * n // den, hi * n // den
            nbytes = u.even * (hi - lo) // den + u.per_elem * (e1 - e0) + (u.replicated if k == carrier else 0)
            out.append((src, (lo, hi, den), nbytes, ((e0, e1),) if u.per_elem else None))
        if rep and carrier is None:  # the layer's shard is held in place, only its replicated tensors are missing
            cands = [h[0] for h in holders if h[0] != dst]
            out.append((self._pick(cands, dst) if cands else None, (a, b, den), u.replicated,
                        () if u.per_elem else None))
        return out
