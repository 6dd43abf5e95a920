"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

Used by the benchmarks right after a run (raw samples in memory); also
``python -m bench.plots`` redraws the latency CDFs from bench/results/overhead.json
(the CDF points saved there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.harness import RESULTS

COLOURS = {
    "echo": "#7f7f7f",
    "http-echo": "#1f77b4",
    "llmq-1w": "#d62728",
    "llmq-2w": "#ff7f0e",
}


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def latency_cdfs(
    series: dict[str, dict[float, list[float]]],
    path: Path,
    *,
    rates: dict[str, float],
    title: str,
) -> Path:
    """One panel per load level: the CDF of round-trip latency of each system."""
    fractions = sorted({f for per in series.values() for f in per})
    fig, axes = plt.subplots(1, len(fractions), figsize=(5.5 * len(fractions), 4.2), squeeze=False)
    for ax, f in zip(axes[0], fractions, strict=True):
        for name, per in series.items():
            values = per.get(f)
            if not values:
                continue
            xs, ys = _cdf(values)
            ax.plot(xs, ys, label=name, color=COLOURS.get(name), linewidth=1.6)
        ax.set_xscale("log")
        ax.set_xlabel("round trip (ms, log scale)")
        ax.set_ylabel("fraction of jobs")
        ax.set_title(f"{f:.0%} of the ceiling rate ({rates.get(f'{f:g}', 0):.0f} jobs/s)")
        ax.axhline(0.5, color="#cccccc", linewidth=0.8, zorder=0)
        ax.axhline(0.99, color="#cccccc", linewidth=0.8, zorder=0)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def burst_timeline(
    t: list[float],
    replies: list[int],
    depth: list[int],
    rss: list[float],
    path: Path,
    *,
    title: str,
) -> Path:
    """Replies received and queue depth over time, with worker RSS on a second panel."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, replies, label="replies received", color="#d62728")
    top.plot(t, depth, label="work queue depth", color="#1f77b4")
    top.set_ylabel("jobs")
    top.grid(True, alpha=0.25)
    top.legend(loc="center right")
    bottom.plot(t, rss, color="#2ca02c")
    bottom.set_ylabel("worker RSS (MB, sum)")
    bottom.set_xlabel("seconds since the first publish")
    bottom.grid(True, alpha=0.25)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lag_timeline(
    t: list[float], lag_ms: list[float], in_flight: list[int], path: Path, *, title: str
) -> Path:
    """Event-loop lag and jobs in flight inside the worker over time."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, lag_ms, color="#d62728", linewidth=0.8, label="loop lag (ms)")
    ax.set_ylabel("event-loop lag (ms)")
    ax.set_xlabel("seconds")
    ax.grid(True, alpha=0.25)
    twin = ax.twinx()
    twin.plot(t, in_flight, color="#1f77b4", linewidth=1.2, label="jobs in flight")
    twin.set_ylabel("jobs in flight")
    fig.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def from_results(path: Path = RESULTS / "overhead.json") -> Path:
    """Redraw overhead_cdf.png from the CDF points saved in overhead.json."""
    data: dict[str, Any] = json.loads(path.read_text())
    fig_series: dict[str, dict[float, list[float]]] = {}
    for name, s in data["systems"].items():
        for f, point in s["open_loop"].items():
            # Expand the saved (value, quantile) points back into samples.
            pts = point["cdf_ms"]
            samples: list[float] = []
            previous = 0.0
            for value, q in pts:
                samples += [value] * max(1, round((q - previous) * 1000))
                previous = q
            fig_series.setdefault(name, {})[float(f)] = samples
    return latency_cdfs(
        fig_series,
        RESULTS / "overhead_cdf.png",
        rates=data["rates_per_s"],
        title="Round-trip latency, ceiling vs llmq (zero-latency endpoint)",
    )


if __name__ == "__main__":
    print(from_results(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "overhead.json"))
