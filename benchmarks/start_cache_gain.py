"""What a run saves when its starting weights' figures are already kept beside them (trainer/start_cache.py).

    python benchmarks/start_cache_gain.py [--scenario seed_collective] [--repeats 3] [--base DIR]

Every run judges against its starting weights: their greedy answers to the regression prompts
(``KeptProbe.for_run``) and their held-out and regression losses (``start_loss``). This times exactly those
three calls as a run makes them, on the bundled model with a PEFT adapter attached (as a run holds it), the
shipped regression set and a scenario's curated corrections (standing in for a cycle's held-out wordings, of
which they are about three times as many), first into an empty cache (what the first run from
some weights pays) and then from the cache (what a grid's other variants, the refit and a cycle run again on
the same weights pay), ``--repeats`` times each, every cold repeat into a fresh copy of the weights directory.

Reported: median seconds cold and warm, and the seconds a run saves.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="seed_collective", help="a scenario of benchmarks/scenarios/")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", default=None, help="HF base directory (default: the bundled model, converted)")
    args = parser.parse_args(argv)

    import torch
    from learning_sweep import curated_examples, load_scenario
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.base_model import resolve_base
    from trainer.config import TrainConfig
    from trainer.evaluate import regression_examples, start_loss
    from trainer.general_kept import KeptProbe
    from trainer.run_setup import load_tokenizer

    config = TrainConfig()
    base = Path(resolve_base(args.base))
    held_out = curated_examples(load_scenario(args.scenario))
    regression = regression_examples(config.regression_set or None)
    seconds: dict[str, list[float]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            weights = Path(work) / f"weights-{repeat}"  # a fresh directory: an empty cache
            weights.mkdir()
            for source in base.iterdir():
                if source.is_file():
                    (weights / source.name).symlink_to(source.resolve())
            tokenizer = load_tokenizer(str(weights))
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32),
                                   LoraConfig(r=config.lora_rank, target_modules="all-linear"))
            for kind in ("cold", "warm"):
                started = time.perf_counter()
                KeptProbe.for_run(Path(work) / f"run-{repeat}-{kind}", model, tokenizer, regression,
                                  config.max_length, weights)
                for examples in (held_out, regression):
                    start_loss(model, examples, tokenizer, config.max_length, config.batch_size, weights)
                seconds[kind].append(time.perf_counter() - started)
                print(f"repeat {repeat}: {kind} {seconds[kind][-1]:.2f} s", flush=True)
    cold, warm = statistics.median(seconds["cold"]), statistics.median(seconds["warm"])
    print(f"{time.strftime('%Y-%m-%d')} {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}: starting figures of one run {cold:.2f} s cold, {warm:.3f} s from the cache "
          f"({cold - warm:.1f} s saved per run); {len(regression)} regression prompts, {len(held_out)} curated corrections")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
