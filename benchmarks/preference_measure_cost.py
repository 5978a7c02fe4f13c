"""The preference measure of an SFT run: every answer list scored on its own vs each distinct answer once.

    python benchmarks/preference_measure_cost.py --run DIR --snapshot DIR [--runs 3]

``trainer.preference_measure.add_measures`` puts the preference measure into every SFT run's metrics: the held-out
pairs' chosen and rejected answers and the held-out labels, scored by the run's adapter and by the starting
weights. A reviewed thumbs-down chat gives both a pair (its rejected answer) and an undesirable label (the same
answer), and those answers, the base model's own, are the longest texts scored. Two ways run here, alternating run
by run, on a finished run directory of a cycle (``cycles/<id>/variants/<variant>``) and its snapshot:

  * ``per list``: chosen, rejected and each label kind scored by separate calls (the way before);
  * ``distinct once``: every distinct (prompt, answer) scored once per set of weights (``preference_measures``).

Reported: the median seconds of each (the model loaded once, outside the timing), their ratio, and the largest
difference between the measures.
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
    parser.add_argument("--run", required=True, help="a finished SFT run directory (holding adapter/)")
    parser.add_argument("--snapshot", required=True, help="the snapshot directory holding its pairs and labels")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from trainer.config import TrainConfig
    from trainer.evaluate import load_for_eval
    from trainer.preference_data import LABEL_VALUES, PreferenceData
    from trainer.preference_measure import answer_logprobs, preference_measures
    from trainer.run_report import ADAPTER_DIR

    model, tokenizer = load_for_eval(Path(args.run) / ADAPTER_DIR)
    data, config = PreferenceData.from_dir(args.snapshot), TrainConfig()
    pairs = data.eval_pairs or data.pairs
    labels = data.eval_labels or data.labels

    def per_list() -> dict:
        out = {}
        for suffix, off in (("", False), ("_start", True)):
            for name, rows in (("chosen", [(p["prompt"], p["chosen"]) for p in pairs]),
                               ("rejected", [(p["prompt"], p["rejected"]) for p in pairs]),
                               *((kind, [(r["prompt"], r["answer"]) for r in labels if r["label"] == kind])
                                 for kind in LABEL_VALUES)):
                if rows:
                    values = answer_logprobs(model, tokenizer, rows, config.max_length, config.batch_size,
                                             disable_adapter=off)
                    out[f"{name}_logprob{suffix}"] = sum(values) / len(values)
        return out

    ways = {"per list (before)": per_list,
            "distinct once (now)": lambda: preference_measures(model, tokenizer, data, config)}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    results = {}
    for _ in range(args.runs):
        for way, measure in ways.items():
            started = time.perf_counter()
            results[way] = measure()
            seconds[way].append(time.perf_counter() - started)
    before, now = (statistics.median(s) for s in seconds.values())
    old, new = results.values()
    diff = max(abs(old[k] - new[k]) for k in old)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads; "
          f"{len(pairs)} pairs, {len(labels)} labels")
    print(f"| way | s (median of {args.runs}) | before / this |\n|---|---:|---:|")
    print(f"| per list (before) | {before:.2f} | 1.00x |\n| distinct once (now) | {now:.2f} | {before / now:.2f}x |")
    print(f"largest difference of the measures: {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
