"""Fixed measures: every version, the base included, scored on the same sets in the same way.

A cycle's held-out loss comes from that cycle's own held-out set: it compares the candidate with the
version it replaced, and with nothing else. To put all versions side by side, each one is measured
once, from its served GGUF through llama.cpp (what users get), on sets that do not change between
cycles:

  regression_loss  mean cross-entropy per answer token over the regression set
                   (``[trainer] regression_set``, default trainer/regression_set.jsonl): token-weighted,
                   the answer and its end-of-turn tokens scored, the prompt not (the tokens
                   ``trainer.data.tokenize_example`` scores, cut at ``[trainer] max_length``, here
                   through the GGUF's own tokenizer and chat template; logits and NLL from
                   ``trainer.verify``'s llama.cpp side)
  general_right    share of the regression prompts that carry ``expect`` whose greedy answer
                   (``app.probe_runner.greedy_answers``: ``greedy_answer``'s answers, up to float rounding,
                   decoded side by side; ``trainer.general_kept.ANSWER_TOKENS`` tokens)
                   matches one of them (``trainer.general_kept.is_right``)
  probe_pass_rate  share of the fixed probe set's checkable probes (loop/core/probes.jsonl) whose greedy
                   answer (``PROBE_TOKENS`` tokens) matches the probe's ``expect`` patterns; a probe
                   without its own ``expect`` uses ``PROBE_EXPECT`` (keyed by its prompt), and an
                   open-ended probe with neither is left out and counted as ``unchecked``

The cache (``Version.metrics["measures"][name]``, written with ``Registry.update``; its format and
the rules for reading it are in ``loop.core.measures``, which the app reads it with) holds the value
with what it was measured on: ``set`` and ``set_hash`` (a hash of the set's content), ``gguf_sha256``
and ``method`` (``METHOD`` plus the token limit that measure uses). An entry counts only while all
three still match the version and the sets as they are now; otherwise the measure is missing, is
taken again and replaces the entry: a value from an older set or another file is never shown beside
current ones.
The measure is a function of the file's bytes, the set and the method, so a version whose GGUF has
the same sha256 as a version already measured gets a copy of that entry (``copied_from``).

Contract: ``measure_versions`` loads models and writes only ``metrics["measures"]`` of the versions
it measures (under ``registry/.measures.lock``, so two measurers never run, or write, at once); the
app never calls it (it reads the cache from ``version.json``: docs/registry.md has the format).
``after_promotion`` is the cycle's call: it never raises.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loop.config import LoopConfig
from loop.core.gguf_model import GgufModel, llama_threads
from loop.core.io import sha256_file, utcnow
from loop.core.measures import KEY, LABELS, NAMES, entry, format_value, gate_comparison
from loop.core.registry import Registry, RegistryError, Version

# Bump when the way any measure is computed changes: every cached value is then measured again.
METHOD = 1
PROBE_TOKENS = 64  # as `versions compare` and the scenario suite answer probes

# Checks for the shipped probe set (probes.jsonl has reference answers, not checks): case-
# insensitive regular expressions, any one matching passes, as the regression set's ``expect``. Only
# probes with one right key are checked; open-ended ones (a haiku, tips, a summary) are not.
PROBE_EXPECT: dict[str, list[str]] = {
    "What is the capital of France?": [r"\bparis\b"],
    "How many days are there in a week?": [r"\bseven\b", r"\b7\b"],
    "Explain what photosynthesis is in one sentence.": [r"light"],
    "What is 12 multiplied by 7?": [r"\b84\b"],
    "Translate 'good morning' into Spanish.": [r"buenos\s+d[ií]as"],
    "What is the boiling point of water at sea level in Celsius?": [r"\b100\b"],
    "Who wrote 'Romeo and Juliet'?": [r"shakespeare"],
    "Write a Python function that returns the square of a number.": [r"\*\*\s*2", r"\b(\w+)\s*\*\s*\1\b", r"pow\("],
    "Why is the sky blue?": [r"scatter"],
    "List the primary colors.": [r"(?s)(?=.*\bred\b)(?=.*\bblue\b)"],
    "What is the largest planet in our solar system?": [r"jupiter"],
    "Is a tomato a fruit or a vegetable?": [r"\bfruit\b"],
    "What does CPU stand for?": [r"central\s+processing\s+unit"],
}


def content_hash(items: Any) -> str:
    """sha256 of the canonical JSON of ``items``: the same content gives the same hash, whatever the file's layout."""
    text = json.dumps(items, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class FixedSet:
    name: str  # the file, for people
    items: list[dict[str, Any]]
    hash: str = ""

    def __post_init__(self) -> None:
        self.hash = self.hash or content_hash(self.items)


@dataclass
class FixedSets:
    """The sets the measures are taken on, and the method (token limits included)."""

    regression: FixedSet  # examples {"id", "messages", "expect"?}: regression_loss and general_right
    probes: FixedSet  # checkable probes {"prompt", "messages", "expect"}: probe_pass_rate
    unchecked_probes: int = 0
    answer_tokens: int = 48
    max_length: int = 512

    def for_measure(self, name: str) -> FixedSet:
        return self.probes if name == "probe_pass_rate" else self.regression

    def method(self, name: str) -> dict[str, Any]:
        """How ``name`` is measured: part of its cache key (a changed limit measures again)."""
        setting = {"regression_loss": ("max_length", self.max_length),
                   "general_right": ("answer_tokens", self.answer_tokens),
                   "probe_pass_rate": ("probe_tokens", PROBE_TOKENS)}[name]
        return {"version": METHOD, setting[0]: setting[1]}


def load_sets(config: LoopConfig | None = None, *, regression_path: str | Path | None = None,
              probes_path: str | Path | None = None) -> FixedSets:
    """The fixed sets as they are now (``config``: its ``trainer.regression_set``; needs the trainer package)."""
    from loop.core import probes
    from loop.core.io import read_jsonl
    from trainer.config import TrainConfig
    from trainer.evaluate import REGRESSION_SET, regression_examples
    from trainer.general_kept import ANSWER_TOKENS

    trainer_cfg = config.trainer if config is not None else TrainConfig()
    regression_path = Path(regression_path or trainer_cfg.regression_set or REGRESSION_SET)
    examples = [{k: e[k] for k in ("id", "messages", "expect") if k in e} for e in regression_examples(regression_path)]
    probes_path = Path(probes_path or probes.PROBES_FILE)
    checked, unchecked = [], 0
    for probe in read_jsonl(probes_path):
        messages = probes.as_messages(probe)
        prompt = probes.last_user_text(messages)
        expect = probe.get("expect") or PROBE_EXPECT.get(prompt)
        if expect:
            checked.append({"prompt": prompt, "messages": messages, "expect": list(expect)})
        else:
            unchecked += 1
    return FixedSets(FixedSet(regression_path.name, examples), FixedSet(probes_path.name, checked),
                     unchecked_probes=unchecked, answer_tokens=ANSWER_TOKENS,
                     max_length=trainer_cfg.max_length)


# -- the cache --------------------------------------------------------------------------------------


def valid(version: Version, name: str, sets: FixedSets) -> dict[str, Any] | None:
    """The cached entry when it was measured on this set, this file and this method; else None."""
    cached = entry(version, name)
    if cached and cached.get("set_hash") == sets.for_measure(name).hash and cached.get("method") == sets.method(name):
        return cached
    return None


def missing(version: Version, sets: FixedSets) -> list[str]:
    return [name for name in NAMES if valid(version, name, sets) is None]


@contextlib.contextmanager
def _measure_lock(registry: Registry) -> Iterator[None]:
    """One measurer at a time across processes (cycle, CLI): no lost cache writes, no doubled CPU load.
    Not the registry's writer lock: promotions and rollbacks go on while a version is measured."""
    with open(registry.root / ".measures.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def _write(registry: Registry, vid: str, entries: dict[str, dict[str, Any]]) -> Version:
    fresh = registry.get(vid)  # read right before the write: a pin or taint meanwhile is kept
    metrics = dict(fresh.metrics or {})
    metrics[KEY] = {**(metrics.get(KEY) or {}), **entries}
    return registry.update(vid, metrics=metrics)


# -- measuring ----------------------------------------------------------------------------------------


def _loss_inputs(model: GgufModel, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[bool]]:
    """Token ids of the whole chat and which are the answer's: the prompt is rendered with the
    generation prompt (as the probes and the app render it), the whole chat without, and the answer is
    what the whole adds (its text and end-of-turn tokens), as ``trainer.data.tokenize_example`` does."""
    prompt = model.prompt_tokens(messages[:-1])
    ids = model.chat_tokens(messages)
    if ids[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of the whole chat; "
                         "the answer's tokens cannot be told apart")
    mask = [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    return ids[:max_length], mask[:max_length]


def run_measures(gguf: str | Path, sets: FixedSets, names: list[str] | tuple[str, ...] = NAMES, *,
                 n_ctx: int = 2048, n_threads: int | None = None, progress: bool = True,
                 desc: str = "") -> dict[str, dict[str, Any]]:
    """Measure ``names`` on one GGUF; returns the cache entries (without ``gguf_sha256``)."""
    from tqdm.auto import tqdm

    from app import probe_runner
    from trainer.general_kept import is_right
    from trainer.verify import _GgufSide, _nll_from_logits

    names = [n for n in NAMES if n in names]
    asked = [e for e in sets.regression.items if e.get("expect")]
    total = ((len(asked) if "general_right" in names else 0) + (len(sets.probes.items) if "probe_pass_rate" in names
             else 0) + (2 * len(sets.regression.items) if "regression_loss" in names else 0))
    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=total, desc=desc or Path(gguf).name, unit="item", disable=not progress, file=sys.stderr)

    def done(name: str, fset: FixedSet, started: float, **values: Any) -> None:
        out[name] = {**values, "set": fset.name, "set_hash": fset.hash, "method": sets.method(name),
                     "measured_at": utcnow(), "seconds": round(time.perf_counter() - started, 2)}

    try:
        model = GgufModel.load(gguf, n_ctx=n_ctx, n_threads=n_threads)
        loss_inputs = []
        try:
            if "general_right" in names:
                started = time.perf_counter()
                answers = probe_runner.greedy_answers(model, [e["messages"][:-1] for e in asked],
                                                      max_tokens=sets.answer_tokens)
                right = {e["id"]: is_right(a.answer, e["expect"]) for e, a in zip(asked, answers)}
                bar.update(len(asked))
                n = len(right)
                done("general_right", sets.regression, started, value=sum(right.values()) / n if n else None,
                     right=sum(right.values()), n=n, items=right)
            if "probe_pass_rate" in names:
                started = time.perf_counter()
                answers = probe_runner.greedy_answers(model, [p["messages"] for p in sets.probes.items],
                                                      max_tokens=PROBE_TOKENS)
                passed = [is_right(a.answer, p["expect"]) for p, a in zip(sets.probes.items, answers)]
                bar.update(len(passed))
                n = len(passed)
                done("probe_pass_rate", sets.probes, started, value=sum(passed) / n if n else None,
                     passed=sum(passed), n=n, unchecked=sets.unchecked_probes,
                     items={p["prompt"]: ok for p, ok in zip(sets.probes.items, passed)})
            if "regression_loss" in names:
                started = time.perf_counter()
                for example in sets.regression.items:  # tokenised by the served file's own tokenizer
                    loss_inputs.append(_loss_inputs(model, example["messages"], sets.max_length))
                    bar.update()
        finally:
            model.close()
        if "regression_loss" in names:
            # trainer.verify's side: logits for every position of the given ids (logits_all), sized to the
            # longest example as the verifier sizes it (a 2048-token context would hold 2048 x vocab floats).
            longest = max([len(ids) for ids, _ in loss_inputs] + [1])
            side = _GgufSide(Path(gguf), int(math.ceil((longest + 8) / 256.0) * 256), llama_threads(n_threads))
            total_nll, tokens = 0.0, 0
            try:
                for ids, mask in loss_inputs:
                    nll, count = _nll_from_logits(side.logits(ids), ids, mask)
                    total_nll, tokens = total_nll + nll, tokens + count
                    bar.update()
            finally:
                side.close()
            done("regression_loss", sets.regression, started, value=total_nll / tokens if tokens else None,
                 tokens=tokens, n=len(loss_inputs))
    finally:
        bar.close()
    return out


def measure_version(registry: Registry, vid: str, sets: FixedSets, *, force: bool = False, n_ctx: int = 2048,
                    n_threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure what ``vid`` is missing (everything with ``force``) and cache it; returns what happened:
    ``{"version", "measured", "copied", "cached", "values"}``."""
    with _measure_lock(registry):
        version = registry.get(vid)
        todo = list(NAMES) if force else missing(version, sets)
        report: dict[str, Any] = {"version": vid, "measured": [], "copied": {}, "cached": [n for n in NAMES if n not in todo]}
        entries: dict[str, dict[str, Any]] = {}
        if not force:  # the same bytes were measured under another id: copy, do not run the model again
            for other in registry.list():
                if other.id == vid or other.gguf_sha256 != version.gguf_sha256:
                    continue
                for name in [n for n in todo if n not in entries]:
                    found = valid(other, name, sets)
                    if found:
                        entries[name] = {**found, "copied_from": other.id}
                        report["copied"][name] = other.id
        run = [n for n in todo if n not in entries]
        if run:
            if not version.gguf_path.is_file():
                raise RegistryError(f"version {vid} has no GGUF file at {version.gguf_path}")
            if sha256_file(version.gguf_path) != version.gguf_sha256:
                raise RegistryError(f"version {vid}: GGUF sha256 does not match version.json (file changed on "
                                    "disk); it is not measured")
            for name, value in run_measures(version.gguf_path, sets, run, n_ctx=n_ctx, n_threads=n_threads,
                                            progress=progress, desc=f"{vid} fixed measures").items():
                entries[name] = {**value, "gguf_sha256": version.gguf_sha256}
            report["measured"] = run
        if entries:
            version = _write(registry, vid, entries)
        report["values"] = {n: (valid(version, n, sets) or {}).get("value") for n in NAMES}
        return report


def measure_versions(registry: Registry, ids: list[str], config: LoopConfig, *, sets: FixedSets | None = None,
                     force: bool = False, progress: bool = True,
                     log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """``measure_version`` for each id; a version that cannot be measured gets ``{"version", "error"}``
    and the others are still measured."""
    sets = sets or load_sets(config)
    reports = []
    for vid in dict.fromkeys(ids):  # each once, in the order given
        try:
            reports.append(measure_version(registry, vid, sets, force=force, n_ctx=config.model.n_ctx,
                                           n_threads=config.model.n_threads or None, progress=progress))
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
            reports.append({"version": vid, "error": f"{type(exc).__name__}: {exc}"})
            if log:
                log(f"{vid}: not measured: {exc}")
    return reports


def after_promotion(cycle: Any, promoted: dict[str, Any]) -> list[dict[str, Any]]:
    """The cycle's call once ``promote`` is done: the new version (current or canary) and its parent get
    whatever fixed measures they miss. Never raises: a measure that fails is logged, the cycle goes on."""
    ids = [vid for vid in (promoted.get("version"), promoted.get("parent")) if vid]
    try:
        reports = measure_versions(cycle.registry, ids, cycle.config, progress=False, log=cycle.log)
        for r in reports:
            if r.get("measured") or r.get("copied"):
                cycle.log(f"fixed measures of {r['version']}: " + ", ".join(
                    f"{LABELS[n]} {format_value(n, v)}" for n, v in r["values"].items()))
        return reports
    except Exception as exc:  # noqa: BLE001 - the cycle's outcome never depends on this
        cycle.log(f"fixed measures not taken: {type(exc).__name__}: {exc}")
        return [{"error": f"{type(exc).__name__}: {exc}"}]


# -- reading, for the CLI (the rules are the core's: loop.core.measures) --------------------------------


def scorecard(registry: Registry, vids: list[str], sets: FixedSets, store: Any = None) -> dict[str, dict[str, Any]]:
    """Per version: the fixed measures valid on ``sets`` (None when missing), the canary's thumbs-down
    rate (None when never canaried), the arena rating (None without games) and the gate comparison."""
    from loop.core import arena
    from loop.core.measures import canary_outcomes

    ratings = arena.ratings(store.arena_votes(), versions=vids) if store is not None else {}
    canaries = canary_outcomes(registry.canary_log())
    out = {}
    for vid in vids:
        version = registry.get(vid)
        row: dict[str, Any] = {n: (valid(version, n, sets) or {}).get("value") for n in NAMES}
        row["canary_thumbs_down_rate"] = (canaries.get(vid) or {}).get("rate")
        row["arena_rating"] = ratings[vid]["rating"] if ratings.get(vid, {}).get("games") else None
        row["gate"] = gate_comparison(version)
        out[vid] = row
    return out


EXTRA = ("canary_thumbs_down_rate", "arena_rating")


def fixed_comparison(registry: Registry, a: str, b: str, config: LoopConfig, *, store: Any = None,
                     measure: bool = False) -> dict[str, Any]:
    """``versions compare``'s fixed block: A and B on the fixed measures (``measure``: take missing ones
    first), the canary and arena figures, and each one's gate comparison on its own held-out set."""
    try:
        sets = load_sets(config)
    except ImportError as exc:  # an app-only install has no trainer package and so no fixed sets
        return {"fixed_note": f"no fixed measures: {exc}"}
    if measure:
        measure_versions(registry, [a, b], config, sets=sets, log=lambda msg: print(msg, file=sys.stderr))
    card = scorecard(registry, [a, b], sets, store)
    fixed = {}
    for name in NAMES + EXTRA:
        x, y = card[a][name], card[b][name]
        fixed[name] = {"a": x, "b": y, "delta": (y - x) if x is not None and y is not None else None}
    return {"fixed": fixed, "gate": {vid: card[vid]["gate"] for vid in (a, b)},
            "fixed_missing": {vid: missing(registry.get(vid), sets) for vid in (a, b)},
            "fixed_sets": {"regression": {"set": sets.regression.name, "hash": sets.regression.hash,
                                          "n": len(sets.regression.items)},
                           "probes": {"set": sets.probes.name, "hash": sets.probes.hash,
                                      "checked": len(sets.probes.items), "unchecked": sets.unchecked_probes}}}


def measures_lines(version: Version) -> list[str]:
    """``versions show``'s block: each cached measure with what it was measured on."""
    cached = (version.metrics or {}).get(KEY) or {}
    lines = ["fixed measures:" + ("" if cached else " -")]
    for name, e in sorted(cached.items()):
        if not isinstance(e, dict):
            continue
        where = f"{e.get('set')} {str(e.get('set_hash'))[:12]}, {e.get('measured_at')}"
        if e.get("copied_from"):
            where += f", copied from {e['copied_from']} (same GGUF)"
        if e.get("gguf_sha256") != version.gguf_sha256:
            where += ", of ANOTHER file: not used"
        lines.append(f"  {name:<22} {format_value(name, e.get('value'))}  ({where})")
    return lines
