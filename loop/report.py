"""The cycle report: JSON for machines, markdown with plots for people, under $LOOP_HOME/reports.

An abandoned cycle (loop/cycle.py's failure policy) gets a section saying which rule gave it up,
at which stage, and every failed or interrupted attempt; the JSON carries the same under
``abandoned``, ``failures`` and ``failure_log``.

Plots: the variants' training-loss curves (where people would rather look than read) and the
held-out / regression loss of every registered version (the lineage at a glance).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loop.core import paths


def _variants_chart(trained: dict[str, Any], out: Path) -> Path | None:
    """The variants' loss curves, drawn by the trainer beside the runs; copied next to the report."""
    src = Path(trained.get("variants_dir") or "") / "variants.png"
    if not trained.get("variants_dir") or not src.is_file():
        return None
    shutil.copyfile(src, out)
    return out


def _plot_versions(registry, out: Path) -> Path | None:
    versions = registry.list()
    rows = [(v.id, v.metrics.get("heldout_loss", v.metrics.get("eval_loss")), v.metrics.get("regression_loss")) for v in versions]
    if not any(r[1] is not None or r[2] is not None for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ids = [r[0] for r in rows]
    for idx, label in ((1, "held-out loss"), (2, "regression loss")):
        pts = [(i, r[idx]) for i, r in enumerate(rows) if r[idx] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xticks(range(len(ids)), ids)
    current = registry.current_id()
    if current in ids:
        ax.axvline(ids.index(current), color="grey", linestyle=":", label=f"current ({current})")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("versions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def variants_table(variants: list[dict[str, Any]]) -> list[str]:
    """The variants side by side, whatever their objective: the numbers the gate and the best-variant choice
    read (held-out loss, regression loss against the start, general answers kept), the preference measure
    (trainer/preference_measure.py: held-out pairs the chosen answer wins, and the chosen-minus-rejected
    log-probability margin) and why a variant was skipped, failed or fell back to its SFT stage."""
    lines = ["| variant | objective | status | held-out loss (start) | regression loss vs start | general kept "
             "| pairs won (margin) | tokens/s | wall s | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in variants:
        held = _fmt(v.get("eval_loss")) + (f" ({_fmt(v.get('eval_loss_start'))})" if v.get("eval_loss_start") else "")
        reg, start = v.get("regression_loss"), v.get("regression_loss_start")
        change = f"{(reg - start) / start:+.1%}" if isinstance(reg, float) and isinstance(start, float) and start else "—"
        kept = v.get("general_kept")
        pref = v.get("preference") or {}
        won = (f"{pref['win_rate']:.0%} ({pref.get('margin', 0.0):+.2f})"
               if isinstance(pref.get("win_rate"), float) else "—")
        note = (v.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {v.get('name')} | {v.get('objective', 'sft')} | {v.get('status')} | {held} | {change} "
                     f"| {'—' if kept is None else f'{kept:.0%}'} | {won} | {_fmt(v.get('tokens_per_s'))} "
                     f"| {_fmt(v.get('wall_s'))} | {note} |")
    return lines


def write_report(cycle, state) -> dict[str, Any]:
    reports = paths.reports_dir(cycle.home)
    reports.mkdir(parents=True, exist_ok=True)
    stem = reports / state.id
    data = {k: v for k, v in state.data.items()}
    data["current_version"] = cycle.registry.current_id()
    timings = {name: s.get("seconds") for name, s in state.data["stages"].items()}
    train_s = timings.get("train") or 0.0
    total = sum(t for t in timings.values() if t)
    data["timings"] = {"stages_s": timings, "total_s": round(total, 3),
                       "overhead_share": round((total - train_s) / total, 4) if total else None}
    trained = state.result("train")
    variants = trained.get("variants", [])
    loss_png = _variants_chart(trained, stem.with_suffix(".variants.png"))
    versions_png = _plot_versions(cycle.registry, stem.with_suffix(".versions.png"))
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=2, default=str))

    lines = [f"# Cycle {state.id}", "", f"**Outcome:** {state.data.get('outcome')}"]
    if state.data.get("reason"):
        lines.append(f"  \n**Why:** {state.data['reason']}")
    lines += ["", f"Current version after the cycle: **{data['current_version']}**", "", "## Stages", "",
              "| stage | status | seconds | note |", "|---|---|---:|---|"]
    failures = state.data.get("failures") or {}
    for name, s in state.data["stages"].items():
        if name == "report":
            continue
        note = s.get("reason") or s.get("error") or ""
        if failures.get(name):
            note = f"{note} (failed or interrupted {failures[name]}×)".strip()
        lines.append(f"| {name} | {s.get('status')} | {_fmt(s.get('seconds'))} | {note} |")
    abandoned = state.data.get("abandoned")
    if abandoned:
        lines += ["", "## Abandoned (failure policy)", "",
                  f"Given up at stage **{abandoned.get('stage')}**: {abandoned.get('reason')}", "",
                  f"The policy: a cycle is abandoned once one stage has failed or been interrupted "
                  f"`cycle.max_stage_attempts` = {abandoned.get('max_stage_attempts')} times, or when the current "
                  "version changed under it before it promoted. The next run starts a new cycle."]
        log = state.data.get("failure_log") or []
        if log:
            lines += ["", "| stage | when | what happened |", "|---|---|---|"]
            lines += [f"| {f.get('stage')} | {f.get('at')} | {str(f.get('why')).replace('|', '/')[:300]} |" for f in log]
    promoted = state.result("promote")
    if promoted.get("moved_away"):
        m = promoted["moved_away"]
        lines += ["", f"{promoted.get('version')} was promoted, then {m.get('action')} to {m.get('to')} "
                  f"at {m.get('at')} ({m.get('reason')}); it was not promoted again."]
    published = state.result("publish")
    if published.get("skipped"):
        lines += ["", f"Not published: {published['skipped']}"]
    if data["timings"]["overhead_share"] is not None:
        lines.append(f"\nEverything but training took {100 * data['timings']['overhead_share']:.1f}% of the cycle.")
    push = state.result("push")
    if push:
        lines += ["", "## Push", "", "```json", json.dumps(push, indent=1, default=str), "```"]
    pulled = state.result("pull")
    if pulled:
        lines += ["", "## Snapshot", "", f"hash `{pulled.get('hash')}`", "", "```json",
                  json.dumps(pulled.get("counts"), indent=1), "```"]
    if variants:
        lines += ["", "## Variants", ""] + variants_table(variants)
        if loss_png:
            lines += ["", f"![loss curves]({loss_png.name})"]
    gate = state.result("gate") or state.stage("gate").get("result")
    if gate:
        lines += ["", "## Gate", "", "```json", json.dumps(gate.get("decision"), indent=1, default=str), "```"]
    exported = state.result("export") or state.stage("export").get("result")
    if exported and exported.get("verification"):
        ver = exported["verification"]
        lines += ["", "## Verification of the GGUF", "", f"passed: **{ver.get('passed')}**",
                  "", "; ".join(ver.get("reasons") or [])]
    if versions_png:
        lines += ["", "## Versions", "", f"![versions]({versions_png.name})"]
    md_path = stem.with_suffix(".md")
    md_path.write_text("\n".join(lines) + "\n")
    return {"json": str(json_path), "markdown": str(md_path),
            "plots": [str(p) for p in (loss_png, versions_png) if p]}
