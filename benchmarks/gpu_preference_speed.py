"""GPU training speed of the preference objectives (DPO, KTO) next to SFT, through the trainer's own builders.

Run on a CUDA machine (figures recorded in benchmarks/RESULTS.md):

    python -m benchmarks.gpu_preference_speed suite --out OUTDIR            # QLoRA, then bf16, one GPU
    python -m benchmarks.gpu_preference_speed worker --precision qlora --objectives dpo,kto --out r.jsonl
    python -m benchmarks.gpu_preference_speed report OUTDIR/results.jsonl
    python -m benchmarks.gpu_preference_speed dry-run --out r.jsonl        # CPU: tiny architecture, 2 steps each

What runs is what a cycle runs: `trainer.preference.build_preference_trainer` (TRL's DPOTrainer / KTOTrainer as
the project configures them: a fresh LoRA, the starting weights as the reference through PEFT's disabled adapter,
padded batches of `TrainConfig.batch_size`) and `trainer.train.build_trainer` for SFT (on CUDA with the fast path
of `trainer/cuda_fast.py`: packed token-sized micro-batches; `sft-padded` is the same with `LOOP_CUDA_FAST=0`,
padded batches of `batch_size` examples like the preference trainers). The model is loaded by the trainer's own
`_load_model` from a saved directory: `TrainConfig.cuda_precision` "qlora" (the default: NF4 4-bit base,
bf16 compute) or "bf16". Everything else is TrainConfig's default (LoRA r=16, alpha 32, dropout 0.05, all linear
layers, batch 4, max_length 512, lr 1e-3, no gradient checkpointing, beta 0.1) except the run length and
checkpoints (none). The trainers' divergence guard is removed: on random weights SFT's first loss is ln(vocab),
which the guard rightly calls a collapsed model.

Model: the Llama-3.2-1B architecture randomly initialised (no weights can be fetched; throughput and memory
depend on shapes and lengths, not on the weights' values). Data: synthetic token ids, prompts ~200 tokens
(normal, sd 40, 100-300), answers ~200 (sd 50, at least 40, prompt + answer <= max_length, so nothing is cut);
chosen answers follow a fixed random bigram process, rejected ones are uniform tokens; KTO labels alternate
desirable (the chosen answer) and undesirable (the rejected one); SFT trains on prompt + chosen.

Counted from the batches the model received, steady state only (the first `--warmup` optimizer steps skipped, the
clock read after a device synchronisation at both ends): real tokens = non-padding tokens of the sequences the loss
trains on (DPO: chosen and rejected, each with its prompt; KTO: the labelled answers with their prompts; SFT: the
examples), `forward_tokens` = every token a forward pass computed (DPO: the reference pass over both again; KTO:
the policy's KL pass over the mismatched answers and the reference's two passes), optimizer steps/s and
torch.cuda.max_memory_allocated over the run (weights included).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_train_speed import ARCHS, emit_report, env_info, release_memory

OBJECTIVES = ("dpo", "kto", "sft-padded", "sft")  # sft (the fast path, Liger patches modules) last
SPECIAL_BOS, SPECIAL_USER, SPECIAL_ASSISTANT, SPECIAL_EOS = 1, 2, 3, 4
BASE_TOKEN, SUBVOCAB, SUCCESSORS = 16, 8000, 8


# -------------------------------------------------------------------------------------------------------- data
def make_rows(n: int, vocab: int, seed: int = 0, prompt_mean: int = 200, answer_mean: int = 200,
              max_length: int = 512) -> list[dict]:
    """`n` preference pairs in TRL's tokenised form: {"prompt_ids", "chosen_ids", "rejected_ids"}."""
    sub = min(SUBVOCAB, vocab - BASE_TOKEN)
    table = random.Random(1234)
    successors = [[table.randrange(sub) + BASE_TOKEN for _ in range(SUCCESSORS)] for _ in range(sub)]
    rng = random.Random(seed)

    def length(mean: int, sd: float, low: int, high: int) -> int:
        return max(low, min(high, int(rng.gauss(mean, sd))))

    def chosen(n_tokens: int) -> list[int]:
        tok, out = rng.randrange(sub) + BASE_TOKEN, []
        for _ in range(n_tokens - 1):
            out.append(tok)
            tok = successors[tok - BASE_TOKEN][rng.randrange(SUCCESSORS)]
        return out + [SPECIAL_EOS]

    def rejected(n_tokens: int) -> list[int]:
        return [rng.randrange(sub) + BASE_TOKEN for _ in range(n_tokens - 1)] + [SPECIAL_EOS]

    rows = []
    for _ in range(n):
        p = length(prompt_mean, prompt_mean / 5, prompt_mean // 2, prompt_mean * 3 // 2)
        room = max_length - p
        low = min(answer_mean // 5, room)
        prompt = [SPECIAL_BOS, SPECIAL_USER] + [rng.randrange(sub) + BASE_TOKEN for _ in range(p - 3)]
        rows.append({"prompt_ids": prompt + [SPECIAL_ASSISTANT],
                     "chosen_ids": chosen(length(answer_mean, answer_mean / 4, low, room)),
                     "rejected_ids": rejected(length(answer_mean, answer_mean / 4, low, room))})
    return rows


def kto_rows(pairs: list[dict]) -> list[dict]:
    """Half desirable (the chosen answer), half undesirable (the rejected one), alternating."""
    return [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"] if i % 2 == 0 else r["rejected_ids"],
             "label": i % 2 == 0} for i, r in enumerate(pairs)]


def sft_rows(pairs: list[dict]) -> list[dict]:
    """Prompt + chosen answer, the prompt masked out of the loss (what trainer/data.py produces)."""
    return [{"input_ids": r["prompt_ids"] + r["chosen_ids"],
             "labels": [-100] * len(r["prompt_ids"]) + r["chosen_ids"]} for r in pairs]


def data_stats(pairs: list[dict]) -> dict:
    def mean(values):
        return round(sum(values) / len(values), 1)

    return {"n": len(pairs), "prompt_mean": mean([len(r["prompt_ids"]) for r in pairs]),
            "chosen_mean": mean([len(r["chosen_ids"]) for r in pairs]),
            "rejected_mean": mean([len(r["rejected_ids"]) for r in pairs])}


# ------------------------------------------------------------------------------------------------------ worker
def save_random_model(arch: str, cache_dir: Path) -> Path:
    """The architecture, randomly initialised, saved once (bf16 on CUDA, float32 on CPU) for `_load_model`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cuda = torch.cuda.is_available()
    path = Path(cache_dir) / f"{arch}-random-{'bf16' if cuda else 'fp32'}"
    if not (path / "config.json").exists():
        torch.manual_seed(1234)
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**ARCHS[arch]),
                                                     dtype=torch.bfloat16 if cuda else torch.float32)
        model.save_pretrained(path)
        del model
        gc.collect()
    return path


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _batch_counts(objective: str, inputs: dict):
    """(slots, non-padding, real tokens, forward tokens, sequences) of one micro-batch, as tensors (no host
    sync); KTO's slots and non-padding include its KL answers."""
    import torch

    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        real = inputs["attention_mask"].sum()
    elif "cu_seq_lens_q" in inputs:  # packed rows: no padding computed
        real = inputs["cu_seq_lens_q"][-1].to(torch.long)
    else:
        real = torch.tensor(ids.numel())
    sequences = int(inputs["cu_seq_lens_q"].numel() - 1) if "cu_seq_lens_q" in inputs else ids.shape[0]
    slots, nonpad, forward = ids.numel(), real, real
    if objective == "dpo":  # policy and reference over [chosen; rejected]
        forward = 2 * real
    elif objective == "kto":  # policy: labelled + KL answers; reference: both again
        kl = inputs["KL_attention_mask"].sum() if "KL_attention_mask" in inputs else 0
        nonpad, forward = real + kl, 2 * (real + kl)
        slots += inputs["KL_input_ids"].numel() if "KL_input_ids" in inputs else 0
    return slots, nonpad, real, forward, sequences


def run_objective(objective: str, precision: str, arch: str, base_path: Path, pairs: list[dict], steps: int,
                  warmup: int, batch_size: int, max_length: int, out_dir: Path) -> dict:
    """One objective's timed steps; `out_dir` is the Trainer's scratch directory (the caller removes it)."""
    import torch
    from transformers import TrainerCallback

    from benchmarks.gpu_data import tokenizer_stub
    from trainer import cuda_fast
    from trainer.config import TrainConfig
    from trainer.preference import build_preference_trainer
    from trainer.train import build_trainer

    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stage = "sft" if objective.startswith("sft") else objective
    config = TrainConfig(objective="sft" if stage == "sft" else stage, max_steps=steps, save_steps=10**6,
                         batch_size=batch_size, max_length=max_length, cuda_precision=precision,
                         select_best_epoch=False)
    tokenizer = tokenizer_stub()
    cuda_fast.disable_fused_lora()
    cuda_fast.LAST_APPLIED = []
    t_setup = time.perf_counter()
    with _env("LOOP_CUDA_FAST", "0" if objective == "sft-padded" else None):
        if stage == "sft":
            trainer, guard = build_trainer(str(base_path), tokenizer, sft_rows(pairs), [], out_dir, config)
        else:
            rows = pairs if stage == "dpo" else kto_rows(pairs)
            trainer, guard = build_preference_trainer(stage, str(base_path), None, tokenizer, rows, out_dir, config)
    trainer.remove_callback(guard)  # random weights: SFT's first loss is ln(vocab), which the guard stops
    setup_s = time.perf_counter() - t_setup

    stats, timing = [], {}
    original_step = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):
        stats.append(_batch_counts(stage, inputs))
        return original_step(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step

    def mark(step: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        timing[step] = time.perf_counter()

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if warmup == 0:
                mark(0)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, state.max_steps):
                mark(state.global_step)

    trainer.add_callback(Timer())
    trainer.train()
    done = trainer.state.global_step
    if warmup not in timing or done not in timing or done <= warmup:
        raise RuntimeError(f"too few steps ({done}) for {warmup} warm-up steps")
    seconds = timing[done] - timing[warmup]
    measured = stats[warmup:done]  # grad_accum = 1: one micro-batch per optimizer step
    slots, nonpad, real, forward = (sum(float(m[i]) for m in measured) for i in range(4))
    sequences = sum(m[4] for m in measured)
    logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row = {
        "objective": objective, "precision": precision if cuda else "fp32 (cpu)", "arch": arch, "steps": done,
        "warmup_steps": warmup, "measured_s": round(seconds, 3), "real_tokens_per_s": real / seconds,
        "forward_tokens_per_s": forward / seconds, "steps_per_s": (done - warmup) / seconds,
        "sequences_per_step": sequences / len(measured), "real_tokens_per_step": real / len(measured),
        "padding_share": 1 - nonpad / slots if slots else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "batch_size": trainer.args.per_device_train_batch_size, "max_length": max_length,
        "gradient_checkpointing": bool(getattr(trainer.args, "activation_checkpointing", None)
                                       or trainer.args.gradient_checkpointing),
        "fast_path": list(cuda_fast.LAST_APPLIED), "learning_rate": trainer.args.learning_rate,
        "loss_first": logs[0] if logs else None, "loss_last": logs[-1] if logs else None,
        "setup_s": round(setup_s, 1), "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    del trainer, guard
    release_memory()
    return row


def worker(ns) -> list[dict]:
    import torch

    pairs = make_rows(ns.n_pairs, ARCHS[ns.arch]["vocab_size"], seed=1, prompt_mean=ns.prompt_mean,
                      answer_mean=ns.answer_mean, max_length=ns.max_length)
    base_path = save_random_model(ns.arch, Path(ns.cache_dir))
    rows = []
    for objective in ns.objectives.split(","):
        if objective not in OBJECTIVES:
            raise SystemExit(f"unknown objective {objective!r}; choose from {OBJECTIVES}")
        steps = ns.sft_steps if objective == "sft" else ns.steps
        try:
            with tempfile.TemporaryDirectory(prefix=f"pref-bench-{objective}-") as out_dir:
                row = run_objective(objective, ns.precision, ns.arch, base_path, pairs, steps, ns.warmup,
                                    ns.batch_size, ns.max_length, Path(out_dir))
            row["data"] = data_stats(pairs)
        except Exception as exc:  # noqa: BLE001 - one failing objective must not lose the others
            import traceback

            traceback.print_exc()
            row = {"objective": objective, "precision": ns.precision, "arch": ns.arch,
                   "error": f"{type(exc).__name__}: {exc}"}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        with open(ns.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("RESULT", json.dumps({k: v for k, v in row.items() if k != "data"}), flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------- suite
def suite(ns) -> None:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    deadline = time.perf_counter() + ns.budget_s
    info = env_info(out, ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger-kernel", "datasets"),
                    gpus=False)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
           "PYTHONUNBUFFERED": "1"}
    for precision in ns.precisions.split(","):
        left = deadline - time.perf_counter()
        if left < 45:
            print(f"budget spent; {precision} skipped", flush=True)
            continue
        cmd = [sys.executable, "-m", "benchmarks.gpu_preference_speed", "worker", "--precision", precision,
               "--arch", ns.arch, "--objectives", ns.objectives, "--n-pairs", str(ns.n_pairs),
               "--steps", str(ns.steps), "--sft-steps", str(ns.sft_steps), "--warmup", str(ns.warmup),
               "--out", str(results), "--cache-dir", ns.cache_dir]
        started, log_path = time.perf_counter(), out / f"worker-{precision}.log"
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=int(left)).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        print(f"[rc={rc}] {time.perf_counter() - started:.0f}s worker {precision} (log: {log_path.name})", flush=True)
        lines = log_path.read_text(errors="replace").splitlines()
        shown = [line for line in lines if line.startswith(("RESULT", "CUDA fast path")) or "Error" in line]
        print("\n".join(shown[-20:] + ([] if rc == 0 else lines[-25:])), flush=True)
    if results.exists():
        report(results, info, out / "report.md")


# -------------------------------------------------------------------------------------------------------- report
def report(results: Path, info: dict | None = None, dest: Path | None = None) -> str:
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    lines = [f"device: {(info or {}).get('device', rows[0].get('device', '?') if rows else '?')}", "",
             "| objective | precision | real tok/s | forward tok/s | steps/s | seqs/step | real tok/step | "
             "padding | peak GiB | loss first→last |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['objective']} | {r['precision']} | error: {r['error'][:150]} |")
            continue
        pad = "-" if r.get("padding_share") is None else f"{100 * r['padding_share']:.1f}%"
        peak = "-" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(
            f"| {r['objective']} | {r['precision']} | {r['real_tokens_per_s']:,.0f} | "
            f"{r['forward_tokens_per_s']:,.0f} | {r['steps_per_s']:.2f} | {r['sequences_per_step']:.1f} | "
            f"{r['real_tokens_per_step']:,.0f} | {pad} | {peak} | {r['loss_first']:.3f}→{r['loss_last']:.3f} |")
    return emit_report(lines, dest)


def _add_run_args(p: argparse.ArgumentParser, *, steps: int, sft_steps: int, warmup: int, n_pairs: int) -> None:
    p.add_argument("--arch", default="llama1b", choices=sorted(ARCHS))
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--n-pairs", type=int, default=n_pairs)
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps of dpo, kto and sft-padded")
    p.add_argument("--sft-steps", type=int, default=sft_steps, help="optimizer steps of sft (larger steps)")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "pref-bench-models"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    _add_run_args(w, steps=16, sft_steps=12, warmup=3, n_pairs=1024)
    w.add_argument("--precision", default="qlora", choices=["qlora", "bf16"])
    w.add_argument("--batch-size", type=int, default=4)
    w.add_argument("--max-length", type=int, default=512)
    w.add_argument("--prompt-mean", type=int, default=200)
    w.add_argument("--answer-mean", type=int, default=200)
    w.add_argument("--out", default="gpu_preference.jsonl")
    s = sub.add_parser("suite")
    _add_run_args(s, steps=16, sft_steps=12, warmup=3, n_pairs=1024)
    s.add_argument("--out", required=True)
    s.add_argument("--precisions", default="qlora,bf16")
    s.add_argument("--budget-s", type=int, default=400)
    d = sub.add_parser("dry-run", help="CPU: the tiny architecture, 2 steps of each objective, short sequences")
    d.add_argument("--out", required=True)
    d.add_argument("--objectives", default=",".join(OBJECTIVES))
    r = sub.add_parser("report")
    r.add_argument("results")
    ns = p.parse_args(argv)
    if ns.cmd == "worker":
        worker(ns)
    elif ns.cmd == "suite":
        suite(ns)
    elif ns.cmd == "dry-run":
        with tempfile.TemporaryDirectory(prefix="pref-bench-dry-") as cache_dir:
            worker(argparse.Namespace(arch="tiny", objectives=ns.objectives, n_pairs=16, steps=2, sft_steps=2,
                                      warmup=0, precision="qlora", batch_size=4, max_length=64, prompt_mean=24,
                                      answer_mean=24, out=ns.out, cache_dir=cache_dir))
    else:
        report(Path(ns.results))


if __name__ == "__main__":
    main()
