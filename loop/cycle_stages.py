"""The cycle's first stages: settle the canary, push, pull, decide whether to train and on what.

Every stage is ``stage(ctx, state) -> <Result>`` (``loop.cycle_pipeline``); the order is
``loop.cycle.STAGES``; the training and judging stages are in ``loop.cycle_stages_build``, the
release stages in ``loop.cycle_stages_release``. A stage that decides the cycle should end raises
``StopCycle`` with the reason the report will show and the result it had. Heavy imports (torch,
argilla) happen inside the stages so that ``loop.cycle`` imports fast.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from loop.core import paths
from loop.core.io import read_jsonl
from loop.cycle_pipeline import CycleContext
from loop.cycle_results import CanaryPending, CanaryResult, DecideResult, PullResult, PushResult
from loop.cycle_state import CycleState, StopCycle

_read_jsonl = partial(read_jsonl, missing_ok=True)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


# -- canary ------------------------------------------------------------------------------------------

def stage_canary(ctx: CycleContext, state: CycleState | None) -> CanaryResult:
    """Settle the live canary, if any (``loop.rollout``): promote it (then publish it), roll it back,
    or leave it running, in which case ``decide`` stops the cycle before anything trains. First in
    the cycle and run again on every resume, so a bad canary is rolled back even while Argilla is down."""
    from loop.rollout import check_canary

    out = check_canary(ctx.registry, ctx.store, ctx.config.rollout, log_fn=ctx.log)
    result = CanaryResult.from_dict({k: v for k, v in out.items() if k != "pointer"})
    if result.action == "promoted":
        from loop.publish import PublishError, publish

        try:
            result.published = publish(ctx.registry.get(result.canary), ctx.config, registry=ctx.registry)
        except PublishError as exc:  # the promotion stands; `python -m loop.publish` retries the upload
            result.publish_error = str(exc)
            ctx.log(f"canary {result.canary} promoted but not published: {exc}")
    return result


# -- push / pull -----------------------------------------------------------------------------------

def stage_push(ctx: CycleContext, state: CycleState) -> PushResult:
    from annotation.push import push

    return PushResult.from_dict(push(ctx.config, store=ctx.store, progress=ctx.progress).as_dict())


def stage_pull(ctx: CycleContext, state: CycleState) -> PullResult:
    from annotation.pull import pull_snapshot

    snap = pull_snapshot(ctx.config, progress=ctx.progress)
    return PullResult(path=str(snap.path), hash=snap.hash, counts=snap.counts, judge=snap.manifest.get("judge") or {},
                      train_path=str(snap.train_path), eval_path=str(snap.eval_path))


# -- decide ------------------------------------------------------------------------------------------

def _snapshot_ids(snapshot_dir: Path | None) -> set[str]:
    if not snapshot_dir:
        return set()
    ids = set()
    for name in ("train.jsonl", "eval.jsonl"):
        ids |= {row["id"] for row in _read_jsonl(Path(snapshot_dir) / name)}
    return ids


def _version_snapshot_dir(ctx: CycleContext, version) -> Path | None:
    if version is None or not version.snapshot_hash:
        return None
    d = paths.snapshots_dir(ctx.home) / version.snapshot_hash
    return d if d.is_dir() else None


def _untainted_basis(ctx: CycleContext, version):
    """``version``, or its newest ancestor not trained on forgotten text (``loop.forget``): a tainted
    version's weights hold what was forgotten, so nothing trains on from them."""
    while version is not None and version.tainted and version.parent:
        version = ctx.registry.get(version.parent)
    return version


