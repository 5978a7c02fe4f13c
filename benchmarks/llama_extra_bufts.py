"""What loading without llama.cpp's extra buffer types costs: prompt and decode speed, on and off, side by side.

    python benchmarks/llama_extra_bufts.py [--gguf PATH ...] [--runs 3] [--threads 0] [--tokens 64] [--json]

``loop.core.gguf_model.without_extra_buffer_types()`` makes every model load without llama.cpp's extra weight
layouts (AMX, CPU repack), because on AMX CPUs the first decode segfaults with them (ggml-org/llama.cpp#20824).
On other CPUs the repacked layouts are llama.cpp's fast path for some quantised types, so this measures what the
app gives up there. Every measurement runs in a fresh child process (the layout is chosen at load time), the two
modes alternating run by run on the same GGUF, prompt and greedy decoding. Reported per file and mode: prompt
tokens/s (time to first token over the prompt's tokens), decode tokens/s (tokens after the first over the time
after the first), and the ratio off / on of their medians. A child that crashes is reported with its exit status.
Default files: the bundled base (Q4_1); pass a trained version's Q8_0 file with --gguf for the served case.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = ("Write a detailed, multi-paragraph essay about the history of bread, from ancient Egypt to modern "
          "bakeries. Cover grains, leavening, ovens, mills, guilds, industrial baking and sourdough. ") * 4


def child(gguf: str, off: bool, threads: int, tokens: int) -> int:
    """One measurement; prints one JSON line."""
    import llama_cpp

    from loop.core.gguf_model import without_extra_buffer_types

    if off:
        without_extra_buffer_types()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=1024, n_threads=threads or None, verbose=False, seed=0)
    prompt = llm.tokenize(PROMPT.encode())
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=True, seed=0):
        now = time.perf_counter()
        if chunk["choices"][0]["text"]:
            first, last, n = first or now, now, n + 1
    assert first is not None and last is not None and n > 1, "the model produced fewer than two tokens"
    print(json.dumps({"prompt_tokens": len(prompt), "prompt_tok_s": len(prompt) / (first - t0),
                      "decode_tok_s": (n - 1) / (last - first), "tokens": n}))
    return 0


def measure(gguf: Path, off: bool, threads: int, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(gguf), "off" if off else "on", str(threads),
                           str(tokens)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        gguf, mode, threads, tokens = sys.argv[2:6]
        return child(gguf, mode == "off", int(threads), int(tokens))
    from loop.core.bootstrap import find_bundled_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", nargs="+", type=Path, default=None, help="GGUF files (default: the bundled base)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0 = its default)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tqdm.auto import tqdm

    files = args.gguf or [find_bundled_gguf()]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.system()} {platform.machine()}",
              "files": []}
    with tqdm(total=len(files) * args.runs * 2, desc="runs") as bar:
        for gguf in files:
            runs: dict[str, list[dict]] = {"on": [], "off": []}
            for _ in range(args.runs):
                for mode in ("on", "off"):
                    runs[mode].append(measure(gguf, mode == "off", args.threads, args.tokens))
                    bar.update()
            row: dict = {"file": gguf.name, "size_mib": round(gguf.stat().st_size / 2**20), "runs": runs}
            for mode in ("on", "off"):
                ok = [r for r in runs[mode] if "error" not in r]
                row[mode] = ({k: round(statistics.median(r[k] for r in ok), 1) for k in ("prompt_tok_s", "decode_tok_s")}
                             if ok else {"error": runs[mode][0]["error"]})
            if "error" not in row["on"] and "error" not in row["off"]:
                row["ratio_off_on"] = {k: round(row["off"][k] / row["on"][k], 3) for k in ("prompt_tok_s", "decode_tok_s")}
            report["files"].append(row)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['date']}, {report['machine']}, {args.runs} runs per mode, medians")
        print("| file | extra buffer types on: prompt / decode tok/s | off: prompt / decode tok/s | off/on |")
        print("| --- | --- | --- | --- |")
        for row in report["files"]:
            def cell(m: dict) -> str:
                return m.get("error") or f"{m['prompt_tok_s']} / {m['decode_tok_s']}"
            ratio = row.get("ratio_off_on")
            print(f"| {row['file']} ({row['size_mib']} MiB) | {cell(row['on'])} | {cell(row['off'])} | "
                  + (f"{ratio['prompt_tok_s']:.2f} / {ratio['decode_tok_s']:.2f} |" if ratio else "- |"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
