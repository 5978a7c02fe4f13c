"""Tuning harness for the trainer's defaults: train configurations on a scenario's curated data, score probes.

This is the fast inner loop behind the defaults in trainer/config.py (docs/trainer.md has the figures). It
skips Argilla and GGUF export: the curated examples are built the way the demo's scripted reviewer builds
them (a user's correction is the answer; a thumbs-up answer is kept), split by the real judge
(annotation.judge_split), mixed with replay exactly as a cycle's decide stage mixes them, trained with the
real trainer, then the adapter answers the scenario's held-out probes greedily (transformers), and the
general probes measure what was kept. The whole loop on the served GGUF is benchmarks/scenarios/run.py.

Only scenarios marked "tune" belong here: the unseen ones judge the result and must not choose it.

Usage:
  python benchmarks/learning_sweep.py --scenario zephyr --config "lr=1e-3,rank=16,epochs=3" \\
      --config "lr=1e-3,rank=16,epochs=5" --seeds 0 1 2 [--out sweep.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIELDS = {"lr": ("learning_rate", float), "rank": ("lora_rank", int), "alpha": ("lora_alpha", int),
          "epochs": ("epochs", float), "replay": ("replay_ratio", float), "batch": ("batch_size", int),
          "sched": ("lr_scheduler", str), "warmup": ("warmup_ratio", float), "dropout": ("lora_dropout", float),
          "targets": ("target_modules", str), "neftune": ("neftune_noise_alpha", float),
          "wd": ("weight_decay", float), "tol": ("regression_tolerance", float),
          "kept": ("min_general_kept", float), "best": ("select_best_epoch", lambda v: v.lower() in ("1", "true", "yes"))}


def parse_config(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, value = part.split("=", 1)
        name, kind = FIELDS[key.strip()]
        out[name] = kind(value.strip().replace(";", ","))
    return out


def load_scenario(name: str) -> dict:
    """A scenario file of benchmarks/scenarios/ (see its README for the format)."""
    path = REPO / "benchmarks" / "scenarios" / f"{name}.json"
    return json.loads(path.read_text())


def curated_examples(scenario: dict) -> list[dict]:
    """What the scripted reviewer turns the scenario's chats into (chats without a usable answer are skipped)."""
    out = []
    for i, chat in enumerate(scenario["chats"]):
        fb = chat.get("feedback") or {}
        answer = fb.get("correction") or (chat.get("answer") if fb.get("thumbs") == "up" else None)
        if answer:
            out.append({"id": f"{scenario['name']}-{i:03d}",
                        "messages": chat["messages"] + [{"role": "assistant", "content": answer}]})
    return out


