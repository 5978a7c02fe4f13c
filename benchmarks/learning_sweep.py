"""Tuning harness for the trainer's defaults: train configurations on a scenario's curated data, score probes.

This is the fast inner loop behind the defaults in trainer/config.py (docs/trainer.md has the figures). It
skips Argilla and GGUF export: the curated examples are built the way the demo's scripted reviewer builds
them (a user's correction is the answer; a thumbs-up answer is kept), split by the real judge
(annotation.judge_split), mixed with replay exactly as a cycle's decide stage mixes them, trained with the
real trainer, then the adapter answers the scenario's held-out probes greedily (transformers), and the
general probes measure what was kept. The whole loop on the served GGUF is benchmarks/scenarios/run.py.

Only scenarios marked "tune" belong here: the unseen ones judge the result and must not choose it.

On a GPU (``--device cuda``) every run trains with ``cuda_precision = "fp32"``: float32 weights and padded
batches, the CPU path's arithmetic and steps per epoch, so what a sweep there chooses is what CPU cycles do;
``--jobs N`` runs N trainings at once (one process each). ``--unseen`` lets unseen scenarios in, to report
chosen defaults on them; their rows are marked and must never choose.

Usage:
  python benchmarks/learning_sweep.py --scenario zephyr --config "lr=1e-3,rank=16,epochs=3" \\
      --config "lr=1e-3,rank=16,epochs=5" --seeds 0 1 2 [--out sweep.jsonl] [--device cuda --jobs 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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

def _yes(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


FIELDS = {"lr": ("learning_rate", float), "rank": ("lora_rank", int), "alpha": ("lora_alpha", int),
          "epochs": ("epochs", float), "replay": ("replay_ratio", float), "batch": ("batch_size", int),
          "sched": ("lr_scheduler", str), "warmup": ("warmup_ratio", float), "dropout": ("lora_dropout", float),
          "targets": ("target_modules", str), "neftune": ("neftune_noise_alpha", float), "qdrop": ("question_dropout", float),
          "wd": ("weight_decay", float), "tol": ("regression_tolerance", float),
          "kept": ("min_general_kept", float), "kl": ("kl_weight", float), "greplay": ("general_replay", str),
          "best": ("select_best_epoch", _yes),
          "repochs": ("refit_epochs", float),
          "rlrf": ("refit_learning_rate_factor", float), "obj": ("objective", str),
          "plr": ("preference_learning_rate", float), "beta": ("preference_beta", float),
          "explode": ("loss_explode_factor", float), "pairs": ("pair_share", float),
          "dora": ("use_dora", _yes)}


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


def preference_rows(scenario: dict, logged: list[str]) -> tuple[list[dict], list[dict]]:
    """(pairs, labels) the scripted reviewer's verdicts give (loop.demo.scripted_review, read by
    annotation.pull.preference_signals): a correction is a pair (chosen = the correction, rejected = the logged
    answer) and, rated 2, an undesirable label; a thumbs-up answer, rated 5, a desirable label; a thumbs-down
    without correction, rated 1 under ``thumbs_down_review = "rate_low"``, an undesirable label. ``logged[i]``
    is what chat i's user saw. Ids are ``curated_examples``' so the judge's split holds them out alike."""
    from annotation.judge_split import normalise

    pairs, labels = [], []
    rate_low = scenario.get("thumbs_down_review", "discard") == "rate_low"
    for i, (chat, answer) in enumerate(zip(scenario["chats"], logged)):
        fb, row_id, prompt = chat.get("feedback") or {}, f"{scenario['name']}-{i:03d}", chat["messages"]
        if not answer.strip():
            continue
        if fb.get("correction"):
            if normalise(fb["correction"]) != normalise(answer):
                pairs.append({"id": row_id, "prompt": prompt, "chosen": fb["correction"], "rejected": answer})
            labels.append({"id": row_id, "prompt": prompt, "answer": answer, "label": "undesirable"})
        elif fb.get("thumbs") == "up":
            labels.append({"id": row_id, "prompt": prompt, "answer": answer, "label": "desirable"})
        elif fb.get("thumbs") == "down" and rate_low:
            labels.append({"id": row_id, "prompt": prompt, "answer": answer, "label": "undesirable"})
    return pairs, labels


_LOGGED: dict[str, list[str]] = {}


def logged_answers(scenario: dict, base: str) -> list[str]:
    """What each chat's user saw: the scenario's ``answer``, else the base model's greedy answer (the end-to-end
    runner asks the base GGUF; here transformers answers, as for every other sweep measure)."""
    if scenario["name"] not in _LOGGED:
        missing = [i for i, chat in enumerate(scenario["chats"]) if not chat.get("answer")]
        answers = [chat.get("answer") or "" for chat in scenario["chats"]]
        if missing:
            from loop.core.config import AppConfig

            model, tokenizer = load_model(base)
            generated = answer_probes(model, tokenizer, [scenario["chats"][i] for i in missing],
                                      AppConfig().max_tokens)
            for i, text in zip(missing, generated):
                answers[i] = text
        _LOGGED[scenario["name"]] = answers
    return _LOGGED[scenario["name"]]


