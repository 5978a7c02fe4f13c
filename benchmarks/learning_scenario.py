"""Does the loop learn? One real cycle on the shipped scenario, measured on questions it never saw.

The scenario (loop/scenario/): users ask about a fictional product (the "Zephyr Z3" kettle), the
base model answers wrongly, users correct it, a scripted reviewer accepts the corrections in Argilla.
One cycle of the real loop then trains, gates (with the real 5% regression tolerance) and promotes.

Measured, side by side in one run, base (v1) vs promoted version, both as the served GGUF:
  - fact accuracy on HELD-OUT questions: two wordings per fact that appear nowhere in the
    training data (an answer counts when it contains the fact's keyword), greedy decoding;
  - the general-ability regression loss (trainer/regression_set.jsonl) from the gate's numbers.

Usage: python benchmarks/learning_scenario.py [--keep HOME] [--json]
Runs in a fresh temporary LOOP_HOME with its own local Argilla stack on free ports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FACTS = REPO / "loop" / "scenario" / "zephyr_facts.jsonl"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def fact_accuracy(gguf: Path, facts: list[dict]) -> tuple[float, list[dict]]:
    from loop.probe_runner import greedy_answer, load_llama

    llm = load_llama(gguf, n_ctx=1024)
    rows = []
    for fact in facts:
        for question in fact["heldout_questions"]:
            answer = greedy_answer(llm, [{"role": "user", "content": question}], max_tokens=48).answer
            hit = any(k.lower() in answer.lower() for k in fact["keywords"])
            rows.append({"fact": fact["fact"], "question": question, "answer": answer, "correct": hit})
    return sum(r["correct"] for r in rows) / len(rows), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="use (and keep) this LOOP_HOME instead of a temporary one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    home = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="learning-scenario-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["LOOP_HOME"] = str(home)
    os.environ.setdefault("LOOP_TOOLS", str(REPO / ".loop" / "tools"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    port, search, redis = free_ports(3)
    os.environ.update({"LOOP_STACK__PORT": str(port), "LOOP_STACK__SEARCH_PORT": str(search),
                       "LOOP_STACK__REDIS_PORT": str(redis)})
    facts = [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]
    train_questions = {q for f in facts for q in f["train_questions"]}
    assert not train_questions & {q for f in facts for q in f["heldout_questions"]}, "held-out leaks into training"

    from annotation.server import stop_stack
    from loop import demo
    from loop.registry import Registry

    t0 = time.perf_counter()
    try:
        code = demo.main(["--no-app"])
    finally:
        stop_stack()
    cycle_s = time.perf_counter() - t0
    registry = Registry()
    versions = registry.list()
    base, current = versions[0], registry.current()
    base_acc, base_rows = fact_accuracy(base.gguf_path, facts)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "demo_exit": code,
        "demo_seconds": round(cycle_s, 1),
        "promoted": current.id != base.id,
        "current": current.id,
        "heldout_questions": len(base_rows),
        "base_fact_accuracy": base_acc,
    }
    if current.id != base.id:
        cur_acc, cur_rows = fact_accuracy(current.gguf_path, facts)
        gate_current = current.metrics.get("current_at_gate", {})
        reg_base, reg_new = gate_current.get("regression_loss"), current.metrics.get("regression_loss")
        result.update(
            promoted_fact_accuracy=cur_acc,
            regression_loss_base=reg_base,
            regression_loss_promoted=reg_new,
            regression_rel_change=(reg_new - reg_base) / reg_base if reg_base and reg_new else None,
            variant=current.variant,
            answers=[{"question": b["question"], "base": b["answer"], "promoted": c["answer"]}
                     for b, c in zip(base_rows, cur_rows)],
        )
    else:
        cycles = sorted((home / "cycles").glob("*/state.json"))
        state = json.loads(cycles[-1].read_text()) if cycles else {}
        result["not_promoted_because"] = state.get("reason")
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
