"""Expected request latency of replicas that batch dynamically: the model the optimizer ranks configs by.

How a replica serves (the controller's rule, shared by the simulator and the live cluster): when it
is idle and requests wait, it takes up to ``B`` of them in FIFO order and runs them as one batch,
which takes T(b) for b requests (cost model: prefill, then decode to the last token); nothing joins a
running batch. A config is one or two groups of identical replicas (the dp main replicas and an
optional extra one); requests reach a group in proportion to its full-batch capacity n B / T(B).

For a group of n replicas receiving Poisson arrivals at rate lam (T is increasing and sublinear in b):

* Stability: the full-batch utilisation rho_B = lam T(B) / (n B) must stay below 1.
* Batch size: at low load batches hold one request; once one-request batches cannot keep up
  (lam T(1) / n > 1) requests pile up while every replica is busy and batches grow to the fixed
  point b = lam T(b) / n (each replica then takes, per batch, what arrived during the last one).
  So b* = clip(smallest fixed point >= 1, 1, B): the limit of b <- lam T(b) / n from b = 1, found in
  closed form since T is linear between integer batch sizes (the first segment where
  g(b) = lam T(b) / n - b changes sign holds it).
* Waiting for a replica: a request waits only when all n replicas are busy (probability ~
  u^(sqrt(2 (n + 1)) - 1) at busy fraction u = lam T(b*) / (n b*), Sakasegawa's approximation of
  Erlang C, exact for n = 1), and then for the first of n running batches to end (~T(b*) / (n + 1)),
  after which it joins that batch since everyone waiting fits in B.
* Overflow: near rho_B -> 1 the waiting requests no longer fit one batch; that wait is the G/G/c
  queue of the n B batch slots of service T(B): 0.5 rho_B^(sqrt(2 (nB + 1)) - 1) T(B) / (nB (1 - rho_B))
  (deterministic service, Poisson arrivals).

    latency = T(b*) + P(all busy) T(b*) / (n + 1) + overflow wait

Checked against the simulator (tests/planner/test_queueing.py): on static clusters of the paper's
models it is within ~15% of the simulated mean for loads up to the capacity, where the previous
single-queue factor 1 + rho / (2 (1 - rho)) on the full-batch time overestimated by 1.5-5x and
ranked many replicas of short batches below fewer replicas of long ones.
Everything is vectorised with numpy (arrays broadcast together).
"""
from __future__ import annotations

import numpy as np


def batch_table(cost, pp, tp, batch, micro) -> np.ndarray:
    """T(b) (s) of shapes (arrays) at b = 1 .. max(batch): rows follow the shapes, column k is b = k + 1.

    A batch of b < micro requests runs min(micro, b) micro-batches (as the backends do)."""
    pp, tp, batch, micro = (np.asarray(x, np.int64).reshape(-1) for x in (pp, tp, batch, micro))
    top = int(batch.max(initial=1))
    b = np.arange(1, top + 1)[None, :]
    m = np.minimum(micro[:, None], b)
    return np.asarray(cost.batch_seconds(pp[:, None], tp[:, None], b, m), float)


def _interp(table: np.ndarray, rows: np.ndarray, b: np.ndarray) -> np.ndarray:
    """T at fractional batch b (1 <= b <= last column) of table rows ``rows``, linear between columns."""
    lo = np.clip(np.floor(b).astype(np.int64), 1, table.shape[1])
    hi = np.minimum(lo + 1, table.shape[1])
    f = b - lo
    return table[rows, lo - 1] * (1 - f) + table[rows, hi - 1] * f


def _fixed_point(table: np.ndarray, rows: np.ndarray, B: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Smallest b >= 1 with b = a T(b) (T linear between integer batches), clipped to [1, B]."""
    cols = np.arange(1, table.shape[1] + 1)
    g = a[:, None] * table[rows] - cols[None, :]  # g at b = 1, 2, ...
    valid = cols[None, :] <= B[:, None]
    below = (g <= 0) & valid
    below[:, 0] = False  # b = 1 is the answer when g(1) <= 0, handled below
    hit = below.any(axis=1)
    c = np.argmax(below, axis=1)  # first integer b = c + 1 >= 2 with g <= 0
    k = np.arange(len(rows))
    g_lo, g_hi = g[k, np.maximum(c - 1, 0)], g[k, c]
    with np.errstate(divide="ignore", invalid="ignore"):
        root = c + g_lo / (g_lo - g_hi)  # b in [c, c + 1]
    b = np.where(hit, root, B)
    return np.where(g[:, 0] <= 0, 1.0, np.clip(b, 1.0, B))


def group_latency(table: np.ndarray, rows, batch, n, rate) -> np.ndarray:
    """Expected latency (s) of a request in a group of ``n`` replicas of the shapes ``table[rows]`` with max
    batch ``batch``, receiving ``rate`` req/s (formula in the module doc); inf where unstable or n = 0."""
    rows, B, n, lam = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(batch, float),
                                          np.asarray(n, float), np.asarray(rate, float))
    shape = rows.shape
    rows, B, n, lam = (x.ravel() for x in (rows, B, n, lam))
    TB = _interp(table, rows, B)
    nn = np.maximum(n, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho_b = lam * TB / (nn * B)
        b = _fixed_point(table, rows, B, lam / nn)
        s = _interp(table, rows, b)
        u = np.minimum(1.0, lam * s / (nn * b))
        wait_busy = u ** (np.sqrt(2 * (nn + 1)) - 1) * s / (nn + 1)
        k = nn * B
        over = 0.5 * rho_b ** (np.sqrt(2 * (k + 1)) - 1) * TB / (k * (1 - rho_b))
        lat = s + wait_busy + over
    return np.where((rho_b < 1) & (n >= 1), lat, np.inf).reshape(shape)


def group_capacity(table: np.ndarray, rows, batch, n) -> np.ndarray:
    """Requests/s of ``n`` replicas running full batches."""
    rows, B, n = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(batch, float), np.asarray(n, float))
    return n * B / _interp(table, rows, B)


def mixed_latency(lat_a, cap_a, lat_b, cap_b) -> np.ndarray:
    """Latency of two groups sharing the arrivals in proportion to capacity (cap_b may be 0)."""
    cap_a, cap_b = np.asarray(cap_a, float), np.asarray(cap_b, float)
    tot = cap_a + cap_b
    with np.errstate(invalid="ignore"):
        both = (cap_a * lat_a + np.where(cap_b > 0, cap_b * lat_b, 0.0)) / tot
    return np.where(tot > 0, both, np.inf)
