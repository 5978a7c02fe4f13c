"""The stages of one cycle (see loop/cycle.py for the order and the resume contract).

Each function is a method of ``loop.cycle.Cycle``: it takes the persisted ``CycleState`` and
returns a JSON-able result that later stages (and a resumed run) read back. A stage that
decides the cycle should end raises ``StopCycle`` with the reason the report will show.
Heavy imports (torch, argilla) happen inside the stages so that ``loop.cycle`` imports fast.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from loop.core import paths
from loop.core.io import read_jsonl
from loop.cycle_state import CycleState, StopCycle

_read_jsonl = partial(read_jsonl, missing_ok=True)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


# -- canary ------------------------------------------------------------------------------------------

def stage_canary(self, state: CycleState, force: bool) -> dict[str, Any]:
    """Settle the live canary, if any (``loop.rollout``): promote it (then publish it), roll it back,
    or leave it running, in which case ``decide`` stops the cycle before anything trains. First in
    the cycle and run again on every resume, so a bad canary is rolled back even while Argilla is down."""
    from loop.rollout import check_canary

    out = check_canary(self.registry, self.store, self.config.rollout, log_fn=self.log)
    if out.get("action") == "promoted":
        from loop.publish import PublishError, publish

        try:
            out["published"] = publish(self.registry.get(out["canary"]), self.config, registry=self.registry)
        except PublishError as exc:  # the promotion stands; `python -m loop.publish` retries the upload
            out["publish_error"] = str(exc)
            self.log(f"canary {out['canary']} promoted but not published: {exc}")
    return {k: v for k, v in out.items() if k != "pointer"}


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


def _untainted_basis(self, version):
    """``version``, or its newest ancestor not trained on forgotten text (``loop.forget``): a tainted
    version's weights hold what was forgotten, so nothing trains on from them."""
    while version is not None and version.tainted and version.parent:
        version = self.registry.get(version.parent)
    return version


def stage_decide(self, state: CycleState, force: bool) -> dict[str, Any]:
    canary = self.registry.canary_pointer()
    if canary is not None:  # holds with --force too: a candidate is judged against what users settled on
        raise _stop("canary_pending", f"canary {canary['version']} (since {canary['since']}) is still being judged "
                    "by users: no new candidate trains until it is promoted or rolled back "
                    "(python -m loop.versions canary)", {"canary": canary["version"]})
    pulled = state.result("pull")
    current = self.registry.current()
    basis = _untainted_basis(self, current)
    retrain = basis is not current  # the current version is tainted: retrain without the forgotten text
    train = _read_jsonl(Path(pulled["train_path"]))
    held_out = _read_jsonl(Path(pulled["eval_path"]))
    trained_before = _snapshot_ids(_version_snapshot_dir(self, basis))
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
        "trained_from": basis.id if basis else None,
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
    if retrain:
        force = True  # the nothing-new stops below do not hold: what the current version learnt must go
        result["retrain"] = f"{current.id} is tainted (trained on forgotten text): trained again from {basis.id}"
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
    if general and trainer_cfg.general_replay_answers == "self":
        general, result["general_replay_answers"] = _answered_by(basis, general)
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


