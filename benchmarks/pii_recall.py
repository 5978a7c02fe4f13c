"""Recall and precision of the privacy scrub on a labelled PII set, and its cost per record.

    python benchmarks/pii_recall.py [--data benchmarks/pii_labelled.jsonl] [--ner-model auto|none|NAME] [--json]

``pii_labelled.jsonl`` holds one string per line: ``{"text": ..., "pii": [{"start", "end", "type", "value"}]}``,
where ``type`` is a scrub kind (``annotation.scrub.KINDS``); lines with ``"pii": []`` are PII-free negatives
that must come back unchanged. Scored with every kind switched on:

  * recall: a labelled span counts as caught when replaced spans cover every one of its characters
    (whatever placeholder they used: the reader sees no PII); ``typed`` recall also wants the right kind;
  * precision: a replaced span is correct when it overlaps a labelled span, wrong otherwise (it hid
    text that was not PII); per kind, a replaced span of kind K is correct when it overlaps a span
    labelled K;
  * negatives changed: PII-free strings whose text the scrub altered (target 0);
  * time: per string (p50/p95/max), and per push record (a 4-message conversation, an answer, a
    comment and a correction, about 2,500 characters, as ``annotation.schema.build_record`` scrubs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from annotation import scrub as scrub_module  # noqa: E402
from annotation.scrub import KINDS, Scrubber  # noqa: E402

DATA = Path(__file__).resolve().parent / "pii_labelled.jsonl"

RECORD_TEXTS = [
    "You are a helpful, concise assistant.",
    "My laptop will not connect to the VPN since this morning. I tried restarting it twice and reinstalling "
    "the client; the log says the handshake timed out after 30 seconds. " * 3
    + "You can reach me at kim.lee@example.com or +1 415 555 2671.",
    "Have you checked whether the VPN server's certificate expired? Open the client, go to Settings > "
    "Certificates and look at the expiry date. If it has expired, ask IT for a new profile. " * 4,
    "It says the certificate is valid until 2027. The server is 203.0.113.9 if that helps.",
    "The handshake timing out usually means a firewall drops UDP 500/4500. Try switching the client to "
    "TCP 443 under Settings > Protocol, then reconnect and check the log again. " * 5,
    "Too vague, and it ignored that I already reinstalled.",
    "Ask for the client log first, then suggest switching to TCP 443; our firewall (see ticket ACME-4411) "
    "blocks UDP from home networks. Password for the test account is not needed: use password: Test-1234 only "
    "on the staging VPN. " * 2,
]


def load(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for span in row["pii"]:
                if row["text"][span["start"]:span["end"]] != span["value"]:
                    raise SystemExit(f"{path}:{n}: span {span} does not match the text")
                if span["type"] not in KINDS:
                    raise SystemExit(f"{path}:{n}: unknown type {span['type']!r}; known: {', '.join(KINDS)}")
            rows.append(row)
    return rows


def evaluate(rows: list[dict], scrubber: Scrubber) -> dict:
    gold_n, caught, typed = Counter(), Counter(), Counter()
    pred_n, pred_ok = Counter(), Counter()
    pred_total = pred_total_ok = 0
    negatives = negatives_changed = 0
    misses, false_hits, times = [], [], []
    for row in rows:
        text, gold = row["text"], row["pii"]
        t0 = time.perf_counter()
        spans = scrubber.find(text)
        out = scrubber.text(text)
        times.append(time.perf_counter() - t0)
        covered = [False] * len(text)
        for s, e, _ in spans:
            covered[s:e] = [True] * (e - s)
        for g in gold:
            gold_n[g["type"]] += 1
            if all(covered[g["start"]:g["end"]]):
                caught[g["type"]] += 1
                if any(k == g["type"] and s < g["end"] and e > g["start"] for s, e, k in spans):
                    typed[g["type"]] += 1
            else:
                misses.append({"type": g["type"], "value": g["value"], "text": text, "output": out})
        for s, e, k in spans:
            pred_n[k] += 1
            pred_total += 1
            overlapping = [g for g in gold if s < g["end"] and e > g["start"]]
            pred_total_ok += bool(overlapping)
            pred_ok[k] += any(g["type"] == k for g in overlapping)
            if not overlapping:
                false_hits.append({"kind": k, "value": text[s:e], "text": text})
        if not gold:
            negatives += 1
            negatives_changed += out != text
    per_kind = {
        k: {"labelled": gold_n[k], "caught": caught[k], "recall": _ratio(caught[k], gold_n[k]),
            "typed_recall": _ratio(typed[k], gold_n[k]), "replaced": pred_n[k], "precision": _ratio(pred_ok[k], pred_n[k])}
        for k in KINDS if gold_n[k] or pred_n[k]
    }
    total = sum(gold_n.values())
    no_name = total - gold_n["name"]
    return {
        "strings": len(rows), "labelled_spans": total, "negatives": negatives, "negatives_changed": negatives_changed,
        "recall": _ratio(sum(caught.values()), total),
        "recall_without_names": _ratio(sum(caught.values()) - caught["name"], no_name),
        "typed_recall": _ratio(sum(typed.values()), total),
        "precision": _ratio(pred_total_ok, pred_total),
        "per_kind": per_kind, "misses": misses, "false_hits": false_hits,
        "per_string_ms": _percentiles(times),
    }


def per_record_ms(scrubber: Scrubber, rounds: int = 30) -> dict:
    times = []
    for _ in range(rounds):
        scrub_module._phone_numbers_in.cache_clear()  # a new record's numbers are not cached
        t0 = time.perf_counter()
        for text in RECORD_TEXTS:
            scrubber.text(text)
        times.append(time.perf_counter() - t0)
    return {**_percentiles(times), "chars": sum(len(t) for t in RECORD_TEXTS)}


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _percentiles(seconds: list[float]) -> dict:
    ms = sorted(t * 1000 for t in seconds)
    return {"p50": round(statistics.median(ms), 2), "p95": round(ms[int(0.95 * (len(ms) - 1))], 2), "max": round(ms[-1], 2)}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict) -> str:
    lines = [
        "| kind | labelled | caught | recall | right kind | replaced | precision |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in result["per_kind"].items():
        lines.append(f"| {k} | {v['labelled']} | {v['caught']} | {_pct(v['recall'])} | {_pct(v['typed_recall'])} | "
                     f"{v['replaced']} | {_pct(v['precision'])} |")
    lines.append(f"| **all** | {result['labelled_spans']} | | **{_pct(result['recall'])}** | {_pct(result['typed_recall'])} | "
                 f"| **{_pct(result['precision'])}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--ner-model", default="auto", help="spaCy pipeline for names: auto (first installed), none, or a name/path")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args(argv)
    rows = load(args.data)
    scrubber = Scrubber(ner_model=None if args.ner_model == "none" else args.ner_model)
    t0 = time.perf_counter()
    scrubber.text("warm-up: build the analyzer once (jane@example.org)")
    warmup_s = time.perf_counter() - t0
    result = evaluate(rows, scrubber)
    result.update({
        "ner_model": scrubber.ner_model, "first_call_s": round(warmup_s, 2), "per_record_ms": per_record_ms(scrubber),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    })
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(markdown(result))
    print(f"\nstrings {result['strings']} ({result['negatives']} PII-free, {result['negatives_changed']} of them changed); "
          f"recall without names {_pct(result['recall_without_names'])}; NER model: {result['ner_model']}")
    print(f"per string {result['per_string_ms']} ms; per record {result['per_record_ms']} ms; first call {warmup_s:.2f} s")
    for m in result["misses"]:
        print(f"MISSED {m['type']}: {m['value']!r} in {m['text']!r} -> {m['output']!r}")
    for f in result["false_hits"]:
        print(f"FALSE {f['kind']}: {f['value']!r} in {f['text']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
