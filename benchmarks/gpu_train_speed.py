"""GPU training speed: TRL SFTTrainer + PEFT defaults against our CUDA fast path (`trainer/cuda_fast.py`).

Run on a CUDA machine (figures recorded in benchmarks/RESULTS.md and docs/gpu-speed.md):

    python -m benchmarks.gpu_train_speed suite --out OUTDIR          # everything, one GPU then two
    python -m benchmarks.gpu_train_speed worker --arch llama1b --configs baseline,fast --out r.jsonl
    python -m benchmarks.gpu_train_speed report OUTDIR/results.jsonl

Models are randomly initialised from the architectures' configs (no weights can be fetched): throughput and
memory depend on shapes and lengths, not on the values of the weights. Data: `benchmarks/gpu_data.py`.
The baseline is what a user writes with TRL's defaults: `SFTConfig()` (batch 8, max_length 1024, gradient
checkpointing, bf16, padded batches, SDPA attention) and `LoraConfig(r=16, lora_alpha=32,
target_modules="all-linear")`. Each other configuration is the same call after `cuda_fast.apply`.
Only the learning rate (2e-4, LoRA's usual) and run-length settings are set on top of the defaults.
A CPU dry run: `LOOP_CUDA_FAST=force python -m benchmarks.gpu_train_speed worker --arch tiny ...`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ARCHS = {
    # Llama-3.2-1B
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                    max_position_embeddings=131072, rms_norm_eps=1e-5),
    # SmolLM2-135M (the project's default base model)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5),
    # CPU dry runs only
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096),
}

# name -> config object handed to cuda_fast.apply (None: the baseline, apply is not called)
CONFIGS = {
    "baseline": None,
    "packed": SimpleNamespace(fast_liger=False, fast_fused_lora=False),
    "packed+fused-lora": SimpleNamespace(fast_liger=False, fast_fused_lora=True),
    "fast": SimpleNamespace(fast_liger=True, fast_fused_lora=True),
    "fast-4k": SimpleNamespace(fast_liger=True, fast_fused_lora=True, tokens_per_microbatch=4096),
    "fast-32k": SimpleNamespace(fast_liger=True, fast_fused_lora=True, tokens_per_microbatch=32768),
    "fast-dropout": SimpleNamespace(fast_liger=True, fast_fused_lora=True),
    "padding-free": SimpleNamespace(fast_liger=True, fast_fused_lora=True, tokens_per_microbatch=0),
    "fast+compile": SimpleNamespace(fast_liger=True, fast_fused_lora=True),
}
# extra settings of a configuration: SFTConfig fields ("sft") and LoraConfig fields ("lora")
CONFIG_EXTRA = {
    "fast-dropout": {"lora": {"lora_dropout": 0.05}},
    "fast+compile": {"sft": {"torch_compile": True}},
}
LORA_RANK = 16


# ------------------------------------------------------------------------------------------------------ worker
def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def build_model(arch: str, quant: str, cache_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**ARCHS[arch])
    cuda = torch.cuda.is_available()
    device = f"cuda:{_local_rank()}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if quant == "qlora":
        from transformers import BitsAndBytesConfig

        path = cache_dir / f"{arch}-random"
        if not (path / "config.json").exists():
            torch.manual_seed(1234)
            with torch.device(device):
                full = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            full.save_pretrained(path)
            del full
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                 bnb_4bit_use_double_quant=True)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=dtype,
                                                    device_map={"": device})
    torch.manual_seed(1234)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def eval_loss(model, examples, batch: int = 8) -> float:
    """Held-out loss, padded batches through the model's plain forward: the same code for every configuration."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(examples), batch):
            rows = examples[start:start + batch]
            width = max(len(r["input_ids"]) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["labels"])
            n_labels = int((labels[:, 1:] != -100).sum())
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            total += float(out.loss) * n_labels
            count += n_labels
    model.train()
    return total / max(count, 1)


