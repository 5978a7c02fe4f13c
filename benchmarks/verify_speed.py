"""The GGUF verification's probe decoding: one probe at a time on both sides vs one batch and only the probes needed.

    python benchmarks/verify_speed.py [--runs 3] [--gguf FILE --merged DIR]

``trainer.verify.verify_gguf`` decodes the fixed probes (20 prompts, 16 tokens) greedily twice: the merged model's
answer, the path both models are then teacher-forced along (gated), and llama.cpp's free-running answer (reported
only: ``exact_agreement``). It used to decode every probe one token per forward pass on both sides; now the merged
model answers all probes in one batched ``generate`` call, and llama.cpp decodes only the probes where its argmax,
teacher-forced along the merged answer, leaves that answer. Both paths run here in the same ``verify_gguf`` on the
same files and held-out set, alternating run by run; the old one with ``_HfSide.greedy_batch`` swapped for
``_HfSide.greedy`` probe by probe and every probe decoded free-running in llama.cpp, which is what it did before.

Files: by default the bundled SmolLM2-135M's HF weights (``loop.bootstrap.ensure_hf_base``) exported to Q8_0 by
``trainer.export.export_variant`` with verification off (a cycle's export, on the base); ``--gguf`` with
``--merged`` takes another pair (e.g. the bundled Q4_1 file and the HF weights derived from it). Held-out set: the
probes' reference answers (the export's fallback set). Verification runs with the default ``VerifyConfig``.

Reported per path: the median seconds of the whole ``verify_gguf``, of the merged model's probe answers and of
llama.cpp's free-running decodes (and how many probes it decoded), ``exact_agreement``; then the ratio of the
medians, and whether the gated result (pass, agreement, losses, held-out agreement) and the probe answers the
models were teacher-forced along are the same on both paths in every run; last, the probes whose exact verdict
differs between the paths (llama.cpp scoring a sequence at once and a token at a time rounds differently, which can
flip a near-tie: see ``trainer/verify.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # verify_gguf's progress bars would interleave with the table

# The figures the gate reads (and the ones reported beside them that depend only on the teacher-forced answers).
GATED = ("passed", "agreement", "token_agreement", "tokenizer_agreement", "hf_eval_loss", "gguf_eval_loss",
         "loss_delta", "loss_abs_delta", "eval_agreement")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gguf", type=Path, help="GGUF file to verify (default: the base exported to Q8_0)")
    parser.add_argument("--merged", type=Path, help="the HF model directory it came from (with --gguf)")
    args = parser.parse_args(argv)
    if (args.gguf is None) != (args.merged is None):
        parser.error("--gguf and --merged go together")

    import torch

    from trainer.export_config import VerifyConfig
    from trainer.verify import load_probes, probes_as_examples, verify_gguf

    probes = load_probes()
    examples = probes_as_examples(probes)
    config = VerifyConfig()
    with tempfile.TemporaryDirectory(prefix="verify-speed-") as tmp:
        gguf, merged = (args.gguf, args.merged) if args.gguf else _base_q8_0(Path(tmp))
        print(f"{platform.machine()}, {os.cpu_count()} cores, verify threads {config.resolved_threads()}, torch "
              f"{torch.__version__}; {gguf.name} against {merged}; {len(probes)} probes x {config.probe_tokens} "
              f"tokens, {len(examples)} held-out examples")
        timings: dict[str, list[dict]] = {"old": [], "new": []}
        results: dict[str, list] = {"old": [], "new": []}
        for _ in range(args.runs):
            for path in ("old", "new"):
                with _timed(old=path == "old") as clock:
                    started = time.perf_counter()
                    result = verify_gguf(gguf, merged, probes, examples, config)
                    clock["total"] = time.perf_counter() - started
                timings[path].append(clock)
                results[path].append(result)

    def median(path: str, key: str) -> float:
        return statistics.median(t[key] for t in timings[path])

    print("| path | verify_gguf (s) | merged-model probe answers (s) | llama.cpp free-running decodes (s) "
          "| probes decoded by llama.cpp | exact_agreement |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for path in ("old", "new"):
        decoded = sorted({t["decoded"] for t in timings[path]})
        exact = sorted({r.exact_agreement for r in results[path]})
        print(f"| {path} | {median(path, 'total'):.1f} | {median(path, 'hf'):.1f} | {median(path, 'gguf'):.1f} "
              f"| {'/'.join(map(str, decoded))} of {len(probes)} | {'/'.join(map(str, exact))} |")
    print(f"ratio old / new: verify_gguf {median('old', 'total') / median('new', 'total'):.2f}x, merged-model "
          f"probe answers {median('old', 'hf') / median('new', 'hf'):.2f}x, llama.cpp decodes "
          f"{median('old', 'gguf') / max(median('new', 'gguf'), 1e-9):.2f}x")
    reference = results["old"][0]
    same_gate = all({k: getattr(r, k) for k in GATED} == {k: getattr(reference, k) for k in GATED}
                    for path in ("old", "new") for r in results[path])
    same_answers = all([d["hf_ids"] for d in r.probe_details] == [d["hf_ids"] for d in reference.probe_details]
                       for path in ("old", "new") for r in results[path])
    print(f"same gated result in every run: {same_gate} ({', '.join(f'{k}={getattr(reference, k)}' for k in GATED)})")
    print(f"same merged-model probe answers in every run: {same_answers}")
    flipped = [o["prompt"] for o, n in zip(reference.probe_details, results["new"][0].probe_details)
               if o["exact"] != n["exact"]]
    print(f"probes whose exact verdict differs between the paths: {len(flipped)} {flipped}")
    return 0


@contextmanager
def _timed(old: bool):
    """Time the two probe decodings inside one `verify_gguf`; with `old`, decode as it did before: the merged
    model one probe at a time, llama.cpp every probe free-running."""
    from trainer import verify

    clock = {"hf": 0.0, "gguf": 0.0, "decoded": 0}
    greedy_batch, gguf_greedy = verify._HfSide.greedy_batch, verify._GgufSide.greedy

    def hf_answers(self, prompts, n, stops):
        started = time.perf_counter()
        try:
            if old:
                return [self.greedy(p, n, stops) for p in prompts]
            return greedy_batch(self, prompts, n, stops)
        finally:
            clock["hf"] += time.perf_counter() - started

    def gguf_answer(self, ids, n, stops):
        started = time.perf_counter()
        try:
            return gguf_greedy(self, ids, n, stops)
        finally:
            clock["gguf"] += time.perf_counter() - started
            clock["decoded"] += 1

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(verify._HfSide, "greedy_batch", hf_answers))
        stack.enter_context(mock.patch.object(verify._GgufSide, "greedy", gguf_answer))
        if old:
            stack.enter_context(mock.patch.object(verify, "_follows", lambda forced, answer: False))
        yield clock


def _base_q8_0(out: Path) -> tuple[Path, Path]:
    from loop.bootstrap import ensure_hf_base
    from trainer.export import export_variant
    from trainer.export_config import ExportConfig, VerifyConfig

    base = ensure_hf_base()
    started = time.perf_counter()
    result = export_variant(None, base, out / "export", ExportConfig(quantization="Q8_0",
                                                                     verify=VerifyConfig(enabled=False)))
    print(f"exported {base} to {result.gguf_path.name} in {time.perf_counter() - started:.0f} s")
    return result.gguf_path, result.merged_dir


if __name__ == "__main__":
    sys.exit(main())
