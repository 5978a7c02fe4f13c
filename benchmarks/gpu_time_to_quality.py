"""GPU time to quality: seconds of training until the held-out loss first reaches the TRL + PEFT baseline's.

    python -m benchmarks.gpu_time_to_quality suite --out OUTDIR [--plan main]   # both architectures, one call
    python -m benchmarks.gpu_time_to_quality worker --arch llama1b --configs baseline,default --out r.jsonl
    python -m benchmarks.gpu_time_to_quality report OUTDIR/results.jsonl

Tokens per second is not what a user waits for: a configuration that runs 6x faster per token but takes 4x fewer
optimizer steps can end an epoch further from the data. This benchmark measures the wall-clock time, from the call
of `trainer.train()` (so data loading, optimizer set-up, kernel autotuning and the first steps are included), until
the held-out loss first reaches the target: 99% of the loss reduction of the TRL + PEFT defaults baseline trained on
the same data in the same process just before (target = final + 0.01 x (start - final)). Why not its final loss
exactly: the curves flatten at the end and bf16 runs of identical batches differ in the third decimal (the padded
baseline and the padding-free run of its exact batches end 0.001 apart), so "exactly the final loss" is a photo
finish decided by noise; the time to the final loss itself is recorded too. The held-out loss is evaluated every
few optimizer steps (about `--evals` times per run) with the same padded evaluation for every configuration
(`benchmarks.gpu_train_speed.eval_loss`: padded batches, plain forward, token-weighted cross-entropy over the
answer tokens, the quantity `trainer/evaluate.py` computes; that function itself needs chat messages and a chat
tokenizer, and these rows are pre-tokenised); the clock is stopped while it runs.

Models, data, baseline and the MFU convention are those of `benchmarks/gpu_train_speed.py` (random weights of the
architectures' configs, synthetic chat examples with a learnable answer process, `SFTConfig()` + LoRA r=16 on all
linear layers, learning rate 2e-4, one epoch). Every configuration trains one epoch of the same rows; one that has
not reached the target by its end is reported as not reached, with its final loss.
A CPU dry run: `LOOP_CUDA_FAST=force python -m benchmarks.gpu_time_to_quality worker --arch tiny --n-train 32`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.gpu_train_speed import (
    ARCHS,
    LORA_RANK,
    _run,
    emit_report,
    env_info,
    eval_loss,
    matmul_peak,
    release_memory,
    sft_setup,
    stat_totals,
)

NS = SimpleNamespace
# name -> the config object handed to cuda_fast.apply (None: the baseline, apply is not called). Fields not set
# take cuda_fast's defaults, so "default" is exactly what the trainer does on a GPU without any setting.
CONFIGS = {
    "baseline": None,
    "default": NS(),
    "fast-16k": NS(tokens_per_microbatch=16384),  # the earlier default: 16k tokens, learning rate as configured
    "fast-4k": NS(tokens_per_microbatch=4096),  # about the baseline's examples per step
    "fast-8k": NS(tokens_per_microbatch=8192),
    "mem-sqrt": NS(fast_min_steps=0, fast_lr_scaling="sqrt"),  # sized from memory (16k), lr x sqrt(ratio)
    "mem-linear": NS(fast_min_steps=0, fast_lr_scaling="linear"),  # sized from memory, lr x ratio
    "steps64": NS(fast_min_steps=64, fast_lr_scaling="none"),  # sized from the data, lr as configured
    "steps64-sqrt": NS(fast_min_steps=64, fast_lr_scaling="sqrt"),
    "steps32-sqrt": NS(fast_min_steps=32, fast_lr_scaling="sqrt"),
    "steps32-linear": NS(fast_min_steps=32, fast_lr_scaling="linear"),
    "steps64-linear": NS(fast_min_steps=64, fast_lr_scaling="linear"),
    "mem-sqrt-warmup": NS(fast_min_steps=0, fast_lr_scaling="sqrt"),
}
CONFIG_EXTRA = {"mem-sqrt-warmup": {"warmup_steps": 0.1}}


TOLERANCE = 0.01  # the target is 99% of the baseline's loss reduction


def run_config(name: str, arch: str, n_train: int, n_eval: int, max_length: int, evals: int,
               target: tuple[float, float] | None, peak_tflops: float | None) -> dict:
    """One configuration's run. `target`: (baseline's final loss, target loss); None for the baseline itself."""
    import torch
    from transformers import TrainerCallback

    from benchmarks.gpu_flops import step_flops
    from trainer import cuda_fast

    fast_cfg = CONFIGS[name]
    setup = sft_setup(arch, "none", n_train, n_eval, max_length, Path(tempfile.gettempdir()), fast_cfg,
                      f"ttq-{name}-", CONFIG_EXTRA.get(name, {}))
    cuda, model, args, checkpointing, stats = setup.cuda, setup.model, setup.args, setup.checkpointing, setup.stats
    eval_rows = setup.eval_rows

    def sync():
        if cuda:
            torch.cuda.synchronize()

    clock = {"start": 0.0, "paused": 0.0}
    curve = []  # (step, training seconds so far, held-out loss)

    class Evaluate(TrainerCallback):
        every = 1

        def on_train_begin(self, args, state, control, **kwargs):
            Evaluate.every = max(1, round(state.max_steps / evals))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % Evaluate.every and state.global_step != state.max_steps:
                return
            sync()
            now = time.perf_counter()
            loss = eval_loss(model, eval_rows)
            sync()
            curve.append((state.global_step, now - clock["start"] - clock["paused"], loss))
            clock["paused"] += time.perf_counter() - now

    trainer = setup.trainer_class(model=model, callbacks=[Evaluate()], **setup.sft_kwargs)
    start_loss = eval_loss(trainer.model, eval_rows)
    sync()
    clock["start"] = time.perf_counter()
    trainer.train()
    sync()
    train_s = time.perf_counter() - clock["start"] - clock["paused"]
    final = curve[-1][2]
    if target is None:  # the baseline: its own target
        target = (final, final + TOLERANCE * (start_loss - final))
    exact, goal = target
    reached = next(((step, t, loss) for step, t, loss in curve if loss <= goal), None)
    reached_exact = next((t for step, t, loss in curve if loss <= exact), None)
    tot = stat_totals(stats)
    slots, real, sum_sq, label_tokens = (float(x) for x in tot)
    flops = step_flops(ARCHS[arch], real, label_tokens, sum_sq, LORA_RANK, checkpointing)
    row = {
        "config": name, "arch": arch, "n_train": n_train, "max_length": max_length,
        "steps": trainer.state.global_step, "learning_rate": args.learning_rate,
        "warmup_steps": args.warmup_steps, "micro_batch": args.per_device_train_batch_size,
        "tokens_per_microbatch": slots / max(1, len(stats)), "gradient_checkpointing": checkpointing,
        "applied": list(cuda_fast.LAST_APPLIED) if fast_cfg is not None else [],
        "train_s": round(train_s, 3), "real_tokens_per_s": real / train_s,
        "mfu": flops / train_s / 1e12 / peak_tflops if peak_tflops else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
        "start_loss": start_loss, "final_loss": final, "target_loss": goal, "baseline_final_loss": exact,
        "reached_step": reached[0] if reached else None, "time_to_target_s": reached[1] if reached else None,
        "time_to_baseline_final_s": reached_exact,
        "curve": [(s, round(t, 3), round(v, 5)) for s, t, v in curve],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    del trainer, model, setup
    release_memory()
    return row


def worker(ns) -> None:
    import torch

    peak = matmul_peak() if torch.cuda.is_available() else None
    target = None
    for name in ns.configs.split(","):
        try:
            row = run_config(name, ns.arch, ns.n_train, ns.n_eval, ns.max_length, ns.evals, target, peak)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not lose the others
            import traceback

            traceback.print_exc()
            row = {"config": name, "arch": ns.arch, "error": f"{type(exc).__name__}: {exc}"}
        row["bf16_matmul_tflops"] = peak
        if name == "baseline" and "error" not in row:
            target = (row["final_loss"], row["target_loss"])
        with open(ns.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("RESULT", json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)


PLANS = {
    # (arch, configs, n_train, timeout s); the baseline goes first: its final loss is the others' target
    "main": [
        ("llama1b", "baseline,default,fast-16k,fast-4k,mem-sqrt,mem-linear,steps64,steps32-sqrt,mem-sqrt-warmup",
         768, 360),
        ("smollm2", "baseline,default,fast-16k,fast-4k,mem-sqrt", 768, 180),
    ],
    "accept": [
        ("llama1b", "baseline,default,fast-16k,fast-4k,steps64-linear", 768, 220),
        ("smollm2", "baseline,default,fast-16k", 768, 150),
    ],
}


def suite(ns) -> None:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "suite.log", "a")
    env_info(out, ("transformers", "trl", "peft", "accelerate", "liger-kernel", "triton", "datasets"))
    if ns.checks:  # correctness of the kernels before any timing
        _run([sys.executable, "-m", "benchmarks.gpu_checks", "--out", str(out / "checks.json"), "--archs", ns.checks],
             log, 240, {"CUDA_VISIBLE_DEVICES": "0"})
    for arch, configs, n_train, timeout in PLANS[ns.plan]:
        _run([sys.executable, "-m", "benchmarks.gpu_time_to_quality", "worker", "--arch", arch, "--configs", configs,
              "--n-train", str(n_train), "--out", str(out / "ttq.jsonl")], log, timeout,
             {"CUDA_VISIBLE_DEVICES": "0", "PYTHONUNBUFFERED": "1"})
    if (out / "ttq.jsonl").exists():
        report(out / "ttq.jsonl", out / "ttq_report.md")


def report(results: Path, dest: Path | None = None) -> str:
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    base = {r["arch"]: r for r in rows if r.get("config") == "baseline" and "error" not in r}
    lines = ["| arch | config | steps | tok/micro-batch | lr | real tok/s | MFU | train s | final loss | "
             "time to 99% of baseline's loss drop | x sooner | time to baseline's final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['config']} | error: {r['error'][:150]} |")
            continue
        b = base.get(r["arch"])
        t = r["time_to_target_s"]
        sooner = f"{b['time_to_target_s'] / t:.2f}" if b and t else "not reached"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        when = f"{t:.1f} s (step {r['reached_step']})" if t else "-"
        exact = r.get("time_to_baseline_final_s")
        exact = f"{exact:.1f} s" if exact else "not reached"
        lines.append(
            f"| {r['arch']} | {r['config']} | {r['steps']} | {r['tokens_per_microbatch']:,.0f} | "
            f"{r['learning_rate']:.3g} | {r['real_tokens_per_s']:,.0f} | {mfu} | {r['train_s']:.1f} | "
            f"{r['final_loss']:.4f} | {when} | {sooner} | {exact} |")
    return emit_report(lines, dest)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--arch", default="llama1b", choices=sorted(ARCHS))
    w.add_argument("--configs", default="baseline,default")
    w.add_argument("--n-train", type=int, default=768)
    w.add_argument("--n-eval", type=int, default=64)
    w.add_argument("--max-length", type=int, default=1024)
    w.add_argument("--evals", type=int, default=24, help="held-out evaluations per run (about)")
    w.add_argument("--out", default="ttq.jsonl")
    s = sub.add_parser("suite")
    s.add_argument("--out", required=True)
    s.add_argument("--plan", default="main", choices=sorted(PLANS))
    s.add_argument("--checks", default="", help="run benchmarks.gpu_checks first for these architectures")
    r = sub.add_parser("report")
    r.add_argument("results")
    ns = p.parse_args(argv)
    if ns.cmd == "worker":
        worker(ns)
    elif ns.cmd == "suite":
        suite(ns)
    else:
        report(Path(ns.results))


if __name__ == "__main__":
    main()