def sft_setup(arch: str, quant: str, n_train: int, n_eval: int, max_length: int, cache_dir: Path, fast_cfg,
              prefix: str, sft_extra: dict | None = None, lora_extra: dict | None = None) -> SimpleNamespace:
    """What every SFT benchmark run sets up alike (gpu_time_to_quality too): the randomly initialised model,
    pre-truncated synthetic rows, TRL's default SFTConfig with LoRA r=16 and (`fast_cfg` not None) the fast path
    applied; `trainer_class` is an SFTTrainer that appends each micro-batch's (slots, real tokens, sum of
    squared lengths, label tokens) to `stats`, as tensors (no host sync while training)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from benchmarks.gpu_data import make_examples, tokenizer_stub
    from trainer import cuda_fast

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(arch, quant, cache_dir)
    vocab = ARCHS[arch]["vocab_size"]
    max_len = min(2048, ARCHS[arch]["max_position_embeddings"])

    def rows(n, seed):  # pre-truncated like trainer/data.py does ("padding-free" requires it; TRL would cut the same)
        return [{k: v[:max_length] for k, v in r.items()} for r in make_examples(n, vocab, seed=seed, max_len=max_len)]

    train_rows, eval_rows = rows(n_train, 1), rows(n_eval, 2)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix=prefix), max_length=max_length, learning_rate=2e-4, num_train_epochs=1,
        logging_steps=5, save_strategy="no", report_to="none", seed=42, disable_tqdm=True, bf16=cuda,
        use_cpu=not cuda, **(sft_extra or {}),
    )
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM",
                             **(lora_extra or {}))
    sft_kwargs = dict(args=args, train_dataset=Dataset.from_list(train_rows), peft_config=peft_config,
                      processing_class=tokenizer_stub())
    cuda_fast.disable_fused_lora()
    if fast_cfg is not None:
        sft_kwargs, model = cuda_fast.apply(sft_kwargs, model, fast_cfg)
    ac = getattr(args, "activation_checkpointing", None)  # transformers >= 5.2x reads this one
    checkpointing = bool(args.gradient_checkpointing if ac is None else ac)
    stats = []

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            if "attention_mask" in inputs:
                lengths = inputs["attention_mask"].sum(-1)
            elif "cu_seq_lens_q" in inputs:
                lengths = inputs["cu_seq_lens_q"].diff()
            else:
                lengths = torch.tensor([ids.numel()])
            labels = (inputs["labels"][:, 1:] != -100).sum()
            stats.append((ids.numel(), lengths.sum(), (lengths.double() ** 2).sum(), labels))
            return super().training_step(model, inputs, num_items_in_batch)

    return SimpleNamespace(cuda=cuda, model=model, args=args, sft_kwargs=sft_kwargs, eval_rows=eval_rows,
                           checkpointing=checkpointing, stats=stats, trainer_class=Counting, vocab=vocab,
                           max_len=max_len)


def stat_totals(stats: list):
    """The sums of `sft_setup`'s per-micro-batch stats, a tensor of 4."""
    import torch

    return torch.tensor([[float(a), float(b), float(c), float(d)] for a, b, c, d in stats]).sum(0)


