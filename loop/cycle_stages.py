"""The stages of one cycle (see loop/cycle.py for the order and the resume contract).

Each function is a method of ``loop.cycle.Cycle``: it takes the persisted ``CycleState`` and
returns a JSON-able result that later stages (and a resumed run) read back. A stage that
decides the cycle should end raises ``StopCycle`` with the reason the report will show.
Heavy imports (torch, argilla) happen inside the stages so that ``loop.cycle`` imports fast.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from loop import paths
from loop.cycle_state import CycleState, StopCycle


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path or not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


# -- push / pull -----------------------------------------------------------------------------------

def stage_push(self, state: CycleState, force: bool) -> dict[str, Any]:
    from annotation.push import push

    report = push(self.config, store=self.store, progress=self.progress)
    return report.as_dict()


def stage_pull(self, state: CycleState, force: bool) -> dict[str, Any]:
    from annotation.pull import pull_snapshot

    snap = pull_snapshot(self.config, progress=self.progress)
    return {
        "path": str(snap.path),
        "hash": snap.hash,
        "counts": snap.counts,
        "judge": snap.manifest.get("judge") or {},
        "train_path": str(snap.train_path),
        "eval_path": str(snap.eval_path),
    }


# -- decide ------------------------------------------------------------------------------------------

def _snapshot_ids(snapshot_dir: Path | None) -> set[str]:
    if not snapshot_dir:
        return set()
    ids = set()
    for name in ("train.jsonl", "eval.jsonl"):
        ids |= {row["id"] for row in _read_jsonl(Path(snapshot_dir) / name)}
    return ids


def _version_snapshot_dir(self, version) -> Path | None:
    if version is None or not version.snapshot_hash:
        return None
    d = paths.snapshots_dir(self.home) / version.snapshot_hash
    return d if d.is_dir() else None


def stage_decide(self, state: CycleState, force: bool) -> dict[str, Any]:
    pulled = state.result("pull")
    current = self.registry.current()
    train = _read_jsonl(Path(pulled["train_path"]))
    held_out = _read_jsonl(Path(pulled["eval_path"]))
    trained_before = _snapshot_ids(_version_snapshot_dir(self, current))
    new = [ex for ex in train if ex["id"] not in trained_before]
    replay_pool = [ex for ex in train if ex["id"] in trained_before]
    new_total = len(new) + len([ex for ex in held_out if ex["id"] not in trained_before])
    result = {
        "current_version": current.id if current else None,
        "curated_train": len(train),
        "curated_eval": len(held_out),
        "new_since_current": new_total,
        "new_train": len(new),
        "replay_pool": len(replay_pool),
        "min_new_examples": self.config.cycle.min_new_examples,
        "forced": force,
        "judge": {**(pulled.get("judge") or {}), "held_out_examples": len(held_out),
                  "min_held_out": self.config.annotation.min_held_out},
    }
    # Structural stops first: they hold with --force too, since no training could be judged.
    if not train and not held_out:
        counts = pulled.get("counts") or {}
        raise _stop("no_examples", "the snapshot holds no curated example ("
                    + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("records", "discarded", "pending", "rejected"))
                    + "): nothing to train", result)
    if len(held_out) < self.config.annotation.min_held_out:
        notes = "; ".join((pulled.get("judge") or {}).get("notes") or [])
        raise _stop("too_small_to_judge",
                    f"{len(held_out)} held-out example(s), fewer than annotation.min_held_out = "
                    f"{self.config.annotation.min_held_out}: a cycle is not trained when nothing can judge it"
                    + (f" ({notes})" if notes else ""), result)
    if pulled.get("hash") and current is not None and current.snapshot_hash == pulled["hash"] and not force:
        raise _stop("nothing_new", f"the snapshot {pulled['hash'][:12]} is the one {current.id} was trained on", result)
    if new_total < self.config.cycle.min_new_examples and not force:
        raise _stop(
            "nothing_new",
            f"{new_total} curated example(s) since {result['current_version']}; "
            f"training waits for {self.config.cycle.min_new_examples} (or --force)",
            result,
        )
    if not new and not force:
        raise _stop("nothing_new", "no new curated training examples (new ones all fell into the held-out split)", result)
    trainer_cfg = self.config.trainer
    from trainer.data import build_training_set
    from trainer.evaluate import load_general_replay

    # Replay: earlier corrections (so they are not forgotten) plus general-ability examples (so the
    # strong update a few dozen corrections need does not cost what the model already knew).
    general = load_general_replay(trainer_cfg)
    pool = (replay_pool if new else []) + general
    mixed = build_training_set(new or train, pool, trainer_cfg.replay_ratio, trainer_cfg.seed)
    result["replayed_general"] = sum(1 for ex in mixed if str(ex.get("id", "")).startswith("general-"))
    if len(mixed) < trainer_cfg.min_examples:
        raise _stop(
            "too_few_examples",
            f"{len(mixed)} training example(s) after replay; the trainer needs at least {trainer_cfg.min_examples}",
            result,
        )
    train_path = state.dir / "train.jsonl"
    _write_jsonl(train_path, mixed)
    result.update(train_path=str(train_path), eval_path=pulled["eval_path"], train_examples=len(mixed))
    return result


def _stop(outcome: str, reason: str, result: dict[str, Any]) -> StopCycle:
    stop = StopCycle(outcome, reason)
    stop.result = result
    return stop


# -- train and gate ------------------------------------------------------------------------------------

def _current_hf_dir(self) -> Path:
    current = self.registry.current()
    if current is not None and current.hf_dir and Path(current.hf_dir).is_dir():
        return Path(current.hf_dir)
    from loop.bootstrap import ensure_hf_base

    return Path(ensure_hf_base(self.config))


def stage_train(self, state: CycleState, force: bool) -> dict[str, Any]:
    from trainer.variants import best_variant, run_variants

    decided = state.result("decide")
    base_dir = _current_hf_dir(self)
    results = run_variants(
        Path(decided["train_path"]),
        Path(decided["eval_path"]) if decided.get("eval_path") else None,
        base_dir,
        state.dir / "variants",
        # The trainer keeps the best epoch the gate would accept: one regression tolerance for both.
        replace(self.config.trainer, regression_tolerance=self.config.gate.regression_tolerance),
    )
    rows = [r.to_dict() for r in results]
    ok = [r for r in results if r.status == "ok"]
    out = {"base_dir": str(base_dir), "variants": rows, "variants_dir": str(state.dir / "variants")}
    if not ok:
        raise _stop("training_failed", "every variant failed: " + "; ".join(
            f"{r['name']}: {r.get('reason') or r.get('error')}" for r in rows), out)
    # Only variants the regression gate would accept compete, so the most forgetful variant (often the one
    # that learned most) cannot shadow one that learned and kept general ability; the lowest held-out loss
    # wins (training loss says nothing about generalisation: the seed's mistake). None left: no candidate,
    # never a variant picked by its place in the grid.
    tolerance = self.config.gate.regression_tolerance
    best = best_variant(results, regression_tolerance=tolerance)
    if best is None:
        raise _stop("no_candidate", "no variant both has a finite held-out loss and kept its regression loss "
                    f"within +{tolerance:.1%}: " + "; ".join(_variant_note(r) for r in ok), out)
    out["best"] = best.name
    return out


def _variant_note(r) -> str:
    if r.eval_loss is None:
        return f"{r.name}: no held-out loss"
    if r.regression_loss is not None and r.regression_loss_start:
        return (f"{r.name}: held-out {r.eval_loss:.4f}, regression "
                f"{(r.regression_loss - r.regression_loss_start) / r.regression_loss_start:+.1%}")
    return f"{r.name}: held-out {r.eval_loss:.4f}, no regression loss"


def _metric(row: dict[str, Any], *names: str) -> float | None:
    for n in names:
        v = row.get(n)
        if v is None and isinstance(row.get("metrics"), dict):
            v = row["metrics"].get(n)
        if v is not None:
            return float(v)
    return None


# -- export, promote ------------------------------------------------------------------------------------

def stage_export(self, state: CycleState, force: bool) -> dict[str, Any]:
    from trainer.export import export_variant

    best = _best_variant(state)
    pulled = state.result("pull")
    current = self.registry.current()
    out_dir = state.dir / "export"
    card_info = {
        "base_model": self.config.model.name,
        "parent_version": current.id if current else None,
        "snapshot_hash": pulled.get("hash"),
        "snapshot_counts": pulled.get("counts"),
        "variant": {k: best.get(k) for k in ("name", "learning_rate", "lora_rank", "lora_alpha") if k in best},
        "metrics": {k: best.get(k) for k in ("eval_loss", "regression_loss", "tokens_per_s", "wall_s") if k in best},
    }
    held_out = _read_jsonl(Path(state.result("decide")["eval_path"]))
    # export_variant verifies the quantised file itself (probes + this held-out set) and puts the
    # verification into the model card; the gate reads it from here.
    result = export_variant(
        Path(best["adapter_dir"]), Path(state.result("train")["base_dir"]), out_dir, self.config.export, card_info,
        eval_examples=held_out or None,
    )
    verification = result.verification
    vdict = verification.to_dict() if hasattr(verification, "to_dict") else dict(verification or {})
    out = {"variant": best.get("name"), "export": result.to_dict(), "verification": vdict}
    if not vdict.get("passed"):
        raise _stop("verification_failed", "the exported GGUF failed verification: " + "; ".join(vdict.get("reasons") or []), out)
    return out


def _best_variant(state: CycleState) -> dict[str, Any]:
    """The row of the variant stage_train chose."""
    trained = state.result("train")
    return next(r for r in trained["variants"] if r["name"] == trained["best"])


def stage_gate(self, state: CycleState, force: bool) -> dict[str, Any]:
    from loop.gate import decide
    from trainer.evaluate import eval_loss, load_regression_set

    best = _best_variant(state)
    held_out = _read_jsonl(Path(state.result("decide")["eval_path"]))
    base_dir = Path(state.result("train")["base_dir"])
    max_length = self.config.trainer.max_length
    # The trainer already measured the starting weights (= the current version) on the same held-out
    # and regression sets with the same settings; measure again only when it did not.
    start_h, start_r = _metric(best, "eval_loss_start"), _metric(best, "regression_loss_start")
    current_metrics = {
        "heldout_loss": start_h if start_h is not None else (
            eval_loss(base_dir, held_out, max_length=max_length) if held_out else None),
        "regression_loss": start_r if start_r is not None else eval_loss(
            base_dir, load_regression_set(self.config.trainer), max_length=max_length),
        "version": self.registry.current_id(),
        "measured_by": "trainer (starting weights)" if start_h is not None else "gate",
    }
    candidate = {
        "heldout_loss": _metric(best, "eval_loss"),
        "regression_loss": _metric(best, "regression_loss"),
        "status": best.get("status"),
        "verification": state.result("export").get("verification"),
    }
    arena = None
    if self.config.gate.use_arena:
        from loop.arena import ratings

        arena = ratings(self.store.arena_votes())
    decision = decide(candidate, current_metrics, self.config.gate, arena=arena, current_id=current_metrics["version"])
    out = {
        "best_variant": best.get("name"),
        "best": best,
        "candidate": {k: v for k, v in candidate.items() if k != "verification"},
        "current": current_metrics,
        "decision": decision.to_dict(),
    }
    if not decision.promote:
        raise _stop("gate_refused", "the gate kept the current version: " + "; ".join(decision.reasons), out)
    return out


def stage_promote(self, state: CycleState, force: bool) -> dict[str, Any]:
    exported = state.result("export")
    gated = state.result("gate")
    pulled = state.result("pull")
    # Idempotent: a version registered by this cycle before a crash is reused, never registered twice.
    version = next((v for v in self.registry.list() if v.variant.get("cycle") == state.id), None)
    parent = state.result("decide").get("current_version")
    if version is None:
        export = exported["export"]
        card = Path(export.get("card_path") or "")
        version = self.registry.register(
            export["gguf_path"],
            base_model=self.config.model.name,
            parent=parent,
            quantization=export.get("quantization", ""),
            variant={**{k: gated["best"].get(k) for k in ("name", "learning_rate", "lora_rank", "lora_alpha")},
                     "cycle": state.id},
            snapshot_hash=pulled.get("hash"),
            snapshot_counts=pulled.get("counts") or {},
            metrics={**gated["candidate"], "current_at_gate": gated["current"]},
            verification=exported["verification"],
            hf_dir=export.get("merged_dir"),
            extra_files=[p for p in (card, card.with_name("card.json")) if p.name and p.is_file()],
            link=True,
        )
    promoted_now = False
    if self.registry.current_id() != version.id:
        self.registry.promote(version.id, reason=f"cycle {state.id}: gate passed", decision=gated["decision"])
        promoted_now = True
    published = None
    try:
        from loop.publish import publish

        published = publish(self.registry.get(version.id), self.config)
    except ImportError:
        published = None
    from loop.registry import RegistryError

    try:
        pruned = self.registry.prune(self.config.registry.keep_versions)
    except (OSError, RegistryError) as exc:
        pruned = [f"prune failed: {exc}"]
    return {"version": version.id, "parent": parent, "promoted": True, "promoted_now": promoted_now,
            "published": published, "pruned": pruned}


# -- report -------------------------------------------------------------------------------------------------

def stage_report(self, state: CycleState, force: bool) -> dict[str, Any]:
    from loop.report import write_report

    return write_report(self, state)

