"""The streaming peers benchmark's verdict and side-by-side table (pure, from
the result dict that bench/stream_peers.py saves).

Issue 15 item 6: llmq's gateway must beat LiteLLM Proxy on every figure. A
latency or CPU figure is beaten when it is lower; the success rate and the
highest rate sustained when they are not lower (100 % and the top of the
ladder cannot be exceeded, so a tie there is not a loss).
"""

from __future__ import annotations

from typing import Any

HIGHER_IS_BETTER = ("success", "max_sustained")


def figures(system: dict[str, Any]) -> dict[str, float | None]:
    """The compared figures of one system: added latency over direct (ms),
    success, CPU ms per request (all its processes), highest rate sustained
    (0 when not even the ladder's first step was)."""
    out: dict[str, float | None] = {}
    for key, row in system["phases"].items():
        added = system.get("added", {}).get(key, {})
        out[f"{key} success"] = row["success"]
        for metric in ("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms"):
            if metric in row:
                out[f"{key} {metric.removesuffix('_ms')} added"] = added.get(metric)
        out[f"{key} cpu_ms_per_request"] = row.get("cpu_ms_per_request")
    for mode, rate in system["max_sustained_per_s"].items():
        out[f"{mode} max_sustained"] = rate if rate is not None else 0.0
    return out


def versus(result: dict[str, Any], ours: str, peer: str) -> list[dict[str, Any]]:
    """Each figure of ``ours`` against ``peer``: both values and whether ours wins."""
    systems = result["systems"]
    if ours not in systems or peer not in systems:
        return []
    mine, theirs = figures(systems[ours]), figures(systems[peer])
    rows = []
    for figure, value in mine.items():
        other = theirs.get(figure)
        met: bool | None = None
        if value is not None and other is not None:
            higher = any(h in figure for h in HIGHER_IS_BETTER)
            met = value >= other if higher else value < other
        rows.append({"figure": figure, ours: value, peer: other, "met": met})
    return rows


def print_table(result: dict[str, Any]) -> None:
    """Figures down, systems across; ``direct`` in absolute terms, the others
    as added over it."""
    systems = result["systems"]
    names = list(systems)
    width = max(17, *(len(n) + 2 for n in names))
    print(f"\n{'figure':<34}" + "".join(f"{n:>{width}}" for n in names))

    def line(label: str, cell: Any) -> None:
        print(f"{label:<34}" + "".join(f"{cell(n, systems[n]):>{width}}" for n in names))

    keys = list(next(iter(systems.values()))["phases"])
    for key in keys:
        line(f"{key} ok", lambda n, s, k=key: f"{s['phases'][k]['success']:.2%}")
        for metric in ("ttft", "total"):
            if f"{metric}_p50_ms" in systems[names[0]]["phases"][key]:
                line(f"{key} {metric} p50/p99 (+ms)", lambda n, s, k=key, m=metric: _pair(n, s, k, m))  # fmt: skip
        line(f"{key} cpu ms/req", lambda n, s, k=key: _cpu(s["phases"][k]))
        line(f"{key}   gateway + worker", lambda n, s, k=key: _by_process(s["phases"][k]))
    floor = result["plan"]["ladder"][0]
    for mode in ("plain", "stream"):
        line(f"max sustained {mode} (>=99% ok)", lambda n, s, m=mode: _rate(s, m, floor))
    print("cpu ms/req: every process of the system (llmq: gateway + worker; not the broker)")
    peers = {n: s.get("external_peers") for n, s in systems.items() if s.get("external_peers")}
    print("non-loopback peers:", peers or "none")
    for name, rows in result.get("versus", {}).items():
        lost = [r["figure"] for r in rows if r["met"] is False]
        won = sum(r["met"] is True for r in rows)
        open_ = len(rows) - won - len(lost)
        print(f"{name}: {won}/{len(rows)} figures met"
              + (f"; not: {', '.join(lost)}" if lost else "")
              + (f"; {open_} without a figure on one side (no request succeeded)" if open_ else ""))  # fmt: skip


def _pair(name: str, system: dict[str, Any], key: str, metric: str) -> str:
    row = system["phases"][key] if name == "direct" else system.get("added", {}).get(key, {})
    p50, p99 = row.get(f"{metric}_p50_ms"), row.get(f"{metric}_p99_ms")
    if p50 is None or p99 is None:
        return "-"
    sign = "" if name == "direct" else "+"
    return f"{sign}{p50:.1f}/{sign}{p99:.1f}".replace("+-", "-")


def _by_process(row: dict[str, Any]) -> str:
    parts = row.get("cpu_ms_per_request_by_process", {})
    if len(parts) < 2:
        return ""
    return "+".join(f"{value:.2f}" for value in parts.values())


def _cpu(row: dict[str, Any]) -> str:
    value = row.get("cpu_ms_per_request")
    return "-" if value is None else f"{value:.2f}"


def _rate(system: dict[str, Any], mode: str, floor: float) -> str:
    rate = system["max_sustained_per_s"].get(mode)
    return f"{rate:g}/s" if rate is not None else f"<{floor:g}/s"