def _answered_by(version, examples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """``examples`` with each answer replaced by ``version``'s own greedy answer (served GGUF, as users see it).

    Replaying what the model already says keeps it saying that; replaying someone else's phrasing of the
    same knowledge moves the model too, and that movement is where forgetting starts (docs/judging.md)."""
    if version is None or not Path(version.gguf_path).is_file():
        return examples, "shipped (no servable starting version to answer them)"
    from app.probe_runner import greedy_answer, load_llama

    llm = load_llama(version.gguf_path, n_ctx=1024)
    out = []
    for ex in examples:
        answer = greedy_answer(llm, ex["messages"][:-1], max_tokens=96).answer.strip()
        if answer:
            out.append({**ex, "messages": ex["messages"][:-1] + [{"role": "assistant", "content": answer}]})
    return out, f"self ({version.id}, {len(out)} of {len(examples)} answered)"


def _stop(outcome: str, reason: str, result: dict[str, Any]) -> StopCycle:
    stop = StopCycle(outcome, reason)
    stop.result = result
    return stop


# -- train and gate ------------------------------------------------------------------------------------

def _current_hf_dir(self, vid: str | None = None) -> Path:
    """The weights the next version trains from: the current version's merged weights (or ``vid``'s:
    decide's ``trained_from``, the newest untainted ancestor).

    A version with no parent is a base model as shipped, whose weights are the bundled base's. A
    trained version whose merged weights are gone stops the cycle, never falls back to the base:
    a candidate trained from the base and gated against the base's losses labelled as the current
    version's would be promoted on numbers that describe another model."""
    current = self.registry.get(vid) if vid else self.registry.current()
    if current is not None and current.hf_dir and Path(current.hf_dir).is_dir():
        return Path(current.hf_dir)
    if current is None or current.parent is None:
        from loop.bootstrap import ensure_hf_base

        return Path(ensure_hf_base(self.config))
    where = f"{current.hf_dir} is gone" if current.hf_dir else "none were recorded"
    raise StopCycle(
        "missing_weights",
        f"the current version {current.id} has no merged weights to train from ({where}); training from the "
        f"base model instead would gate the base's losses as {current.id}'s. Restore that directory, or roll "
        "back to a version whose weights exist (python -m loop.versions rollback --to ID)")


def stage_train(self, state: CycleState, force: bool) -> dict[str, Any]:
    from trainer.variants import best_variant, run_variants

    decided = state.result("decide")
    base_dir = _current_hf_dir(self, state.result("decide").get("trained_from"))
    results = run_variants(
        Path(decided["train_path"]),
        Path(decided["eval_path"]) if decided.get("eval_path") else None,
        base_dir,
        state.dir / "variants",
        # The trainer keeps the best epoch the gate would accept: one set of general-ability rules for both.
        replace(self.config.trainer, regression_tolerance=self.config.gate.regression_tolerance,
                min_general_kept=self.config.gate.min_general_kept),
        # The snapshot's pairs and labels, for the preference objectives of the grid (trainer/preference.py).
        preference_dir=Path(state.result("pull")["path"]),
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
    tolerance, min_kept = self.config.gate.regression_tolerance, self.config.gate.min_general_kept
    best = best_variant(results, regression_tolerance=tolerance, min_general_kept=min_kept)
    if best is None:
        raise _stop("no_candidate", "no variant both has a finite held-out loss and kept its regression loss "
                    f"within +{tolerance:.1%} and {min_kept:.0%} of its general answers: "
                    + "; ".join(_variant_note(r) for r in ok), out)
    out["best"] = best.name
    return out


def _variant_note(r) -> str:
    if r.eval_loss is None:
        return f"{r.name}: no held-out loss"
    kept = f", general answers kept {r.general_kept:.0%}" if r.general_kept is not None else ""
    if r.regression_loss is not None and r.regression_loss_start:
        return (f"{r.name}: held-out {r.eval_loss:.4f}, regression "
                f"{(r.regression_loss - r.regression_loss_start) / r.regression_loss_start:+.1%}{kept}")
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
        "general_kept": _metric(best, "general_kept"),
        "status": best.get("status"),
        "verification": state.result("export").get("verification"),
    }
    arena = None
    if self.config.gate.use_arena:
        from loop.core.arena import ratings

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
    """Register the candidate once, promote it once, prune; publishing is the next stage.

    The registry is the record (``loop.cycle_state``): the version is found by this cycle's id, and
    a history line that ever made it current means it is never promoted again, so a resume after a
    kill right after ``promote()`` followed by a rollback leaves the rollback standing. With an
    arena criterion pending (``GateDecision.pending``), the registered version waits, not current,
    until ``loop.gate.arena_verdict`` settles it."""
    from loop.core.registry import RegistryError
    from loop.cycle_state import moved_away_from, own_version, promotion_of

    exported = state.result("export")
    gated = state.result("gate")
    pulled = state.result("pull")
    # The version whose weights it was trained from (not a tainted current one: loop.forget).
    parent = state.result("decide").get("trained_from") or state.result("decide").get("current_version")
    version = own_version(self.registry, state.id)
    registered_now = version is None
    if version is None:
        export = exported["export"]
        card = Path(export["card_path"]) if export.get("card_path") else None
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
            extra_files=[p for p in ((card, card.with_name("card.json")) if card else ()) if p.is_file()],
            link=True,
        )
    out: dict[str, Any] = {"version": version.id, "parent": parent, "registered_now": registered_now}
    decision = dict(gated["decision"])
    made_current = promotion_of(self.registry, version.id) or (state.data.get("promotion") or {}).get("history")
    promoted_now = False
    if made_current is None:
        if "arena" in (decision.get("pending") or []):
            decision = _settle_arena(self, version.id, parent, decision, out)
        if self.config.rollout.canary_share > 0:
            return _start_canary(self, state, version.id, decision, out)
        self.registry.promote(version.id, reason=f"cycle {state.id}: gate passed", decision=decision)
        promoted_now = True
        made_current = promotion_of(self.registry, version.id)
    # Durable before publishing: the report and a resumed run read the promotion from here too.
    state.data["promotion"] = {"version": version.id, "history": made_current}
    state.save()
    moved = moved_away_from(self.registry, version.id)
    try:
        pruned = self.registry.prune(self.config.registry.keep_versions)
    except (OSError, RegistryError) as exc:
        pruned = [f"prune failed: {exc}"]
    out.update(promoted=True, promoted_now=promoted_now, promoted_at=(made_current or {}).get("at"),
               current=self.registry.current_id(), pruned=pruned)
    if moved is not None:
        out["moved_away"] = {k: moved.get(k) for k in ("action", "at", "to", "reason")}
        self.log(f"{version.id} was promoted and then {moved.get('action')} to {moved.get('to')}: not promoted again")
    return out


