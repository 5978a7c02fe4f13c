"""The KL anchor's step: logits over every position vs the LM head on the answer tokens only.

    python benchmarks/anchor_cost.py [--base DIR] [--steps 12] [--batch 4] [--scenario ebike_faq]

A training step with the anchor (``trainer.anchor``) computes the supervised loss on the answer tokens and the KL
to the starting weights (the adapter switched off, no gradients) on the general replay answers. Both read the
logits only at answer tokens, about a third of a padded batch of chat turns (the system prompt, the question and
the padding are the rest). Three step variants run here, interleaved step by step on the same batches, on the
bundled SmolLM2-135M with a rank-16 LoRA on every linear layer (the trainer's shape): the shipped general replay
mixed half and half with the curated corrections of a scenario (as ``learning_sweep.curated_examples`` builds
them), batches of ``--batch`` in a fixed shuffled order.

  * ``no anchor``: forward over every position, cross-entropy, backward (no update: every variant sees the
    same weights);
  * ``full logits``: plus the starting weights on the rows that hold anchored tokens, logits at every position
    of both forward passes (the way before ``trainer.anchor.answer_logits``);
  * ``answer positions``: the decoder then the LM head at the answer tokens only, for the supervised loss and
    for both sides of the KL (``trainer.anchor.answer_logits``), the starting weights run at every step;
  * ``+ start cache``: the trainer's way now, the starting weights' log-probabilities of each row kept from the
    first epoch (``trainer.anchor.StartCache``; filled by one pass over every batch before the timing, as the
    first epoch fills it), so the steps of the later epochs are timed.

Reported: the median seconds per step of each, their ratios, and the largest differences of the loss and the KL
between the anchored ways and ``full logits``.
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
    parser.add_argument("--scenario", default="ebike_faq", help="a scenario of benchmarks/scenarios/")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from learning_sweep import curated_examples, load_scenario
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.anchor import StartCache, _kl_to_start, answer_logits
    from trainer.base_model import resolve_base
    from trainer.config import TrainConfig
    from trainer.data import build_training_set, tokenize_examples
    from trainer.evaluate import load_general_replay
    from trainer.run_setup import load_tokenizer

    base_path = resolve_base(args.base)
    tokenizer = load_tokenizer(base_path)
    corrections = curated_examples(load_scenario(args.scenario))
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
    cached = SimpleNamespace(accelerator=trainer.accelerator, _metrics=trainer._metrics, start_cache=StartCache(),
                             args=SimpleNamespace(neftune_noise_alpha=None))

    def step(i: int, how: str) -> tuple[float, float, float | None]:
        forward, labels, anchor = batch(i)
        started = time.perf_counter()
        targets = labels[:, 1:]
        answer = targets != -100
        held = answer & anchor[:, 1:].bool()
        kl = None
        if how in ("answer positions", "+ start cache"):
            who = cached if how == "+ start cache" else trainer
            logits = answer_logits(who, model, forward, answer)
            loss = F.cross_entropy(logits, targets[answer])
            if held.any():
                kl = _kl_to_start(who, model, forward, logits[held[answer]], held)
        else:
            logits = model(**forward).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            if how == "full logits" and held.any():
                rows = held.any(dim=1)
                with torch.no_grad(), model.disable_adapter():
                    start = model(input_ids=forward["input_ids"][rows], attention_mask=forward["attention_mask"][rows],
                                  use_cache=False).logits[:, :-1].float()
                kl = F.kl_div(F.log_softmax(logits[held], dim=-1), F.log_softmax(start[held[rows]], dim=-1),
                              log_target=True, reduction="batchmean")
        (loss + kl if kl is not None else loss).backward()
        optimizer.zero_grad(set_to_none=True)  # no update: every variant sees the same weights
        return time.perf_counter() - started, float(loss.detach()), float(kl.detach()) if kl is not None else None

    ways = ("no anchor", "full logits", "answer positions", "+ start cache")
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    values: dict[str, list[tuple[float, float | None]]] = {w: [] for w in ways}
    step(0, "full logits")  # warm-up
    step(0, "answer positions")
    for i in range(-(-len(rows) // args.batch)):  # the first epoch, which fills the start cache
        step(i, "+ start cache")
    for i in range(args.steps):
        for way in ways:
            took, loss, kl = step(i, way)
            seconds[way].append(took)
            values[way].append((loss, kl))
    anchored = sum(1 for r in rows if r.get("anchor")) / len(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    answers = sum(sum(1 for x in r["labels"] if x != -100) for r in rows)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; {args.scenario}: {len(rows)} rows ({anchored:.0%} anchored, answer tokens "
          f"{answers / total:.0%} of the unpadded tokens), batch {args.batch}, {args.steps} steps each")
    base = statistics.median(seconds["no anchor"])
    for way in ways:
        median = statistics.median(seconds[way])
        print(f"{way:>16}: {median:.3f} s/step ({median / base:.2f}x no anchor)")
    for way in ways[2:]:
        ratio = statistics.median(seconds["full logits"]) / statistics.median(seconds[way])
        pairs = list(zip(values["full logits"], values[way]))
        loss_diff = max(abs(a[0] - b[0]) for a, b in pairs)
        kl_diff = max((abs(a[1] - b[1]) for a, b in pairs if a[1] is not None and b[1] is not None), default=0.0)
        print(f"full logits / {way}: {ratio:.2f}x; largest loss difference {loss_diff:.2e}, "
              f"largest KL difference {kl_diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
