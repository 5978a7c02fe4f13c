"""The epoch judge's general-answers check: generating every answer vs the teacher-forced check first.

    python benchmarks/judge_speed.py [--base DIR] [--runs 3] [--nudges 0 0.002 0.006]

``trainer.general_kept.KeptProbe.kept`` decides whether a model still gives the general answers the starting
weights gave right. It used to generate all of them greedily (48 new tokens, one batched call); it now runs
one teacher-forced forward pass over prompt + starting answer and generates only the answers the model would
no longer write word for word. Both paths run here, alternating run by run, on the bundled SmolLM2-135M with a
rank-16 LoRA on every linear layer (the trainer's shape) over the shipped 32 regression prompts:

  * ``nudge 0``: the adapter is zero, every answer unchanged (a judge right after a gentle epoch);
  * ``nudge s``: LoRA B drawn N(0, s^2) (fixed seed), so some answers change and are generated.

Reported per nudge: answers unchanged, the median seconds of each path, their ratio, and whether both paths
gave the same verdicts (they must: the fast path is exact).
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="HF base directory (default: the bundled model, converted)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nudges", type=float, nargs="+", default=[0.0, 0.002, 0.006])
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.evaluate import load_for_eval, regression_examples
    from trainer.general_kept import KeptProbe, _greedy, is_right

    base = args.base or _bundled_base()
    model, tokenizer = load_for_eval(base)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    probe = KeptProbe.build(model, tokenizer, regression_examples())
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"{len(probe.right)} of {probe.asked} regression answers right at the start")

    def generate_all() -> dict:
        answers = _greedy(model, tokenizer, [e["messages"] for e in probe.right])
        return {e["id"]: is_right(a, e["expect"]) for e, a in zip(probe.right, answers)}

    print("| nudge | answers unchanged | generate all (s) | check first (s) | ratio | same verdicts |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for nudge in args.nudges:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.copy_(torch.randn_like(weight) * nudge)
        answers = _greedy(model, tokenizer, [e["messages"] for e in probe.right])
        unchanged = sum(a == probe.answers[e["id"]] for e, a in zip(probe.right, answers))
        slow, fast, same = [], [], True
        for _ in range(args.runs):
            started = time.perf_counter()
            reference = generate_all()
            slow.append(time.perf_counter() - started)
            started = time.perf_counter()
            verdicts = probe.kept(model, tokenizer)
            fast.append(time.perf_counter() - started)
            same = same and verdicts == reference
        s, f = statistics.median(slow), statistics.median(fast)
        print(f"| {nudge:g} | {unchanged}/{len(probe.right)} | {s:.1f} | {f:.1f} | {s / f:.2f}x | {same} |")
    return 0


def _bundled_base() -> str:
    from loop.bootstrap import ensure_hf_base

    return str(ensure_hf_base())


if __name__ == "__main__":
    sys.exit(main())