def answer_probes(model, tokenizer, probes: list[dict], max_new_tokens: int = 64) -> list[str]:
    import torch

    answers = []
    for probe in probes:
        ids = tokenizer.apply_chat_template(probe["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


_BASE_GENERAL: dict[str, list[bool]] = {}


def base_general(scenario: dict, base: str) -> list[bool]:
    """Which general probes the base model answers right (once per scenario)."""
    if scenario["name"] not in _BASE_GENERAL:
        from scenarios.checks import passes

        from trainer.evaluate import load_for_eval

        model, tokenizer = load_for_eval(base)
        answers = answer_probes(model, tokenizer, scenario["general_probes"])
        _BASE_GENERAL[scenario["name"]] = [passes(p["check"], a) for p, a in zip(scenario["general_probes"], answers)]
    return _BASE_GENERAL[scenario["name"]]


_SELF_REPLAY: list[dict] = []


def self_replay(config, base: str) -> list[dict]:
    """The general replay prompts answered by the starting model itself (greedy), instead of the shipped answers."""
    if not _SELF_REPLAY:
        from trainer.evaluate import load_for_eval, load_general_replay

        model, tokenizer = load_for_eval(base)
        general = load_general_replay(config)
        answers = answer_probes(model, tokenizer, [{"messages": e["messages"][:-1]} for e in general], 96)
        _SELF_REPLAY.extend({"id": e["id"], "messages": e["messages"][:-1] + [{"role": "assistant", "content": a}]}
                            for e, a in zip(general, answers) if a.strip())
    return list(_SELF_REPLAY)


def run_one(scenario: dict, overrides: dict, seed: int, base: str, work: Path, holdout: str = "judge",
            replay_source: str = "shipped") -> dict:
    from scenarios.checks import passes

    from annotation.judge_split import split_for_judging
    from trainer.config import TrainConfig
    from trainer.data import build_training_set
    from trainer.evaluate import load_for_eval, load_general_replay
    from trainer.train import train

    examples = curated_examples(scenario)
    split = split_for_judging(examples, eval_percent=10, min_held_out=2)
    held_out = [e for e in examples if e["id"] in split.held_out_ids]
    # "none" trains on the judge's examples too: what holding them out costs in recall.
    train_set = examples if holdout == "none" else [e for e in examples if e["id"] not in split.held_out_ids]
    config = replace(TrainConfig(), seed=seed, save_steps=10_000, **overrides)
    general = self_replay(config, base) if replay_source == "self" else load_general_replay(config)
    mixed = build_training_set(train_set, general, config.replay_ratio, seed)
    run_dir = work / f"run-{time.monotonic_ns()}"
    started = time.perf_counter()
    metrics = train(mixed, run_dir, base=base, eval_data=held_out, config=config)
    train_s = time.perf_counter() - started
    model, tokenizer = load_for_eval(run_dir / "adapter", base=base)
    probe_answers = answer_probes(model, tokenizer, scenario["probes"])
    general_answers = answer_probes(model, tokenizer, scenario["general_probes"])
    general_ok = [passes(p["check"], a) for p, a in zip(scenario["general_probes"], general_answers)]
    base_ok = base_general(scenario, base)
    kept = [now for now, before in zip(general_ok, base_ok) if before]
    return {
        "scenario": scenario["name"], "config": overrides,
        "seed": seed, "holdout": holdout, "replay_source": replay_source, "train_examples": len(mixed),
        "held_out": len(held_out), "steps": metrics.get("steps"),
        "eval_loss_start": metrics.get("eval_loss_start"), "eval_loss": metrics.get("eval_loss"),
        "regression_rel": ((metrics["regression_loss"] - metrics["regression_loss_start"])
                           / metrics["regression_loss_start"]) if metrics.get("regression_loss") else None,
        "probe_pass": sum(passes(p["check"], a) for p, a in zip(scenario["probes"], probe_answers))
        / len(scenario["probes"]),
        "general_pass": sum(general_ok) / len(general_ok),
        "general_kept": sum(kept) / len(kept) if kept else None,
        "general_lost": [p["messages"][-1]["content"] for p, now, before in
                         zip(scenario["general_probes"], general_ok, base_ok) if before and not now],
        "train_s": round(train_s, 1),
        "best_epoch": (metrics.get("best_epoch") or {}).get("epoch"),
        "judge_general_kept": metrics.get("general_kept"),
        "epoch_scores": [(r["epoch"], round(r["eval_loss"], 4), round(r["regression_loss"], 4), r.get("general_kept"))
                         for r in metrics.get("epoch_scores") or [] if r.get("eval_loss") is not None
                         and r.get("regression_loss") is not None],
        "answers": list(zip([p["messages"][-1]["content"] for p in scenario["probes"]], probe_answers)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", required=True)
    parser.add_argument("--config", action="append", required=True, help='e.g. "lr=1e-3,rank=16,epochs=3"')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--holdout", choices=["judge", "none"], default="judge",
                        help="none: also train on the judge's held-out examples (measures what holding out costs)")
    parser.add_argument("--replay-source", choices=["shipped", "self"], default="shipped",
                        help="self: replay the general prompts with the starting model's own answers")
    parser.add_argument("--out", default=None, help="append one JSON line per run here")
    args = parser.parse_args(argv)
    from trainer.base_model import resolve_base

    base = resolve_base(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as work:
        for name in args.scenario:
            scenario = load_scenario(name)
            if scenario.get("split") != "tune":
                parser.error(f"{name} is not a tuning scenario: unseen scenarios judge the defaults, never choose them")
            for text in args.config:
                for seed in args.seeds:
                    row = run_one(scenario, parse_config(text), seed, base, Path(work), args.holdout,
                                  args.replay_source)
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
                    if args.out:
                        with open(args.out, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(row) + "\n")
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(f"{row['scenario']} {json.dumps(row['config'])}", []).append(row)
    for key, group in by_config.items():
        probe = [r["probe_pass"] for r in group]
        general = [r["general_pass"] for r in group]
        kept = [r["general_kept"] for r in group if r["general_kept"] is not None]
        print(f"{key}: probe mean {statistics.mean(probe):.2f} min {min(probe):.2f} | general mean "
              f"{statistics.mean(general):.2f} | kept min {min(kept) if kept else float('nan'):.2f} | n={len(group)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
