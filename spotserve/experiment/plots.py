"""Matplotlib figures (Agg backend, PNG files) from a run's outputs."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spotserve.experiment.outputs import read_instances, read_requests, read_summary  # noqa: E402


def _save(fig, path: Path) -> Path:
    """Write a finished figure and free it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_percentiles(out: Path, title: str = "") -> Path:
    """Grouped bars of avg / P50 / P90 / P99 latency per approach."""
    summ = read_summary(out)
    names = list(summ)
    keys = ["avg_s", "p50_s", "p90_s", "p99_s"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    w = 0.8 / len(keys)
    for j, k in enumerate(keys):
        ax.bar([i + j * w for i in range(len(names))], [summ[n][k] or 0 for n in names], w, label=k[:-2])
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("latency (s)")
    ax.set_title(title or "request latency")
    ax.legend(fontsize=8)
    return _save(fig, out / "latency_percentiles.png")


def latency_over_time(out: Path, title: str = "") -> Path:
    """Per approach: each completed request's latency at its arrival time, and the instance count."""
    summ = read_summary(out)
    names = list(summ)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.9 * len(names) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [r for r in read_requests(out, name) if r["fate"] == "completed"]
        ax.scatter([r["arrival_s"] for r in rows], [r["latency_s"] for r in rows], s=3)
        ax.set_ylabel(f"{name}\nlatency (s)", fontsize=8)
        counts = read_instances(out, name)
        if counts:
            ax2 = ax.twinx()
            ts = [t for t, _ in counts]
            ax2.step(ts, [n for _, n in counts], where="post", color="tab:red", lw=1)
            ax2.set_ylabel("instances", color="tab:red", fontsize=8)
    axes[-1, 0].set_xlabel("arrival time (s)")
    fig.suptitle(title or "latency over time")
    return _save(fig, out / "latency_over_time.png")


def cost_vs_latency(out: Path, title: str = "") -> Path:
    """USD per 1k tokens against P99 latency, one point per approach / cluster."""
    summ = read_summary(out)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, s in summ.items():
        if s["usd_per_token"] is None or s["p99_s"] is None:
            continue
        ax.scatter(s["p99_s"], s["usd_per_token"] * 1e3)
        ax.annotate(name, (s["p99_s"], s["usd_per_token"] * 1e3), fontsize=8)
    ax.set_xlabel("P99 latency (s)")
    ax.set_ylabel("USD per 1k output tokens")
    ax.set_title(title or "cost vs latency")
    return _save(fig, out / "cost_vs_latency.png")


def ablation_bars(out: Path, title: str = "") -> Path:
    """Average and P99 latency of spotserve and each ablation."""
    summ = read_summary(out)
    names = list(summ)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 3.6))
    ax.bar([i - 0.2 for i in range(len(names))], [summ[n]["avg_s"] or 0 for n in names], 0.4, label="avg")
    ax.bar([i + 0.2 for i in range(len(names))], [summ[n]["p99_s"] or 0 for n in names], 0.4, label="P99")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("latency (s)")
    ax.set_title(title or "ablation")
    ax.legend(fontsize=8)
    return _save(fig, out / "ablation.png")


FIGURES = {"latency": latency_percentiles, "timeline": latency_over_time, "cost": cost_vs_latency,
           "ablation": ablation_bars}
