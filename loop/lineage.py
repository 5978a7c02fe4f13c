"""Lineage: from a version back to the feedback that built it (``python -m loop.versions lineage vN``).

Everything is read from what the registry and the snapshots keep, never from the store, so a
lineage still answers after the store was pruned or a turn was forgotten:

- ``chain``: the version, its parent, the parent's parent ... down to the base (each with its
  snapshot hash and whether it is tainted);
- ``snapshot``: the hash in ``version.json`` and the snapshot directory it names
  (``$LOOP_HOME/snapshots/<hash>``), with the ids removed from it by ``forget``;
- ``training``: one row per example of the snapshot's training split (``train.jsonl``): the
  example id, the turn id and the Argilla record id it came from, the reviewers, whether the
  answer trained is a reviewer's correction or the model's own answer with its quality rating,
  and the objective. Where the snapshot has no ``provenance.jsonl`` (snapshots written before it
  existed), the turn id is the example id (a record's id is its turn's id) and the rest is None.
  ``in_training_mix`` says whether the cycle's actual mix (``cycles/<id>/train.jsonl``: new
  examples plus sampled replay) held it; None when that file is gone. With a preference
  objective (``variant.objective``: dpo, kto, sft+dpo, sft+kto) the pairs or labels it trained on
  are listed the same way under ``preference``;
- ``held_out``: the ids of the snapshot's held-out split (``eval.jsonl``), the examples that
  judged the version at the gate.

A version without a snapshot (the base, ``v1``) has empty lists; a snapshot directory that is gone
is reported as ``present: false`` with empty lists, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loop.core import paths
from loop.core.io import read_jsonl
from loop.core.registry import Registry, Version
from trainer.anchor import GENERAL_REPLAY_PREFIX

PROVENANCE_KEYS = ("record_id", "turn_id", "dataset", "reviewers", "reviewer_names", "corrected_by", "quality",
                   "source")
# Which snapshot files each objective trains on (trainer/config.py OBJECTIVES).
PREFERENCE_FILES = {"dpo": "pairs.jsonl", "kto": "labels.jsonl"}


def _objectives(version: Version) -> list[str]:
    return str((version.variant or {}).get("objective") or "sft").split("+")


def chain(registry: Registry, vid: str) -> list[dict[str, Any]]:
    """``vid`` and its ancestors, newest first; stops at a version the registry no longer has."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = vid
    while current and current not in seen:
        seen.add(current)
        try:
            v = registry.get(current)
        except Exception as exc:  # pruned or damaged: say so and stop, the ids above are still right
            out.append({"id": current, "missing": str(exc)})
            break
        out.append({"id": v.id, "parent": v.parent, "created_at": v.created_at, "snapshot_hash": v.snapshot_hash,
                    "objective": "+".join(_objectives(v)) if v.snapshot_hash else None, "tainted": bool(v.tainted)})
        current = v.parent
    return out