def preference_data(scenario: dict, base: str, examples: list[dict], held_out_ids: set[str]):
    """The scenario's PreferenceData, split as a snapshot splits it (annotation.snapshot.split_preferences)."""
    from annotation.snapshot import split_preferences
    from trainer.preference_data import EVAL_LABELS, EVAL_PAIRS, LABELS, PAIRS, PreferenceData

    pairs, labels = preference_rows(scenario, logged_answers(scenario, base))
    texts = split_preferences(pairs, labels, examples, held_out_ids)
    rows = {name: [json.loads(line) for line in text.splitlines() if line.strip()] for name, text in texts.items()}
    return PreferenceData(pairs=rows[PAIRS], labels=rows[LABELS], eval_pairs=rows[EVAL_PAIRS],
                          eval_labels=rows[EVAL_LABELS])


DEVICE = "cpu"


def load_model(model_dir, base: str | None = None):
    """(model, tokenizer) of the trainer's evaluation loader, on the sweep's device."""
    from trainer.evaluate import load_for_eval

    model, tokenizer = load_for_eval(model_dir, base=base)
    return model.to(DEVICE), tokenizer


def answer_probes(model, tokenizer, probes: list[dict], max_new_tokens: int = 64, batch: int = 32) -> list[str]:
    """Greedy answers, `batch` prompts at a time (left-padded; the answers match one-at-a-time decoding up to
    float rounding)."""
    import torch

    prompts = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for p in probes]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        width = max(len(ids) for ids in chunk)
        ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        answers.extend(tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out)
    return answers


_BASE_GENERAL: dict[str, list[bool]] = {}


def base_general(scenario: dict, base: str) -> list[bool]:
    """Which general probes the base model answers right (once per scenario)."""
    if scenario["name"] not in _BASE_GENERAL:
        from scenarios.checks import passes

        model, tokenizer = load_model(base)
        answers = answer_probes(model, tokenizer, scenario["general_probes"])
        _BASE_GENERAL[scenario["name"]] = [passes(p["check"], a) for p, a in zip(scenario["general_probes"], answers)]
    return _BASE_GENERAL[scenario["name"]]


_SELF_REPLAY: dict[str, list[dict]] = {}


def self_replay(config, base: str) -> list[dict]:
    """The general replay prompts answered by the starting model itself (greedy), instead of the shipped answers."""
    if config.general_replay not in _SELF_REPLAY:
        from trainer.evaluate import load_general_replay

        model, tokenizer = load_model(base)
        general = load_general_replay(config)
        answers = answer_probes(model, tokenizer, [{"messages": e["messages"][:-1]} for e in general], 96)
        _SELF_REPLAY[config.general_replay] = [
            {"id": e["id"], "messages": e["messages"][:-1] + [{"role": "assistant", "content": a}]}
            for e, a in zip(general, answers) if a.strip()]
    return list(_SELF_REPLAY[config.general_replay])


