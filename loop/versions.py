"""``python -m loop.versions``: look at, compare, roll back, pin and prune model versions.

    list                 every version: marks, lineage, quantisation, size, losses, verification
    show ID              one version in full
    compare A B          both GGUFs answer the probe set greedily, side by side; the fixed measures side by
                         side (--measure takes missing ones first); held-out loss only as each one's gate saw it
    measure ID...|--all  take the fixed measures a version misses, from its GGUF, and cache them
    rollback [--to ID]   point `current` at the previous version (or at ID): one atomic step
    pin ID / unpin ID    pinned versions are never pruned
    prune                apply the retention rule (registry.keep_versions)
    history              every promotion and rollback: when, what, why
    lineage ID           parent chain, snapshot, the reviewed records that trained it, the held-out ids
    canary               the live canary: share, since, deadline, thumbs-down rates with 95% intervals, verdict

Tables are for people; ``--json`` prints the same data for machines.

Every id argument must be a version id (``v1``, ``v2``, ...; ``loop.core.registry.VERSION_ID``): a path
such as ``v2/`` or ``./v2`` is refused. Registry errors, a damaged ``current.json`` or
``version.json`` included, end the command with ``error: ...`` and exit status 1, never a
traceback; ``list`` still lists what it can read and names what it cannot on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from loop.config import LoopConfig, load_config
from loop.core import paths
from loop.core.errors import LoopError, error_exit
from loop.core.metrics import HELDOUT_KEYS, heldout_loss, regression_loss
from loop.core.registry import Registry, RegistryCorruptError, Version


def human_size(n: int | None) -> str:
    if not n:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain aligned text table; ``columns`` is (key, header) pairs."""
    cells = [[fmt(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def verification_label(version: Version) -> str:
    ver = version.verification or {}
    if "passed" not in ver:
        return "-"
    return "passed" if ver["passed"] else "FAILED"


def marks(version: Version, pointer: dict[str, Any] | None, canary: str | None = None) -> list[str]:
    pointer = pointer or {}
    out = []
    if version.id == pointer.get("version"):
        out.append("current")
    if canary and version.id == canary:
        out.append("canary")
    if version.id == pointer.get("previous"):
        out.append("previous")
    if version.pinned:
        out.append("pinned")
    if version.tainted:
        out.append("tainted")
    return out


def list_rows(registry: Registry) -> list[dict[str, Any]]:
    """One dict per version, newest last: what `list` shows (and `--json` prints)."""
    try:
        pointer = registry.pointer()
    except RegistryCorruptError:  # list what is there: it is what a repair needs (`problems` names the damage)
        pointer = None
    try:
        canary = registry.canary_id()
    except RegistryCorruptError:
        canary = None
    rows = []
    for v in registry.list():
        rows.append({
            "id": v.id,
            "marks": marks(v, pointer, canary),
            "created_at": v.created_at,
            "parent": v.parent,
            "base_model": v.base_model,
            "quantization": v.quantization,
            "size_bytes": v.size_bytes,
            "heldout_loss": heldout_loss(v.metrics),
            "regression_loss": regression_loss(v.metrics),
            "verification": verification_label(v),
            "note": v.note,
        })
    return rows


def list_table(rows: list[dict[str, Any]]) -> str:
    symbols = {"current": "*", "canary": "C", "previous": "<", "pinned": "P", "tainted": "T"}
    view = [dict(r, mark="".join(symbols[m] for m in r["marks"]), size=human_size(r["size_bytes"]),
                 created=r["created_at"].replace("T", " ")[:19]) for r in rows]
    table = format_table(view, [("mark", ""), ("id", "ID"), ("created", "CREATED (UTC)"), ("parent", "PARENT"),
                                ("quantization", "QUANT"), ("size", "SIZE"), ("heldout_loss", "HELD-OUT"),
                                ("regression_loss", "REGRESSION"), ("verification", "VERIFIED")])
    return table + ("\n\n* current   C canary (serves a share of new conversations)   < previous   P pinned   "
                    "T tainted (trained on forgotten text)")


def show_text(version: Version, pointer: dict[str, Any] | None) -> str:
    data = version.to_json()
    lines = [f"{version.id}  {' '.join(marks(version, pointer))}".rstrip(), ""]
    for key in ("created_at", "parent", "base_model", "quantization", "size_bytes", "gguf_sha256",
                "snapshot_hash", "hf_dir", "pinned", "note"):
        value = human_size(data[key]) + f" ({data[key]} bytes)" if key == "size_bytes" else data[key]
        lines.append(f"{key:<14} {fmt(value)}")
    lines.append(f"{'path':<14} {version.gguf_path}")
    for entry in version.tainted:
        lines.append(f"{'tainted':<14} {entry.get('at')}: {entry.get('reason')}")
    for section in ("variant", "snapshot_counts", "metrics", "verification"):
        block = data.get(section) or {}
        if section == "metrics" and "measures" in block:  # the fixed measures' cache gets a block of its own
            from loop.version_measures import measures_lines

            lines += measures_lines(version)
            block = {k: v for k, v in block.items() if k != "measures"}
        lines.append(f"{section}:" + ("" if block else " -"))
        for key, value in block.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else fmt(value)
            lines.append(f"  {key:<22} {text}")
    return "\n".join(lines)


# -- compare ---------------------------------------------------------------------------------------


def numeric_metrics(version: Version) -> dict[str, float]:
    """The version's numeric registry metrics, without its held-out loss: each cycle scores on its own
    held-out set, so held-out figures are compared only inside their gate (``gate_comparison``)."""
    return {k: float(v) for k, v in (version.metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in HELDOUT_KEYS}


def compare_versions(
    registry: Registry,
    a: str,
    b: str,
    *,
    probes: list[list[dict[str, str]]] | None = None,
    probes_origin: str = "",
    max_tokens: int = 64,
    n_ctx: int = 2048,
    n_threads: int | None = None,
) -> dict[str, Any]:
    """Run both versions' GGUFs on the probe set; answers side by side and metric deltas (B - A)."""
    from app import probe_runner

    va, vb = registry.get(a), registry.get(b)
    if probes is None:
        probes, probes_origin = probe_runner.load_probes()
    runs = {}
    for v in (va, vb):
        runs[v.id] = probe_runner.run_probes(v.gguf_path, probes, max_tokens=max_tokens, n_ctx=n_ctx,
                                             n_threads=n_threads)
    ra, rb = runs[va.id], runs[vb.id]
    ma, mb = numeric_metrics(va), numeric_metrics(vb)
    ma["probe_mean_logprob"], mb["probe_mean_logprob"] = ra.mean_logprob, rb.mean_logprob
    ma["tokens_per_second"], mb["tokens_per_second"] = ra.tokens_per_second, rb.tokens_per_second
    ma["size_mb"], mb["size_mb"] = va.size_bytes / 2**20, vb.size_bytes / 2**20
    deltas = {}
    for key in sorted(set(ma) | set(mb)):
        x, y = ma.get(key), mb.get(key)
        deltas[key] = {"a": x, "b": y, "delta": (y - x) if x is not None and y is not None else None}
    answers = []
    same = 0
    for pa, pb in zip(ra.answers, rb.answers):
        same += pa.answer == pb.answer
        answers.append({"prompt": pa.prompt, "a": pa.answer, "b": pb.answer,
                        "a_mean_logprob": pa.mean_logprob, "b_mean_logprob": pb.mean_logprob,
                        "a_tokens": pa.n_tokens, "b_tokens": pb.n_tokens})
    return {
        "a": va.id, "b": vb.id, "probes": probes_origin, "n_probes": len(answers), "max_tokens": max_tokens,
        "identical_answers": same, "metrics": deltas, "answers": answers,
        "runs": {va.id: ra.to_dict(), vb.id: rb.to_dict()},
    }


def compare_text(result: dict[str, Any], width: int | None = None) -> str:
    width = width or max(60, min(160, shutil.get_terminal_size((120, 20)).columns))
    col = (width - 7) // 2
    a, b = result["a"], result["b"]
    out = [f"{a} vs {b} on {result['n_probes']} probes ({result['probes']}), greedy, up to "
           f"{result['max_tokens']} tokens; identical answers: {result['identical_answers']}/{result['n_probes']}", ""]
    for i, row in enumerate(result["answers"], 1):
        out.append(f"[{i}] {row['prompt']}")
        left = textwrap.wrap(row["a"] or "(empty)", col) + [f"logprob {fmt(row['a_mean_logprob'], 3)}, {row['a_tokens']} tok"]
        right = textwrap.wrap(row["b"] or "(empty)", col) + [f"logprob {fmt(row['b_mean_logprob'], 3)}, {row['b_tokens']} tok"]
        out.append(f"    {a:<{col}} | {b}")
        for j in range(max(len(left), len(right))):
            line_a = left[j] if j < len(left) else ""
            line_b = right[j] if j < len(right) else ""
            out.append(f"    {line_a:<{col}} | {line_b}".rstrip())
        out.append("")
    if result.get("fixed"):
        out += [fixed_text(result), "", "recorded at registration, and this run's probes:"]
    rows = [{"metric": k, "a": v["a"], "b": v["b"], "delta": v["delta"]} for k, v in result["metrics"].items()]
    out.append(format_table(rows, [("metric", "METRIC"), ("a", a), ("b", b), ("delta", f"DELTA ({b} - {a})")]))
    out.append("(losses: lower is better; logprob and tokens/s: higher is better)")
    return "\n".join(out)


def fixed_text(result: dict[str, Any]) -> str:
    """The fixed block of ``versions compare`` for people."""
    from loop.core.measures import LABELS, format_value

    a, b = result["a"], result["b"]
    rows = [{"measure": LABELS[name], "a": format_value(name, v["a"]), "b": format_value(name, v["b"]),
             "delta": format_value(name, v["delta"], sign=True)} for name, v in result["fixed"].items()]
    sets = result["fixed_sets"]
    out = [f"fixed measures, the same sets for every version ({sets['regression']['set']} "
           f"{sets['regression']['hash'][:12]}, {sets['probes']['set']} {sets['probes']['hash'][:12]}: "
           f"{sets['probes']['checked']} checked probes):",
           format_table(rows, [("measure", "MEASURE"), ("a", a), ("b", b), ("delta", f"DELTA ({b} - {a})")]),
           "(regression loss, thumbs-down rate: lower is better; the rest: higher is better)"]
    gaps = {vid: names for vid, names in result.get("fixed_missing", {}).items() if names}
    if gaps:
        out.append("not measured: " + "; ".join(f"{vid}: {', '.join(LABELS[n] for n in names)}"
                                                 for vid, names in gaps.items())
                   + f" (python -m loop.versions measure {' '.join(gaps)})")
    out.append("held-out loss, each on its own cycle's held-out set (compared only at that gate):")
    out += [f"  {vid}: {text or '- (no gate: not made by a cycle)'}" for vid, text in result["gate"].items()]
    return "\n".join(out)


def canary_text(data: dict[str, Any]) -> str:
    """``versions canary`` for people: what runs, the two arms' rates with intervals, the verdict."""
    if data.get("canary") is None:
        last = data.get("last")
        if not last:
            return "no canary is running ([rollout] canary_share = 0 promotes at once)"
        return (f"no canary is running; the last one, {last.get('version')}, was {last.get('action')} at "
                f"{last.get('at')}: {last.get('reason')}")
    verdict = data["verdict"]
    lines = [f"canary {data['canary']} beside current {data['current']}: {data['share']:.0%} of new conversations "
             f"since {data['since']}, deadline {data['deadline']}", ""]
    rows = []
    for arm in ("canary", "current"):
        a = verdict[arm]
        lo, hi = a["interval"]
        rows.append({"arm": arm, "version": a["version"], "rated": a["rated"], "down": a["down"],
                     "rate": f"{a['rate']:.3f}" if a["rate"] is not None else "-", "ci": f"[{lo:.3f}, {hi:.3f}]"})
    lines.append(format_table(rows, [("arm", "ARM"), ("version", "VERSION"), ("rated", "RATED"), ("down", "DOWN"),
                                     ("rate", "THUMBS-DOWN RATE"), ("ci", "95% INTERVAL")]))
    lines += ["", f"P(canary worse) = {fmt(verdict['p_worse'], 3)}   "
                  f"P(canary no worse than current + {data['margin']}) = {fmt(verdict['p_ok'], 3)}",
              f"verdict now: {verdict['decision']} ({verdict['reason']})",
              f"(decides after {data['min_rated_turns']} rated turns per arm; the cycle acts on it: docs/rollout.md)"]
    return "\n".join(lines)


def history_table(entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        decision = e.get("decision") or {}
        rows.append({"at": str(e.get("at", "")).replace("T", " ")[:19], "action": e.get("action"),
                     "change": f"{e.get('from') or '-'} -> {e.get('to')}", "reason": e.get("reason"),
                     "gate": ("promote" if decision.get("promote") else "refused") if "promote" in decision else "-"})
    return format_table(rows, [("at", "WHEN (UTC)"), ("action", "ACTION"), ("change", "CHANGE"), ("gate", "GATE"),
                               ("reason", "REASON")])


def measure_command(registry: Registry, config: LoopConfig, ids: list[str], *, every: bool = False, force: bool = False,
                    progress: bool = True, as_json: bool = False) -> int:
    """``versions measure``: 0 when every version named has all its fixed measures, else 1."""
    from loop.core.measures import LABELS, format_value
    from loop.version_measures import measure_versions

    if every:  # a version whose verification failed never served anyone (and its file may not load)
        ids = [v.id for v in registry.list() if (v.verification or {}).get("passed", True)]
    elif not ids:
        print("error: name the versions to measure, or --all", file=sys.stderr)
        return 2
    for vid in ids:
        registry.get(vid)  # every id checked before anything is measured (a RegistryError exits 1)
    reports = measure_versions(registry, ids, config, force=force, progress=progress)
    if as_json:
        print(json.dumps(reports, indent=2, default=str))
        return 1 if any("error" in r for r in reports) else 0
    for r in reports:
        if "error" in r:
            print(f"{r['version']}: not measured: {r['error']}")
            continue
        how = ([f"measured {', '.join(r['measured'])}"] if r["measured"] else []) + (
            [f"copied from {', '.join(sorted(set(r['copied'].values())))}"] if r["copied"] else []) + (
            [f"cached {', '.join(r['cached'])}"] if r["cached"] else [])
        print(f"{r['version']}: " + ", ".join(f"{LABELS[n]} {format_value(n, v)}" for n, v in r["values"].items())
              + f"  ({'; '.join(how)})")
    return 1 if any("error" in r for r in reports) else 0


# -- the command -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loop.versions",
                                     description="Look at, compare, roll back, pin and prune model versions.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:14]))
    parser.add_argument("--config", help="TOML file (default: $LOOP_CONFIG or $LOOP_HOME/config.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="every version")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", help="one version in full")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("compare", help="run two versions on the probe set")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--probes", help="JSON lines with 'prompt' or 'messages' (default: loop/core/probes.jsonl)")
    p.add_argument("--limit", type=int, help="use only the first N probes")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--measure", action="store_true", help="take the fixed measures A and B miss first")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("measure", help="take the fixed measures versions miss (regression set, probes) and cache them")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="every version whose verification did not fail")
    p.add_argument("--force", action="store_true", help="measure again even what is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("rollback", help="make the previous version (or --to ID) current")
    p.add_argument("--to", help="version to roll back to (default: the previous one)")
    p.add_argument("--reason", default="manual rollback")
    p.add_argument("--json", action="store_true")
    for name in ("pin", "unpin"):
        p = sub.add_parser(name, help="never prune this version" if name == "pin" else "let retention prune it again")
        p.add_argument("id")
    p = sub.add_parser("prune", help="remove old versions (registry.keep_versions)")
    p.add_argument("--keep", type=int, help="override registry.keep_versions")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("history", help="promotions and rollbacks")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("lineage", help="the parent chain and the reviewed records that trained a version")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("canary", help="the live canary: thumbs-down rates with intervals, and the verdict")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    emit = lambda data: print(json.dumps(data, indent=2, default=str))  # noqa: E731
    try:
        config = load_config(args.config)
        registry = Registry(paths.registry_dir(config.home))
        if args.command == "list":
            try:
                registry.pointer()
            except RegistryCorruptError as exc:
                print(f"warning: {exc}", file=sys.stderr)
            rows = list_rows(registry)  # damaged version.json files are named on stderr by Registry.list()
            if args.json:
                emit(rows)
            else:
                print(list_table(rows) if rows else "no versions yet (the app or `python -m loop.bootstrap` registers v1)")
        elif args.command == "show":
            version = registry.get(args.id)
            if args.json:
                emit(dict(version.to_json(), path=version.path,
                          marks=marks(version, registry.pointer(), registry.canary_id())))
            else:
                print(show_text(version, registry.pointer()))
        elif args.command == "compare":
            from app import probe_runner

            probes, origin = probe_runner.load_probes(args.probes, limit=args.limit)
            result = compare_versions(registry, args.a, args.b, probes=probes, probes_origin=origin,
                                      max_tokens=args.max_tokens, n_ctx=config.model.n_ctx,
                                      n_threads=config.model.n_threads or None)
            from loop.core.store import Store
            from loop.version_measures import fixed_comparison

            result.update(fixed_comparison(registry, args.a, args.b, config, store=Store.open(config.home),
                                           measure=args.measure))
            if args.json:
                emit(result)
            else:
                print(compare_text(result))
        elif args.command == "measure":
            return measure_command(registry, config, args.ids, every=args.all, force=args.force,
                                   progress=not args.quiet, as_json=args.json)
        elif args.command == "rollback":
            entry = registry.rollback(args.to, reason=args.reason)
            if args.json:
                emit(entry)
            else:
                print(f"rolled back: {entry['from']} -> {entry['to']} is current ({entry['reason']})")
        elif args.command in ("pin", "unpin"):
            version = registry.pin(args.id, args.command == "pin")
            print(f"{version.id} {'pinned' if version.pinned else 'unpinned'}")
        elif args.command == "prune":
            keep = config.registry.keep_versions if args.keep is None else args.keep
            removed = registry.prune(keep, dry_run=args.dry_run)
            if args.json:
                emit({"removed": removed, "dry_run": args.dry_run, "keep": keep})
            else:
                verb = "would remove" if args.dry_run else "removed"
                print(f"{verb}: {', '.join(removed)}" if removed else "nothing to prune")
        elif args.command == "lineage":
            from loop.lineage import lineage, lineage_text

            data = lineage(registry, args.id, home=config.home)
            if args.json:
                emit(data)
            else:
                print(lineage_text(data))
        elif args.command == "canary":
            from loop.core.canary import status
            from loop.core.store import Store

            data = status(registry, Store.open(config.home), config.rollout)
            data.pop("pointer", None)
            if args.json:
                emit(data)
            else:
                print(canary_text(data))
        elif args.command == "history":
            entries = registry.history()
            if args.json:
                emit(entries)
            else:
                print(history_table(entries) if entries else "no promotions yet")
    except LoopError as exc:  # a bad config (exit 2), an unknown or damaged version, a refused change
        return error_exit(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
