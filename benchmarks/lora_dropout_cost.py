"""What LoRA dropout costs a CPU training step: the real trainer at ``lora_dropout`` 0.05 against 0, side by side.

    python benchmarks/lora_dropout_cost.py [--scenario seed_collective] [--steps 24] [--repeats 2] [--base DIR]

PEFT puts a ``nn.Dropout`` on the input of every adapted linear layer: seven per decoder block on SmolLM2-135M,
210 per forward pass, each drawing a fresh Bernoulli mask over the layer's input. On a GPU that is noise; on
two CPU cores, with batches of two chat turns of about 50 tokens, drawing those masks is a fair share of a
step that is otherwise small matrix products. This times ``trainer.train.train`` itself (TRL, PEFT, the KL
anchor, the optimizer, the loss guard: everything a cycle's training step does) on a scenario's curated
corrections mixed half and half with the shipped general replay (``learning_sweep.curated_examples``, as a
cycle's decide stage mixes them), ``--steps`` optimizer steps per run, no epoch judge (its cost does not depend
on dropout), the configurations interleaved ``--repeats`` times so the machine's drift falls on both.

Reported: each configuration's median seconds per optimizer step (the trainer's own ``train_time_s`` over its
steps) and the ratio. What the change does to learning is measured by ``learning_sweep.py --config
"dropout=0"``, not here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DROPOUTS = (0.05, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="seed_collective", help="a scenario of benchmarks/scenarios/")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base", default=None, help="HF base directory (default: the bundled model, converted)")
    args = parser.parse_args(argv)

    import torch
    from learning_sweep import curated_examples, load_scenario

    from trainer.base_model import resolve_base
    from trainer.config import TrainConfig
    from trainer.data import build_training_set
    from trainer.evaluate import load_general_replay
    from trainer.train import train

    base = resolve_base(args.base)
    corrections = curated_examples(load_scenario(args.scenario))
    mixed = build_training_set(corrections, load_general_replay(TrainConfig()), 0.5, seed=0)
    config = replace(TrainConfig(), max_steps=args.steps, select_best_epoch=False, save_steps=10_000)
    per_step: dict[float, list[float]] = {p: [] for p in DROPOUTS}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for p in DROPOUTS:
                metrics = train(mixed, Path(work) / f"run-{repeat}-{p}", base=base,
                                config=replace(config, lora_dropout=p))
                per_step[p].append(metrics["train_time_s"] / metrics["steps"])
                print(f"repeat {repeat}, lora_dropout {p}: {per_step[p][-1]:.3f} s/step "
                      f"({metrics['steps']} steps)", flush=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; {args.scenario}: {len(mixed)} examples, batch {config.batch_size}, "
          f"{args.steps} steps x {args.repeats} repeats each")
    medians = {p: statistics.median(v) for p, v in per_step.items()}
    for p in DROPOUTS:
        print(f"lora_dropout {p}: median {medians[p]:.3f} s/step (runs: "
              + ", ".join(f"{s:.3f}" for s in per_step[p]) + ")")
    print(f"0.05 / 0: {medians[0.05] / medians[0.0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