def lineage(registry: Registry, vid: str, home: Path | None = None) -> dict[str, Any]:
    """What trained ``vid`` and what judged it (the module docstring lists the keys)."""
    version = registry.get(vid)
    home = Path(home) if home else paths.loop_home()
    objectives = _objectives(version)
    out: dict[str, Any] = {
        "version": version.id,
        "tainted": version.tainted,
        "chain": chain(registry, version.id),
        "objective": "+".join(objectives) if version.snapshot_hash else None,
        "snapshot": None,
        "cycle": None,
        "training": [],
        "preference": [],
        "held_out": [],
    }
    if not version.snapshot_hash:
        return out
    snap_dir = paths.snapshots_dir(home) / version.snapshot_hash
    manifest_path = snap_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    out["snapshot"] = {"hash": version.snapshot_hash, "path": str(snap_dir), "present": manifest_path.is_file(),
                       "created_at": manifest.get("created_at"), "forgotten": manifest.get("forgotten") or []}
    cycle_id = (version.variant or {}).get("cycle")
    mix: set[str] | None = None
    if cycle_id:
        mix_file = home / "cycles" / str(cycle_id) / "train.jsonl"
        rows = read_jsonl(mix_file) if mix_file.is_file() else None
        mix = {str(r.get("id")) for r in rows} if rows is not None else None
        replayed = sum(1 for i in mix if i.startswith(GENERAL_REPLAY_PREFIX)) if mix is not None else None
        out["cycle"] = {"id": cycle_id, "train_file": str(mix_file), "present": rows is not None,
                        "examples": len(rows) if rows is not None else None,
                        "general_replay": replayed}
    if not out["snapshot"]["present"]:
        return out
    provenance = {row["id"]: row for row in read_jsonl(snap_dir / "provenance.jsonl", missing_ok=True)}

    def row(example_id: str, objective: str) -> dict[str, Any]:
        prov = provenance.get(example_id) or {}
        entry = {"id": example_id, **{k: prov.get(k) for k in PROVENANCE_KEYS}, "objective": objective}
        entry["turn_id"] = entry["turn_id"] or example_id  # a record's id is its turn's id (annotation.schema)
        entry["in_training_mix"] = (example_id in mix) if mix is not None else None
        return entry

    if "sft" in objectives:
        out["training"] = [row(e["id"], "sft") for e in read_jsonl(snap_dir / "train.jsonl", missing_ok=True)]
    for objective, name in PREFERENCE_FILES.items():
        if objective in objectives:
            out["preference"] += [row(e["id"], objective) for e in read_jsonl(snap_dir / name, missing_ok=True)]
    out["held_out"] = [e["id"] for e in read_jsonl(snap_dir / "eval.jsonl", missing_ok=True)]
    return out


def lineage_text(data: dict[str, Any]) -> str:
    """The lineage for people: the chain, then one line per training example, then the held-out ids."""
    lines = [f"{data['version']}" + ("  TAINTED" if data["tainted"] else "")]
    for t in data["tainted"]:
        lines.append(f"  tainted {t.get('at')}: {t.get('reason')}")
    lines.append("chain: " + " <- ".join(c["id"] + ("*" if c.get("tainted") else "") for c in data["chain"])
                 + ("   (* tainted)" if any(c.get("tainted") for c in data["chain"]) else ""))
    snap = data["snapshot"]
    if snap is None:
        lines.append("snapshot: none (a base model as shipped: no feedback trained it)")
        return "\n".join(lines)
    lines.append(f"snapshot: {snap['hash']}" + ("" if snap["present"] else "  (directory gone: ids unknown)"))
    if snap["forgotten"]:
        lines.append(f"  forgotten since: {sum(len(f.get('ids', [])) for f in snap['forgotten'])} example(s)")
    if data["cycle"]:
        c = data["cycle"]
        lines.append(f"cycle: {c['id']}" + (f" ({c['examples']} examples trained, {c['general_replay']} general replay)"
                                            if c["present"] else " (its training file is gone)"))
    lines.append(f"objective: {data['objective']}")
    lines.append(f"trained on {len(data['training'])} example(s):")
    lines.append(f"  {'EXAMPLE/TURN ID':<28} {'ARGILLA RECORD':<38} {'SOURCE':<10} {'Q':<2} {'MIX':<4} REVIEWERS")
    for r in data["training"] + data["preference"]:
        who = ", ".join(n or i for n, i in zip(r.get("reviewer_names") or [None] * len(r.get("reviewers") or []),
                                                r.get("reviewers") or [])) or "-"
        mix = {True: "yes", False: "no", None: "-"}[r["in_training_mix"]]
        lines.append(f"  {r['turn_id']:<28} {r.get('record_id') or '-':<38} {r.get('source') or '-':<10} "
                     f"{r.get('quality') if r.get('quality') is not None else '-'!s:<2} {mix:<4} {who}"
                     + (f"  [{r['objective']}]" if r["objective"] != "sft" else ""))
    lines.append(f"judged by {len(data['held_out'])} held-out example(s): {', '.join(data['held_out']) or '-'}")
    return "\n".join(lines)
