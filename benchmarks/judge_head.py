"""The epoch judge's forward passes: logits at every position vs the LM head at the scored positions only.

    python benchmarks/judge_head.py [--base DIR] [--runs 5] [--scenario ebike_faq]

At the end of every epoch the judge (``trainer.best_epoch``) scores the adapter three ways with one no-grad
forward pass each: the held-out loss and the regression loss (``trainer.evaluate.masked_nll``) and the
teacher-forced check of the general answers (``trainer.general_kept._reproduces``). Each reads the logits at
answer tokens only. Two ways run here, alternating run by run, on the bundled SmolLM2-135M with a rank-16 LoRA
on every linear layer (the trainer's shape, B drawn N(0, 0.002^2) so the adapter is not zero), over a scenario's
curated corrections (as held-out examples) and the shipped 32 regression prompts:

  * ``every position``: the whole forward pass, logits at every position, then picked (the way before
    ``trainer.evaluate.logits_at``);
  * ``scored positions``: the decoder, then the LM head at the scored positions only (the way now).

Reported: the median seconds of one epoch's three passes each way, their ratio, the largest difference of the
two losses and whether the check's verdicts agree (they must).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="HF base directory (default: the bundled model, converted)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scenario", default="ebike_faq", help="a scenario of benchmarks/scenarios/")
    args = parser.parse_args(argv)

    import torch
    from learning_sweep import curated_examples, load_scenario
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer import evaluate
    from trainer.base_model import resolve_base
    from trainer.evaluate import eval_loss, regression_examples
    from trainer.general_kept import KeptProbe, _reproduces
    from trainer.run_setup import load_tokenizer

    base_path = resolve_base(args.base)
    tokenizer = load_tokenizer(base_path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.002)
    held_out, regression = curated_examples(load_scenario(args.scenario)), regression_examples()
    probe = KeptProbe.build(model, tokenizer, regression)
    cases = [(e["messages"], probe.answers.get(e["id"])) for e in probe.right]

    scored_positions = evaluate.logits_at

    def whole_forward(model, forward, positions):
        return model(**forward).logits[positions].float()

    def judge(how: str):
        evaluate.logits_at = whole_forward if how == "every position" else scored_positions
        try:
            started = time.perf_counter()
            losses = (eval_loss(model, held_out, tokenizer, 512, 4), eval_loss(model, regression, tokenizer, 512, 4))
            same = _reproduces(model, tokenizer, cases)
            return time.perf_counter() - started, losses, same
        finally:
            evaluate.logits_at = scored_positions

    ways = ("every position", "scored positions")
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    results = {}
    for _ in range(args.runs):
        for way in ways:
            took, losses, same = judge(way)
            seconds[way].append(took)
            results[way] = (losses, same)
    (old_losses, old_same), (new_losses, new_same) = results[ways[0]], results[ways[1]]
    before, now = statistics.median(seconds[ways[0]]), statistics.median(seconds[ways[1]])
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads; "
          f"{len(held_out)} held-out examples, {len(regression)} regression, {len(cases)} answers checked, "
          f"{sum(old_same)} unchanged")
    print(f"| way | s / epoch judge (median of {args.runs}) | before / this |")
    print("|---|---:|---:|")
    print(f"| every position (before) | {before:.2f} | 1.00x |")
    print(f"| scored positions (now) | {now:.2f} | {before / now:.2f}x |")
    print(f"largest loss difference {max(abs(a - b) for a, b in zip(old_losses, new_losses)):.2e}; "
          f"check verdicts agree: {old_same == new_same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
