"""Data-parallel scaling of the production trainer (`python -m trainer.train`), one GPU against two.

    python -m benchmarks.gpu_prod_scaling prepare --tokenizer DIR --arch llama1b --base BASE --data DATA.jsonl
    python -m benchmarks.gpu_prod_scaling run --base BASE --data DATA.jsonl --out RESULTS.jsonl --steps 40

`prepare` writes a randomly initialised model of the chosen architecture with a real chat tokenizer (`--tokenizer`:
any tokenizer directory with a chat template, e.g. the converted bundled base `$LOOP_HOME/models/base-hf`; no hub
is needed) and synthetic chat examples as JSON lines
({"id", "messages"}) whose token lengths follow `benchmarks/gpu_data.py` (mean ~600, some near 2048).
`run` trains the same data for the same number of optimizer steps with `CUDA_VISIBLE_DEVICES=0 python -m
trainer.train ...` and with `accelerate launch --num_processes 2 -m trainer.train ...`, and records the
trainer's own metrics.json figures (tokens/s counted by TRL over all processes, train time, peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loop.core.config import toml_text

SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["the", "and", "of", "to", "in", "is"]


def _words(rng: random.Random, n: int) -> str:
    words = []
    for _ in range(n):
        words.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
    return " ".join(words)


def prepare(ns) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from benchmarks.gpu_data import draw_length
    from benchmarks.gpu_train_speed import ARCHS

    tok = AutoTokenizer.from_pretrained(ns.tokenizer)
    base = Path(ns.base)
    if not (base / "config.json").exists():
        cfg = LlamaConfig(**{**ARCHS[ns.arch], "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                             "pad_token_id": tok.pad_token_id, "vocab_size": max(ARCHS[ns.arch]["vocab_size"], len(tok))})
        torch.manual_seed(1234)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(base)
        tok.save_pretrained(base)
    rng = random.Random(7)
    probe = _words(rng, 400)
    tokens_per_word = len(tok(probe)["input_ids"]) / 400
    with open(ns.data, "w") as f:
        for i in range(ns.n):
            total = draw_length(rng, 2048) - 20  # the chat template's markup
            prompt = max(4, int(total * rng.uniform(0.2, 0.5) / tokens_per_word))
            answer = max(4, int((total / tokens_per_word) - prompt))
            msgs = [{"role": "user", "content": _words(rng, prompt)},
                    {"role": "assistant", "content": _words(rng, answer)}]
            f.write(json.dumps({"id": f"synthetic-{i}", "messages": msgs}) + "\n")
    print(json.dumps({"base": str(base), "data": ns.data, "tokens_per_word": tokens_per_word}))


def _train(cmd: list[str], out_dir: Path, env: dict, timeout: int) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    wall = time.perf_counter() - t
    sys.stdout.write(proc.stderr[-3000:])
    metrics_path = out_dir / "metrics.json"
    if proc.returncode != 0 or not metrics_path.exists():
        return {"error": f"rc={proc.returncode}", "tail": proc.stderr[-1500:], "wall_s": wall}
    m = json.loads(metrics_path.read_text())
    keep = ("status", "steps", "tokens_per_s", "train_time_s", "wall_time_s", "peak_memory_mb", "world_size",
            "train_loss_final", "eval_loss", "eval_loss_start")
    return {**{k: m.get(k) for k in keep}, "process_wall_s": wall}


def run(ns) -> None:
    settings = {"max_steps": ns.steps, "save_steps": 100000, "max_length": 1024, "batch_size": 8,
                "cuda_precision": ns.precision, "lora_dropout": ns.dropout, "learning_rate": 2e-4, "eval_fraction": 0.02}
    common = ["-m", "trainer.train", "--data", ns.data, "--base", ns.base,
              *[arg for name, value in settings.items() for arg in ("--set", f"trainer.{name}={toml_text(value)}")]]
    nccl = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    rows = []
    for gpus in (1, 2):
        out_dir = Path(ns.work) / f"run-{gpus}gpu"
        if gpus == 1:
            cmd = [sys.executable, *common, "--output", str(out_dir)]
            env = {"CUDA_VISIBLE_DEVICES": "0"}
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "bf16", "--dynamo_backend", "no", *common, "--output", str(out_dir)]
            env = nccl
        row = {"gpus": gpus, "precision": ns.precision, "steps_asked": ns.steps,
               **_train(cmd, out_dir, env, ns.timeout)}
        rows.append(row)
        with open(ns.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("PROD", json.dumps(row), flush=True)
    if all(r.get("tokens_per_s") for r in rows):
        print("PROD scaling 2 GPUs / 1 GPU:", rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--tokenizer", required=True)
    a.add_argument("--arch", default="llama1b")
    a.add_argument("--base", required=True)
    a.add_argument("--data", required=True)
    a.add_argument("--n", type=int, default=3000)
    r = sub.add_parser("run")
    r.add_argument("--base", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "prod-scaling"))
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--precision", default="bf16", choices=["bf16", "qlora"])
    r.add_argument("--dropout", type=float, default=0.05)
    r.add_argument("--timeout", type=int, default=200)
    ns = p.parse_args(argv)
    prepare(ns) if ns.cmd == "prepare" else run(ns)


if __name__ == "__main__":
    main()