def run_config(name: str, arch: str, quant: str, n_train: int, n_eval: int, warmup: int, max_length: int,
               cache_dir: Path, extra: dict | None = None) -> dict:
    import torch
    from transformers import TrainerCallback

    from benchmarks.gpu_data import length_stats, make_examples
    from trainer import cuda_fast

    t_setup = time.perf_counter()
    fast_cfg = CONFIGS[name]
    setup = sft_setup(arch, quant, n_train, n_eval, max_length, cache_dir, fast_cfg, f"bench-{name}-",
                      {**(extra or {}), **CONFIG_EXTRA.get(name, {}).get("sft", {})},
                      CONFIG_EXTRA.get(name, {}).get("lora", {}))
    cuda, model, args, checkpointing, stats = setup.cuda, setup.model, setup.args, setup.checkpointing, setup.stats
    vocab, max_len, eval_rows = setup.vocab, setup.max_len, setup.eval_rows

    timing = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, state.max_steps):
                if cuda:
                    torch.cuda.synchronize()
                timing[state.global_step] = time.perf_counter()

    trainer = setup.trainer_class(model=model, callbacks=[Timer()], **setup.sft_kwargs)
    setup_s = time.perf_counter() - t_setup
    result = trainer.train()
    steps = trainer.state.global_step
    if warmup not in timing or steps not in timing or steps <= warmup:
        raise RuntimeError(f"too few steps ({steps}) for {warmup} warm-up steps")
    seconds = timing[steps] - timing[warmup]
    measured = stats[warmup:steps]
    tot = stat_totals(measured)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = tot.to(f"cuda:{_local_rank()}") if cuda else tot
        torch.distributed.all_reduce(t)
        tot = t.cpu()
        world = torch.distributed.get_world_size()
    else:
        world = 1
    slots, real, sum_sq, label_tokens = (float(x) for x in tot)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    logs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    held_out = eval_loss(trainer.model, eval_rows) if _local_rank() == 0 else None
    from benchmarks.gpu_flops import step_flops

    flops = step_flops(ARCHS[arch], real, label_tokens, sum_sq, LORA_RANK, checkpointing)
    row = {
        "config": name, "arch": arch, "quant": quant, "gpus": world, "n_train": n_train,
        "max_length": max_length, "steps": steps, "warmup_steps": warmup, "measured_s": round(seconds, 3),
        "real_tokens_per_s": real / seconds, "padding_share": 1 - real / slots if slots else 0.0,
        "label_tokens_per_s": label_tokens / seconds, "tflops_per_s": flops / seconds / 1e12,
        "peak_mem_gib": round(peak, 2), "tokens_per_microbatch": slots / len(measured) / world,
        "micro_batch": args.per_device_train_batch_size, "gradient_checkpointing": checkpointing,
        "applied": list(cuda_fast.LAST_APPLIED) if fast_cfg is not None else [],
        "train_loss_first": logs[0] if logs else None, "train_loss_last": logs[-1] if logs else None,
        "train_loss_mean": result.training_loss, "held_out_loss": held_out, "setup_s": round(setup_s, 1),
        "data": length_stats(make_examples(n_train, vocab, seed=1, max_len=max_len), max_length),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    del trainer, model, setup
    release_memory()
    return row


def release_memory() -> None:
    """After a run's objects are deleted: collect them, and give their GPU memory back to the card."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker(ns) -> None:
    import torch

    cache_dir = Path(ns.cache_dir)
    for name in ns.configs.split(","):
        try:
            row = run_config(name, ns.arch, ns.quant, ns.n_train, ns.n_eval, ns.warmup, ns.max_length, cache_dir)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not lose the others
            import traceback

            traceback.print_exc()
            row = {"config": name, "arch": ns.arch, "quant": ns.quant, "error": f"{type(exc).__name__}: {exc}"}
        if _local_rank() == 0:
            with open(ns.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print("RESULT", json.dumps({k: v for k, v in row.items() if k != "data"}), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ peak rate
def matmul_peak(n: int = 8192, reps: int = 30) -> float:
    """bf16 matrix rate of this card, TFLOP/s: median of `reps` n^3 products on random data after warm-up."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


# --------------------------------------------------------------------------------------------------------- suite
def _run(cmd: list[str], log, timeout: int, env: dict | None = None) -> int:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    t = time.perf_counter()
    try:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                            env={**os.environ, **(env or {})}).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    log.write(f"[rc={rc}, {time.perf_counter() - t:.0f}s]\n")
    log.flush()
    print(f"[{rc}] {time.perf_counter() - t:5.0f}s {' '.join(cmd[-8:])}", flush=True)
    return rc