def run_one(scenario: dict, overrides: dict, seed: int, base: str, work: Path, holdout: str = "judge",
            replay_source: str = "shipped") -> dict:
    from scenarios.checks import passes

    from annotation.judge_split import split_for_judging
    from trainer.config import TrainConfig
    from trainer.data import build_training_set
    from trainer.evaluate import load_general_replay
    from trainer.train import train

    examples = curated_examples(scenario)
    split = split_for_judging(examples, eval_percent=10, min_held_out=2)
    held_out = [e for e in examples if e["id"] in split.held_out_ids]
    # "none" trains on the judge's examples too: what holding them out costs in recall. "refit" trains the
    # judged run, then refits it as a cycle does (trainer/refit.py) and scores the refit.
    train_set = examples if holdout == "none" else [e for e in examples if e["id"] not in split.held_out_ids]
    config = replace(TrainConfig(), seed=seed, save_steps=10_000, **overrides)
    if DEVICE == "cuda":
        config = replace(config, cuda_precision="fp32")
    general = self_replay(config, base) if replay_source == "self" else load_general_replay(config)
    mixed = build_training_set(train_set, general, config.replay_ratio, seed)
    run_dir = work / f"run-{time.monotonic_ns()}"
    started = time.perf_counter()
    if config.objective == "sft":
        metrics = train(mixed, run_dir, base=base, eval_data=held_out, config=config)
    else:
        from trainer.preference import train_objective
        from trainer.preference_data import PreferenceSkipped

        preference = preference_data(scenario, base, examples, split.held_out_ids)
        try:
            metrics = train_objective(mixed, run_dir, base=base, eval_data=held_out, preference=preference,
                                      config=config)
        except PreferenceSkipped as skipped:
            return {"scenario": scenario["name"], "split": scenario.get("split"), "config": overrides,
                    "seed": seed, "holdout": holdout, "status": "skipped", "reason": str(skipped)}
    judged_epoch = (metrics.get("best_epoch") or {}).get("epoch")
    curves = {"judged": _curve(metrics)}
    refit_used, refit_outcome = False, None
    if holdout == "refit":
        from trainer.data import write_examples
        from trainer.refit import USED, refit_variant
        from trainer.variants import VariantResult

        judged = VariantResult.from_metrics("judged", config, run_dir, metrics)
        mixed_path, held_path = run_dir / "train.jsonl", run_dir / "held_out.jsonl"
        write_examples(mixed_path, mixed)
        write_examples(held_path, held_out)
        refit = refit_variant(judged, mixed_path, held_path, base, run_dir.with_name(run_dir.name + "-refit"), config)
        refit_used, refit_outcome = refit.status == USED, {"status": refit.status, "reason": refit.reason}
        curves["refit"] = _curve(refit.metrics or {})
        if refit_used:
            run_dir, metrics = Path(refit.run_dir), refit.metrics
    train_s = time.perf_counter() - started
    if metrics.get("status") != "ok":
        return {"scenario": scenario["name"], "split": scenario.get("split"), "config": overrides, "seed": seed,
                "holdout": holdout, "status": metrics.get("status"), "reason": metrics.get("reason"),
                "train_s": round(train_s, 1), "loss_curves": curves}
    from trainer.run_report import adapter_subdir

    model, tokenizer = load_model(run_dir / adapter_subdir(metrics), base=base)
    base_ok = base_general(scenario, base)
    by_scale = {str(scale): _scored_at_scale(model, tokenizer, scenario, base_ok, scale, config)
                for scale in SCALES if scale != 1.0}
    _scale_adapter(model, 1.0)
    probe_answers = answer_probes(model, tokenizer, scenario["probes"])
    general_answers = answer_probes(model, tokenizer, scenario["general_probes"])
    general_ok = [passes(p["check"], a) for p, a in zip(scenario["general_probes"], general_answers)]
    kept = [now for now, before in zip(general_ok, base_ok) if before]
    memory = None
    if MEMORY:
        import answer_memory

        index = answer_memory.CorrectionIndex(examples, [e["messages"] for e in load_general_replay(config)])
        memory = answer_memory.measure(scenario, index, lambda asked: answer_probes(model, tokenizer, asked), passes,
                                       probe_answers, general_answers, base_ok)
    return {
        "scenario": scenario["name"], "split": scenario.get("split"), "config": overrides, "device": DEVICE,
        "seed": seed, "holdout": holdout, "replay_source": replay_source, "status": "ok",
        "objective": config.objective, "fallback": metrics.get("fallback"), "train_examples": len(mixed),
        "held_out": len(held_out), "steps": metrics.get("steps"),
        "eval_loss_start": metrics.get("eval_loss_start"), "eval_loss": metrics.get("eval_loss"),
        "regression_rel": ((metrics["regression_loss"] - metrics["regression_loss_start"])
                           / metrics["regression_loss_start"]) if metrics.get("regression_loss") else None,
        "probe_pass": sum(passes(p["check"], a) for p, a in zip(scenario["probes"], probe_answers))
        / len(scenario["probes"]),
        "probe_words": statistics.mean(len(a.split()) for a in probe_answers),
        "preference": metrics.get("preference"),
        "general_pass": sum(general_ok) / len(general_ok),
        "general_kept": sum(kept) / len(kept) if kept else None,
        "general_lost": [p["messages"][-1]["content"] for p, now, before in
                         zip(scenario["general_probes"], general_ok, base_ok) if before and not now],
        "train_s": round(train_s, 1),
        "best_epoch": judged_epoch, "refit": refit_used, "refit_outcome": refit_outcome, "loss_curves": curves,
        "judge_general_kept": metrics.get("general_kept"),
        "epoch_scores": [(r["epoch"], round(r["eval_loss"], 4), round(r["regression_loss"], 4), r.get("general_kept"))
                         for r in metrics.get("epoch_scores") or [] if r.get("eval_loss") is not None
                         and r.get("regression_loss") is not None],
        "by_scale": by_scale, "memory": memory,
        "answers": list(zip([p["messages"][-1]["content"] for p in scenario["probes"]], probe_answers)),
    }