def _start_canary(self, state: CycleState, vid: str, decision: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The gate passed with ``[rollout] canary_share`` set: ``vid`` becomes the canary, once (a
    canary that already ended, rolled back, is never started again by a resumed cycle)."""
    ended = next((e for e in self.registry.canary_log() if e.get("version") == vid and e.get("action") != "start"), None)
    if ended is None:
        pointer = self.registry.start_canary(vid, share=self.config.rollout.canary_share,
                                             reason=f"cycle {state.id}: gate passed", decision=decision)
        out["canary_since"] = pointer["since"]
    else:
        out["canary_ended"] = {k: ended.get(k) for k in ("action", "at", "reason")}
    out.update(promoted=False, canary=vid, share=self.config.rollout.canary_share, current=self.registry.current_id())
    return out


def _settle_arena(self, vid: str, current_id: str | None, decision: dict[str, Any],
                  out: dict[str, Any]) -> dict[str, Any]:
    """The arena rule for the registered candidate: the decision to promote with, or WaitCycle/StopCycle."""
    from loop.core.arena import ratings
    from loop.cycle_state import WaitCycle
    from loop.gate import arena_verdict

    table = ratings(self.store.arena_votes(), versions=[v for v in (vid, current_id) if v])
    verdict, reason, numbers = arena_verdict(vid, current_id, table, self.config.gate)
    out["arena"] = {"verdict": verdict, "reason": reason, **numbers}
    if verdict == "wait":
        raise WaitCycle("pending_arena", f"{vid} passed the loss gate and is registered, not current, until the "
                        f"arena settles it: {reason}", dict(out))
    if verdict == "refuse":
        raise _stop("arena_refused", f"{vid} passed the loss gate but not the arena: {reason}", dict(out))
    return {**decision, "pending": [], "reasons": list(decision.get("reasons") or []) + [reason],
            "numbers": {**(decision.get("numbers") or {}), **numbers}}


def stage_publish(self, state: CycleState, force: bool) -> dict[str, Any]:
    """Publish the version this cycle promoted, while it is still current.

    A ``PublishError`` fails this stage only: the next run retries the upload and never repeats
    the promotion. A version moved away from since (a rollback) is not published: the publish
    target would serve what people took out of service."""
    from loop.publish import publish

    vid = state.result("promote").get("version")
    current = self.registry.current_id()
    if not vid:
        return {"version": None, "published": None, "skipped": "this cycle promoted nothing"}
    if state.result("promote").get("canary"):
        return {"version": vid, "published": None,
                "skipped": f"{vid} is a canary: it is published when the canary is promoted"}
    if current != vid:
        return {"version": vid, "published": None,
                "skipped": f"{vid} is no longer current ({current} is): a version taken out of service is not published"}
    return {"version": vid, "published": publish(self.registry.get(vid), self.config, registry=self.registry)}


# -- report -------------------------------------------------------------------------------------------------

def stage_report(self, state: CycleState, force: bool) -> dict[str, Any]:
    from loop.report import write_report

    return write_report(self, state)