def env_info(out: Path, dists: tuple[str, ...], gpus: bool = True, matmul: bool = False) -> dict:
    """The device (GPU count), torch, the date and the versions of `dists` (+ the bf16 matmul peak), written to
    OUT/env.json and printed: every benchmark suite's record of where it ran."""
    import torch

    cuda = torch.cuda.is_available()
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    if gpus:
        info["gpus"] = torch.cuda.device_count()
    info.update(torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "missing"
    if matmul:
        info["bf16_matmul_tflops"] = matmul_peak()
    (out / "env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info), flush=True)
    return info


PLANS = {
    # (what, arch, quant, configs, n_train, timeout). what: "checks" (gpu_checks, `arch` = its --archs),
    # "1gpu" (worker on GPU 0), "2gpu" (worker through accelerate on two processes), "prod" (the production
    # trainer, one GPU then two: benchmarks/gpu_prod_scaling.py; `configs` = steps)
    "smoke": [
        ("1gpu", "smollm2", "none", "baseline,fast", 256, 150),
        ("1gpu", "llama1b", "none", "baseline,fast", 256, 200),
    ],
    "main": [
        ("checks", "", "", "", 0, 120),
        ("1gpu", "llama1b", "none", "baseline,packed,packed+fused-lora,fast,fast-dropout,fast-4k,fast-32k", 768, 300),
        ("1gpu", "llama1b", "none", "fast", 1536, 100),
        ("2gpu", "llama1b", "none", "fast", 1536, 120),
        ("prod", "llama1b", "bf16", "40", 3000, 240),
    ],
    "more": [
        ("1gpu", "smollm2", "none", "baseline,fast", 768, 120),
        ("1gpu", "llama1b", "qlora", "baseline,fast", 384, 150),
        ("1gpu", "llama1b", "none", "fast+compile", 768, 150),
    ],
    "full": [
        ("checks", "smollm2,llama1b", "", "", 0, 240),
        ("1gpu", "llama1b", "none", "baseline,packed,packed+fused-lora,fast,fast-dropout,fast-4k,fast-32k", 768, 300),
        ("1gpu", "llama1b", "none", "fast", 1536, 100),
        ("2gpu", "llama1b", "none", "fast", 1536, 120),
        ("1gpu", "smollm2", "none", "baseline,fast", 768, 120),
        ("1gpu", "llama1b", "qlora", "baseline,fast", 384, 150),
        ("prod", "llama1b", "bf16", "40", 3000, 240),
    ],
}


def suite(ns) -> None:
    import torch

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    log = open(out / "suite.log", "a")
    py = sys.executable
    deadline = time.perf_counter() + ns.budget_s
    info = env_info(out, ("transformers", "trl", "peft", "accelerate", "liger-kernel", "bitsandbytes", "triton",
                          "datasets"), matmul=True)
    nccl = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    for what, arch, quant, configs, n_train, timeout in PLANS[ns.plan]:
        left = deadline - time.perf_counter()
        if left < 30:
            print("budget spent; skipped", what, arch, quant, configs, flush=True)
            continue
        common = ["--arch", arch, "--quant", quant, "--configs", configs, "--n-train", str(n_train),
                  "--out", str(results), "--cache-dir", ns.cache_dir]
        if what == "checks":
            _run([py, "-m", "benchmarks.gpu_checks", "--out", str(out / "checks.json"), "--archs", arch], log,
                 int(min(timeout, left)), {"CUDA_VISIBLE_DEVICES": "0"})
        elif what == "prod":
            if not Path("trainer/train.py").exists() or torch.cuda.device_count() < 2 or not ns.tokenizer:
                print("prod scaling skipped (no trainer/train.py, one GPU, or no --tokenizer)", flush=True)
                continue
            base, data = Path(ns.cache_dir) / f"prod-{arch}", Path(ns.cache_dir) / "prod-data.jsonl"
            _run([py, "-m", "benchmarks.gpu_prod_scaling", "prepare", "--tokenizer", ns.tokenizer, "--arch", arch,
                  "--base", str(base), "--data", str(data), "--n", str(n_train)], log, 120)
            _run([py, "-m", "benchmarks.gpu_prod_scaling", "run", "--base", str(base), "--data", str(data),
                  "--out", str(out / "prod_scaling.jsonl"), "--steps", configs, "--precision", quant,
                  "--timeout", str(int(min(timeout, deadline - time.perf_counter()) / 2))], log,
                 int(min(timeout + 20, deadline - time.perf_counter())), nccl)
        elif what == "1gpu":
            _run([py, "-m", "benchmarks.gpu_train_speed", "worker", *common], log, int(min(timeout, left)),
                 {"CUDA_VISIBLE_DEVICES": "0"})
        elif torch.cuda.device_count() >= 2:
            _run([py, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "benchmarks.gpu_train_speed",
                  "worker", *common], log, int(min(timeout, left)),
                 nccl)
    if results.exists():
        report(results, info, out / "report.md")


# -------------------------------------------------------------------------------------------------------- report
def report(results: Path, info: dict | None, dest: Path | None = None) -> str:
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    peak = (info or {}).get("bf16_matmul_tflops")
    lines = [
        f"device: {(info or {}).get('device', '?')}, bf16 matmul peak measured: "
        f"{peak:.0f} TFLOP/s" if peak else "device: ?",
        "",
        "| arch | quant | config | GPUs | real tok/s | x baseline | padding | MFU | peak GiB | tok/micro-batch | "
        "ckpt | train loss first→last | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["arch"], r["quant"]): r for r in rows if r.get("config") == "baseline" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['quant']} | {r['config']} | | error: {r['error'][:120]} |")
            continue
        b = base.get((r["arch"], r["quant"]))
        speedup = r["real_tokens_per_s"] / b["real_tokens_per_s"] if b else float("nan")
        mfu = r["tflops_per_s"] / r["gpus"] / peak if peak else float("nan")
        held = f"{r['held_out_loss']:.3f}" if r.get("held_out_loss") is not None else "-"
        first, last = r.get("train_loss_first"), r.get("train_loss_last")
        losses = f"{first:.3f}→{last:.3f}" if first is not None and last is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['quant']} | {r['config']} | {r['gpus']} | {r['real_tokens_per_s']:,.0f} | "
            f"{speedup:.2f} | {100 * r['padding_share']:.1f}% | {100 * mfu:.1f}% | {r['peak_mem_gib']:.1f} | "
            f"{r['tokens_per_microbatch']:,.0f} | {'yes' if r['gradient_checkpointing'] else 'no'} | {losses} | "
            f"{held} |"
        )
    return emit_report(lines, dest)