def _curve(metrics: dict) -> list:
    """A run's logged training losses in step order (None where a loss was not finite)."""
    return [loss if loss is None else round(loss, 4) for _, loss in metrics.get("train_loss_curve") or []]


SCALES: list[float] = [1.0]
MEMORY = False  # --memory: also score the corrections at answer time (answer_memory.py)


def _scale_adapter(model, scale: float) -> None:
    """Scale every LoRA update to `scale` times its trained size (weight-space interpolation towards the start)."""
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            originals = module.__dict__.setdefault("_sweep_scaling", dict(scaling))
            for name, value in originals.items():
                scaling[name] = value * scale


def _scored_at_scale(model, tokenizer, scenario: dict, base_ok: list[bool], scale: float, config) -> dict:
    from scenarios.checks import passes

    from trainer.evaluate import load_regression_set
    from trainer.general_kept import KeptProbe

    with model.disable_adapter():
        probe = KeptProbe.build(model, tokenizer, load_regression_set(config))
    _scale_adapter(model, scale)
    probes = answer_probes(model, tokenizer, scenario["probes"])
    general = answer_probes(model, tokenizer, scenario["general_probes"])
    ok = [passes(p["check"], a) for p, a in zip(scenario["general_probes"], general)]
    kept = [now for now, before in zip(ok, base_ok) if before]
    return {"probe_pass": sum(passes(p["check"], a) for p, a in zip(scenario["probes"], probes)) / len(probes),
            "general_kept": sum(kept) / len(kept) if kept else None,
            "judge_general_kept": probe.share(model, tokenizer)}


def _worker(task: tuple) -> dict:
    """One run in a worker process (--jobs): its own torch, its own caches, one CPU thread."""
    global DEVICE
    global SCALES
    global MEMORY
    name, text, seed, base, work, holdout, replay_source, device, scales, memory = task
    DEVICE, SCALES, MEMORY = device, scales, memory
    import torch

    torch.set_num_threads(1)
    return run_one(load_scenario(name), parse_config(text), seed, base, Path(work), holdout, replay_source)


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", required=True)
    parser.add_argument("--config", action="append", required=True, help='e.g. "lr=1e-3,rank=16,epochs=3"')
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--holdout", choices=["judge", "none", "refit"], default="judge",
                        help="none: also train on the judge's held-out examples (measures what holding out costs); refit: "
                             "train the judged run, then refit it as a cycle does, and score the refit")
    parser.add_argument("--replay-source", choices=["shipped", "self"], default="self",
                        help="self (the trainer's default): replay the general prompts with the starting model's own "
                             "answers; shipped: the replay file's answers")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process each")
    parser.add_argument("--unseen", action="store_true",
                        help="let unseen scenarios in, to report chosen defaults on them (never to choose)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="also score each adapter with its update scaled by these factors (by_scale)")
    parser.add_argument("--memory", action="store_true",
                        help="also score the curated corrections retrieved into the prompt, and routing by relevance "
                             "(answer_memory.py)")
    parser.add_argument("--out", default=None, help="append one JSON line per run here")
    args = parser.parse_args(argv)
    from trainer.base_model import resolve_base

    DEVICE = args.device
    base = str(resolve_base(None))
    for name in args.scenario:
        if load_scenario(name).get("split") != "tune" and not args.unseen:
            parser.error(f"{name} is not a tuning scenario: unseen scenarios judge the defaults, never choose them "
                         "(--unseen reports on them)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as work:
        tasks = [(name, text, seed, base, work, args.holdout, args.replay_source, args.device, args.scales,
                  args.memory)
                 for seed in args.seeds for text in args.config for name in args.scenario]  # a cut-off run
        # still has whole seeds
        if args.jobs > 1:
            pool = multiprocessing.get_context("spawn").Pool(args.jobs)
            results = pool.imap_unordered(_worker, tasks)
        else:
            results = map(_worker, tasks)
        for row in results:
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("answers", "loss_curves")}), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue  # printed above with its reason
        by_config.setdefault(f"{row['scenario']} {json.dumps(row['config'])}", []).append(row)
    for key, group in sorted(by_config.items()):
        probe = [r["probe_pass"] for r in group]
        general = [r["general_pass"] for r in group]
        kept = [r["general_kept"] for r in group if r["general_kept"] is not None]
        judge = [r["judge_general_kept"] for r in group if r["judge_general_kept"] is not None]
        print(f"{key}: probe mean {statistics.mean(probe):.2f} min {min(probe):.2f} | general mean "
              f"{statistics.mean(general):.2f} | kept min {min(kept) if kept else float('nan'):.2f} | "
              f"regression-set kept mean {statistics.mean(judge) if judge else float('nan'):.2f} | n={len(group)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
