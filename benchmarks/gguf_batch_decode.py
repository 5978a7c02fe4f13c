"""The cycle's self-replay answers: the general prompts answered one at a time vs decoded side by side.

    python benchmarks/gguf_batch_decode.py [--gguf PATH] [--runs 3] [--max-tokens 96] [--widths 64]

Each cycle's decide stage has the served GGUF answer the general-replay prompts greedily
(``loop.cycle_stages._answered_by``). Both ways of doing it run here in one process on one loaded model
(``GgufModel.load(n_ctx=1024)``, the stage's own, with the default thread count), over the shipped
``trainer/general_replay.jsonl`` prompts, alternating run by run with who goes first swapped each run:

  * one at a time: ``app.probe_runner.greedy_answer`` per prompt (one token per ``llama_decode``);
  * side by side: ``app.probe_runner.greedy_answers`` (``GgufModel.greedy_batch``: one ``llama_decode``
    per step carrying a token of every live sequence), once per ``--widths`` value (sequences at once).

Reported: the tokens generated, the median seconds of each path over ``--runs``, its ratio to one at a
time, and whether every run of every path gave the same answers (text and whether it ended on an
end-of-generation token) as the first one-at-a-time run; the 1-minute load average before and after.
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
    from loop.core.gguf_model import BATCH_WIDTH, GgufModel, llama_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help="GGUF to answer with (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per answer at most (the stage's 96)")
    parser.add_argument("--widths", type=int, nargs="+", default=[BATCH_WIDTH], help="sequences decoded at once")
    args = parser.parse_args(argv)

    gguf = Path(args.gguf) if args.gguf else _bundled_gguf()
    chats = _general_prompts()
    model = GgufModel.load(gguf, n_ctx=1024)
    paths = {"one at a time": lambda: _one_at_a_time(model, chats, args.max_tokens)}
    for width in args.widths:
        paths[f"side by side, width {width}"] = lambda width=width: _side_by_side(model, chats, args.max_tokens, width)

    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    outcomes: dict[str, list[list[tuple[str, bool]]]] = {name: [] for name in paths}
    tokens = 0
    for run in range(args.runs):
        for name in (list(paths) if run % 2 == 0 else list(reversed(paths))):
            started = time.perf_counter()
            answers = paths[name]()
            seconds[name].append(time.perf_counter() - started)
            outcomes[name].append([(a.answer, a.finished) for a in answers])
            if name == "one at a time":
                tokens = sum(a.n_tokens for a in answers)
    model.close()

    print(f"{platform.machine()}, {os.cpu_count()} cores, {llama_threads()} llama.cpp thread(s); {gguf.name}; "
          f"{len(chats)} prompts, max {args.max_tokens} tokens, {tokens} tokens generated one at a time; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    base = statistics.median(seconds["one at a time"])
    reference = outcomes["one at a time"][0]
    print(f"| path | median s ({args.runs} runs) | tokens/s | ratio | same answers |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, values in seconds.items():
        median = statistics.median(values)
        same = all(outcome == reference for outcome in outcomes[name])
        print(f"| {name} | {median:.1f} | {tokens / median:.1f} | {base / median:.2f}x | {same} |")
    return 0


def _one_at_a_time(model, chats: list[list[dict]], max_tokens: int) -> list:
    from app.probe_runner import greedy_answer

    return [greedy_answer(model, chat, max_tokens=max_tokens) for chat in chats]


def _side_by_side(model, chats: list[list[dict]], max_tokens: int, width: int) -> list:
    from app.probe_runner import greedy_answers

    return greedy_answers(model, chats, max_tokens=max_tokens, width=width)


def _general_prompts() -> list[list[dict]]:
    """The shipped general-replay chats without their answers, as the decide stage asks them."""
    from trainer.evaluate import load_general_replay

    return [example["messages"][:-1] for example in load_general_replay()]


def _bundled_gguf() -> Path:
    from loop.core.bootstrap import find_bundled_gguf

    return find_bundled_gguf()


if __name__ == "__main__":
    sys.exit(main())