def emit_report(lines: list[str], dest: Path | None) -> str:
    """A benchmark's report: its lines printed, written to `dest` when given, and returned as one text."""
    text = "\n".join(lines)
    if dest:
        Path(dest).write_text(text + "\n")
    print(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--arch", default="llama1b", choices=sorted(ARCHS))
    w.add_argument("--quant", default="none", choices=["none", "qlora"])
    w.add_argument("--configs", default="baseline,fast")
    w.add_argument("--n-train", type=int, default=768)
    w.add_argument("--n-eval", type=int, default=64)
    w.add_argument("--warmup", type=int, default=3)
    w.add_argument("--max-length", type=int, default=1024)
    w.add_argument("--out", default="gpu_results.jsonl")
    w.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "bench-models"))
    s = sub.add_parser("suite")
    s.add_argument("--out", required=True)
    s.add_argument("--plan", default="full", choices=sorted(PLANS))
    s.add_argument("--tokenizer", help="a chat tokenizer directory for the production-trainer scaling run")
    s.add_argument("--budget-s", type=int, default=540)
    s.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "bench-models"))
    r = sub.add_parser("report")
    r.add_argument("results")
    r.add_argument("--env")
    ns = p.parse_args(argv)
    if ns.cmd == "worker":
        worker(ns)
    elif ns.cmd == "suite":
        suite(ns)
    else:
        report(Path(ns.results), json.loads(Path(ns.env).read_text()) if ns.env else None)


if __name__ == "__main__":
    main()
