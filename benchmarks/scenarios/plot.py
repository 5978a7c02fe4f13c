"""One PNG of a scenario-suite run: what each run learned, what it kept, and where its cycle's time went.

Three panels share one column per run (scenario, seed, and the objective when runs compare objectives):
  1. probe pass rate of the served GGUF (bar) against the base GGUF (marker), with the learning issue's
     bars: 85% for the mean over unseen scenarios, 70% for every run;
  2. general answers kept: of the general probes the base answered right, the share the served model
     still answers right (95% is the bar for every run), the counts written on each bar;
  3. the cycle's seconds by stage (decide, train, export, the rest until the new version served, then what
     runs after serving: the fixed measures, publish, report), with 300 s marked.
A run that failed before it was measured keeps its column, marked "failed", so no run drops out of sight.

Contract: ``plot_suite(results, path)`` reads only the fields ``run.run_one`` writes and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECALL_MEAN_BAR = 0.85
RECALL_RUN_FLOOR = 0.70
KEPT_BAR = 0.95
CYCLE_BUDGET_S = 300.0
# Stacked in the order a cycle runs them; "before serving" is every other stage until promote ends.
TIME_PARTS = ("decide", "train", "export", "before serving", "after serving")
LEGEND = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.005, 1.0)}  # beside the bars, never on them


def time_parts(r: dict[str, Any]) -> dict[str, float]:
    """A run's cycle seconds split into ``TIME_PARTS`` (they add up to ``cycle_seconds``)."""
    stages = r.get("stage_seconds") or {}
    cycle = float(r.get("cycle_seconds") or 0.0)
    served = float(r["served_seconds"]) if r.get("served_seconds") is not None else cycle
    named = {name: float(stages.get(name) or 0.0) for name in TIME_PARTS[:3]}
    return {**named, "before serving": max(served - sum(named.values()), 0.0),
            "after serving": max(cycle - served, 0.0)}


def label(r: dict[str, Any], objectives: int) -> str:
    text = f"{r['scenario']}\ns{r['seed']}"
    return f"{text} {r.get('objective') or '-'}" if objectives > 1 else text


def mean_lines(results: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The pass-rate means the summary table reports, as (name, mean): one per split and objective (a failed
    run counts 0), never one across splits, because tuning and unseen scenarios are judged apart."""
    from benchmarks.scenarios.run import split_summary

    rows = split_summary(results)
    objectives = len({row["objective"] for row in rows})
    return [(row["split"] + (f" {row['objective'] or '-'}" if objectives > 1 else ""), row["pass_mean"])
            for row in rows]


def plot_suite(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    from trainer.plots import pyplot

    plt = pyplot()
    n = len(results)
    xs = list(range(n))
    objectives = len({r.get("objective") for r in results})
    fig, (ax_pass, ax_kept, ax_time) = plt.subplots(3, 1, figsize=(max(8.0, 0.62 * n + 3.5), 9.5), sharex=True)

    served = [r.get("probe_pass_served") or 0.0 for r in results]
    colors = ["C0" if r.get("promoted") else "C3" for r in results]
    ax_pass.bar(xs, served, color=colors, label="served GGUF (red: not promoted)")
    ax_pass.plot([x for x, r in zip(xs, results) if "probe_pass_base" in r],
                 [r["probe_pass_base"] for r in results if "probe_pass_base" in r],
                 "kx", markersize=7, label="base GGUF")
    ax_pass.axhline(RECALL_MEAN_BAR, color="C2", linestyle="--", linewidth=1, label="85%: mean over unseen")
    ax_pass.axhline(RECALL_RUN_FLOOR, color="C3", linestyle=":", linewidth=1, label="70%: every run")
    for i, (name, mean) in enumerate(mean_lines(results)):
        ax_pass.axhline(mean, color=f"C{4 + i}", linestyle="-.", linewidth=1, label=f"{name} mean: {100 * mean:.0f}%")
    ax_pass.set_ylim(0, 1.05)
    ax_pass.set_ylabel("probe pass rate")
    ax_pass.legend(**LEGEND)

    kept = [r["general_kept_rate"] if r.get("general_kept_rate") is not None else 0.0 for r in results]
    ax_kept.bar(xs, kept, color=["C0" if k >= KEPT_BAR else "C1" for k in kept], label="kept (orange: under 95%)")
    for x, r in zip(xs, results):
        if r.get("general_base_right") is not None:
            ax_kept.text(x, 0.03, f"{r['general_kept']}/{r['general_base_right']}", ha="center", fontsize=7,
                         color="white")
    ax_kept.axhline(KEPT_BAR, color="C3", linestyle=":", linewidth=1, label="95%: every run")
    ax_kept.set_ylim(0, 1.05)
    ax_kept.set_ylabel("general answers kept")
    ax_kept.legend(**LEGEND)

    bottom = [0.0] * n
    parts = [time_parts(r) if "cycle_seconds" in r else dict.fromkeys(TIME_PARTS, 0.0) for r in results]
    for index, name in enumerate(TIME_PARTS):
        heights = [p[name] for p in parts]
        ax_time.bar(xs, heights, bottom=bottom, color=f"C{index + 4}", label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_time.axhline(CYCLE_BUDGET_S, color="C3", linestyle=":", linewidth=1, label="300 s")
    ax_time.set_ylabel("cycle seconds")
    ax_time.legend(**LEGEND)

    for x, r in zip(xs, results):
        if "probe_pass_served" not in r:
            for ax in (ax_pass, ax_kept, ax_time):
                ax.text(x, 0.5, "failed", rotation=90, ha="center", va="center", color="C3",
                        transform=ax.get_xaxis_transform())
    ax_time.set_xticks(xs, [label(r, objectives) for r in results], rotation=90, fontsize=7)
    for ax in (ax_pass, ax_kept, ax_time):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "scenario suite", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