def stage_decide(ctx: CycleContext, state: CycleState) -> DecideResult:
    """Train or not, on what, from which version: the stated stops first, then the mix of new
    examples and replay written to ``<cycle>/train.jsonl``. The one stage that reads ``ctx.force``."""
    config = ctx.config
    canary = ctx.registry.canary_pointer()
    if canary is not None:  # holds with --force too: a candidate is judged against what users settled on
        raise StopCycle("canary_pending", f"canary {canary['version']} (since {canary['since']}) is still being "
                        "judged by users: no new candidate trains until it is promoted or rolled back "
                        "(python -m loop.versions canary)", CanaryPending(canary=canary["version"]))
    force = ctx.force
    pulled = state.read(PullResult)
    current = ctx.registry.current()
    basis = _untainted_basis(ctx, current)
    retrain = basis is not current  # the current version is tainted: retrain without the forgotten text
    train = _read_jsonl(Path(pulled.train_path))
    held_out = _read_jsonl(Path(pulled.eval_path))
    trained_before = _snapshot_ids(_version_snapshot_dir(ctx, basis))
    new = [ex for ex in train if ex["id"] not in trained_before]
    replay_pool = [ex for ex in train if ex["id"] in trained_before]
    new_total = len(new) + len([ex for ex in held_out if ex["id"] not in trained_before])
    result = DecideResult(
        current_version=current.id if current else None,
        curated_train=len(train),
        curated_eval=len(held_out),
        new_since_current=new_total,
        new_train=len(new),
        replay_pool=len(replay_pool),
        min_new_examples=config.cycle.min_new_examples,
        forced=force,
        trained_from=basis.id if basis else None,
        judge={**(pulled.judge or {}), "held_out_examples": len(held_out), "min_held_out": config.annotation.min_held_out},
    )
    # Structural stops first: they hold with --force too, since no training could be judged.
    if not train and not held_out:
        counts = pulled.counts or {}
        raise StopCycle("no_examples", "the snapshot holds no curated example ("
                        + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("records", "discarded", "pending", "rejected"))
                        + "): nothing to train", result)
    if len(held_out) < config.annotation.min_held_out:
        notes = "; ".join((pulled.judge or {}).get("notes") or [])
        raise StopCycle("too_small_to_judge",
                        f"{len(held_out)} held-out example(s), fewer than annotation.min_held_out = "
                        f"{config.annotation.min_held_out}: a cycle is not trained when nothing can judge it"
                        + (f" ({notes})" if notes else ""), result)
    if retrain:
        force = True  # the nothing-new stops below do not hold: what the current version learnt must go
        result.retrain = f"{current.id} is tainted (trained on forgotten text): trained again from {basis.id}"
    if pulled.hash and current is not None and current.snapshot_hash == pulled.hash and not force:
        raise StopCycle("nothing_new", f"the snapshot {pulled.hash[:12]} is the one {current.id} was trained on", result)
    if new_total < config.cycle.min_new_examples and not force:
        raise StopCycle("nothing_new", f"{new_total} curated example(s) since {result.current_version}; "
                        f"training waits for {config.cycle.min_new_examples} (or --force)", result)
    if not new and not force:
        raise StopCycle("nothing_new", "no new curated training examples (new ones all fell into the held-out split)",
                        result)
    trainer_cfg = config.trainer
    from trainer.anchor import is_anchor
    from trainer.data import build_training_set
    from trainer.evaluate import load_general_replay

    # Replay: earlier corrections (so they are not forgotten) plus general-ability examples (so the
    # strong update a few dozen corrections need does not cost what the model already knew).
    general = load_general_replay(trainer_cfg)
    if general and trainer_cfg.general_replay_answers == "self":
        general, result.general_replay_answers = _answered_by(basis, general)
    pool = (replay_pool if new else []) + general
    mixed = build_training_set(new or train, pool, trainer_cfg.replay_ratio, trainer_cfg.seed)
    result.replayed_general = sum(1 for ex in mixed if is_anchor(ex))
    if len(mixed) < trainer_cfg.min_examples:
        raise StopCycle("too_few_examples", f"{len(mixed)} training example(s) after replay; the trainer needs at "
                        f"least {trainer_cfg.min_examples}", result)
    train_path = state.dir / "train.jsonl"
    _write_jsonl(train_path, mixed)
    result.train_path, result.eval_path, result.train_examples = str(train_path), pulled.eval_path, len(mixed)
    return result


def _answered_by(version, examples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """``examples`` with each answer replaced by ``version``'s own greedy answer (served GGUF, as users see it).

    Replaying what the model already says keeps it saying that; replaying someone else's phrasing of the
    same knowledge moves the model too, and that movement is where forgetting starts (docs/judging.md)."""
    if version is None or not Path(version.gguf_path).is_file():
        return examples, "shipped (no servable starting version to answer them)"
    from app.probe_runner import greedy_answers
    from loop.core.gguf_model import GgufModel

    model = GgufModel.load(version.gguf_path, n_ctx=1024)
    try:
        # Side by side, one llama_decode per step for all of them: greedy_answer's answers, sooner.
        answers = greedy_answers(model, [ex["messages"][:-1] for ex in examples], max_tokens=96)
    finally:
        model.close()
    out = [{**ex, "messages": ex["messages"][:-1] + [{"role": "assistant", "content": a.answer}]}
           for ex, a in zip(examples, answers) if a.answer]
    return out, f"self ({version.id}, {len(out)} of {len(examples)} answered)"
