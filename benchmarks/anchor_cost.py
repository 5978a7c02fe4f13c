"""The KL anchor's extra forward pass: over the whole batch vs over the rows that hold anchored tokens.

    python benchmarks/anchor_cost.py [--base DIR] [--steps 12] [--batch 4]

A training step with the anchor (``trainer.anchor``) runs the starting weights (the adapter switched off) once
more, without gradients, to hold the general replay answers to their distribution. It used to run them on every
row of the batch; it now runs only the rows that hold anchored tokens (about half of a batch mixed at
``replay_ratio`` 0.5). Three step variants run here, interleaved step by step on the same batches, on the
bundled SmolLM2-135M with a rank-16 LoRA on every linear layer (the trainer's shape): the shipped general replay
mixed half and half with the curated corrections of the demo's scenario (benchmarks/scenarios/zephyr.json, as
``learning_sweep.curated_examples`` builds them), batches of ``--batch`` in a fixed shuffled order.

  * ``no anchor``: forward, cross-entropy, backward (no update: every variant sees the same weights);
  * ``whole batch``: plus the starting weights on every row (the earlier way);
  * ``anchored rows``: plus ``trainer.anchor._kl_to_start`` (the way the trainer does it now).

Reported: the median seconds per step of each, their ratios, and the largest difference between the two KL values.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="HF base directory (default: the bundled model, converted)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from learning_sweep import curated_examples, load_scenario
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.anchor import _kl_to_start
    from trainer.base_model import resolve_base
    from trainer.config import TrainConfig
    from trainer.data import build_training_set, tokenize_examples
    from trainer.evaluate import load_general_replay
    from trainer.run_setup import load_tokenizer

    base_path = resolve_base(args.base)
    tokenizer = load_tokenizer(base_path)
    corrections = curated_examples(load_scenario("zephyr"))
    mixed = build_training_set(corrections, load_general_replay(TrainConfig()), 0.5, seed=0)
    rows = tokenize_examples(tokenizer, mixed, 512, anchor=True).rows
    random.Random(0).shuffle(rows)
    pad = tokenizer.pad_token_id or 0

    def batch(i: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        part = [rows[(i * args.batch + j) % len(rows)] for j in range(args.batch)]
        width = max(len(r["input_ids"]) for r in part)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in part])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in part])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in part])
        anchor = torch.tensor([[r.get("anchor", 0)] * width for r in part])
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, labels, anchor

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              _metrics={"train": defaultdict(list)})

    def step(i: int, how: str) -> tuple[float, float | None]:
        forward, labels, anchor = batch(i)
        started = time.perf_counter()
        logits = model(**forward).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        held = (targets != -100) & anchor[:, 1:].bool()
        kl = None
        if how == "whole batch" and held.any():
            with torch.no_grad(), model.disable_adapter():
                start = model(**forward).logits[:, :-1].float()
            kl = F.kl_div(F.log_softmax(logits[held], dim=-1), F.log_softmax(start[held], dim=-1), log_target=True,
                          reduction="batchmean")
        elif how == "anchored rows" and held.any():
            kl = _kl_to_start(trainer, model, forward, logits, held)
        (loss + kl if kl is not None else loss).backward()
        optimizer.zero_grad(set_to_none=True)  # no update: every variant sees the same weights
        return time.perf_counter() - started, float(kl.detach()) if kl is not None else None

    ways = ("no anchor", "whole batch", "anchored rows")
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    kls: dict[str, list[float | None]] = {w: [] for w in ways}
    step(0, "whole batch")  # warm-up
    for i in range(args.steps):
        for way in ways:
            took, kl = step(i, way)
            seconds[way].append(took)
            kls[way].append(kl)
    anchored = sum(1 for r in rows if r.get("anchor")) / len(rows)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; {len(rows)} rows ({anchored:.0%} anchored), batch {args.batch}, "
          f"{args.steps} steps each")
    base = statistics.median(seconds["no anchor"])
    for way in ways:
        median = statistics.median(seconds[way])
        print(f"{way:>14}: {median:.3f} s/step ({median / base:.2f}x no anchor)")
    ratio = statistics.median(seconds["whole batch"]) / statistics.median(seconds["anchored rows"])
    diff = max((abs(a - b) for a, b in zip(kls["whole batch"], kls["anchored rows"]) if a is not None and b is not None),
               default=0.0)
    print(f"whole batch / anchored rows: {ratio:.2f}x; largest KL difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
