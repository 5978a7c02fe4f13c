"""Decode speed and time to first token: the app's generation path vs plain llama-cpp-python.

    python benchmarks/app_decode.py [--gguf PATH] [--tokens 128] [--runs 3] [--threads 0] [--json]

Both paths run in this process on the same GGUF, the same prompt tokens (rendered by the GGUF's
chat template), greedy decoding, alternating run by run, each with a cold KV cache (reset) so
that time to first token includes evaluating the prompt:

  * app:   ``app.engine.Engine.chat`` — input policy, history fitting, hot-swap check, the model
           lock, per-token log-probabilities, detokenising, and logging the turn (queued);
  * plain: ``llama_cpp.Llama.create_completion(prompt_tokens, stream=True)``, nothing else.

Reported: decode tokens/s (tokens after the first / time after the first), TTFT, their ratio
(target >= 0.95), and decode speed as a share of the memory-bandwidth ceiling: each token reads
~all weights once, so ceiling tokens/s = copy bandwidth / GGUF size, with bandwidth measured by a
numpy copy (bytes read + written). For reference it also times what
``create_chat_completion(logprobs=True)`` costs (it needs ``logits_all=True``), and with
``--cold-start`` the time from launching ``python -m app`` on a fresh home to the first answer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a detailed, multi-paragraph essay about the history of bread, from ancient "
                                "Egypt to modern bakeries."},
]


def memory_bandwidth(size_mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a numpy copy (read + write), best of ``repeats``."""
    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def run_app(engine, max_tokens: int) -> dict:
    from app.generation import Sampling

    engine._served.model.llama.reset()  # cold KV cache, like the plain run
    out = None
    t0 = time.perf_counter()
    for event in engine.chat(conversation_id=None, history=[], user_message=MESSAGES[1]["content"],
                             system_prompt=MESSAGES[0]["content"],
                             sampling=Sampling(temperature=0.0, max_tokens=max_tokens, seed=0)):
        if event.kind == "done":
            out = event.outcome
    total = time.perf_counter() - t0
    n = out.completion_tokens
    return {"ttft_s": out.ttft_s, "decode_tok_s": (n - 1) / out.decode_s if n > 1 and out.decode_s else None,
            "tokens": n, "total_s": total, "text": out.answer}


def run_plain(llm, prompt_tokens: list[int], max_tokens: int) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    text = []
    for chunk in llm.create_completion(prompt_tokens, max_tokens=max_tokens, temperature=0.0, stream=True, seed=0):
        now = time.perf_counter()
        if chunk["choices"][0]["text"]:  # the closing chunk (finish_reason only) is not a token
            first = first or now
            last = now
            chunks += 1
            text.append(chunk["choices"][0]["text"])
    ttft = first - t0
    # One streamed chunk per generated token (plain ASCII output).
    n = chunks
    return {"ttft_s": ttft, "decode_tok_s": (n - 1) / (last - first) if n > 1 else None, "tokens": n,
            "total_s": last - t0, "text": "".join(text).strip()}


def run_logits_all(gguf: Path, n_ctx: int, n_threads: int, max_tokens: int) -> dict:
    """What the literal create_chat_completion(logprobs=True, top_logprobs=1) path costs."""
    from loop.core.gguf_model import open_llama

    llm = open_llama(gguf, n_ctx=n_ctx, logits_all=True, n_threads=n_threads)
    try:
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for chunk in llm.create_chat_completion(MESSAGES, max_tokens=max_tokens, temperature=0.0, stream=True,
                                                logprobs=True, top_logprobs=1, seed=0):
            now = time.perf_counter()
            if chunk["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
                n += 1
        return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (last - first) if n > 1 else None, "tokens": n}
    finally:
        llm.close()


def cold_start(max_tokens: int = 32, timeout: float = 180.0) -> dict:
    """Seconds from launching `python -m app` on a fresh home to the page being served and to
    the first complete answer (through Gradio's API, as a browser's request would go)."""
    import socket
    import subprocess
    import urllib.request

    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tempfile.mkdtemp(prefix="cold-start-")
    env = {**os.environ, "LOOP_HOME": home, "LOOP_APP__MIRROR_DIR": "off"}
    repo = Path(__file__).resolve().parent.parent
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                    raise RuntimeError("the app did not start") from None
                time.sleep(0.05)
        up = time.perf_counter() - t0
        client = Client(url, verbose=False)
        client.predict("Hello! Who are you?", "You are a helpful, concise assistant.", 0.7, 0.9, max_tokens,
                       api_name="/chat")
        answered = time.perf_counter() - t0
        # CPU time the app spent getting there: on a busy machine the wall time above includes
        # waiting for other people's processes; on an idle one it is close to this.
        import psutil

        cpu = psutil.Process(proc.pid).cpu_times()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"serving_s": up, "first_answer_s": answered, "max_tokens": max_tokens,
            "app_cpu_s": cpu.user + cpu.system}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="GGUF to serve (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: the app's default, half the cores)")
    parser.add_argument("--skip-logits-all", action="store_true")
    parser.add_argument("--cold-start", action="store_true", help="also time `python -m app` start to first answer")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    os.environ["LOOP_HOME"] = str(home)
    os.environ["LOOP_APP__MIRROR_DIR"] = "off"
    os.environ["LOOP_MODEL__N_THREADS"] = str(args.threads)
    if args.gguf:
        os.environ["LOOP_MODEL__BASE_GGUF"] = str(Path(args.gguf).resolve())

    from app.engine import Engine
    from loop.config import load_config
    from loop.core.gguf_model import llama_threads, open_llama

    config = load_config()
    engine = Engine(config)
    engine.warm_up()
    gguf = engine._served.gguf_path
    threads = llama_threads(args.threads)  # the plain run gets the app's thread settings
    plain = open_llama(gguf, n_ctx=config.model.n_ctx, n_threads=threads)
    prompt_tokens = engine._served.model.prompt_tokens(MESSAGES)
    run_plain(plain, prompt_tokens, 8)  # warm both paths the same way

    app_runs, plain_runs = [], []
    for i in range(args.runs):  # alternate (and swap who goes first), so drifting load hits both alike
        if i % 2:
            plain_runs.append(run_plain(plain, prompt_tokens, args.tokens))
            app_runs.append(run_app(engine, args.tokens))
        else:
            app_runs.append(run_app(engine, args.tokens))
            plain_runs.append(run_plain(plain, prompt_tokens, args.tokens))
    engine.close()
    plain.close()

    def med(runs, key):
        return statistics.median(r[key] for r in runs if r[key] is not None)

    bw = memory_bandwidth()
    size = gguf.stat().st_size
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "load_avg_1m": os.getloadavg()[0],
        "gguf": gguf.name, "gguf_mb": size / 2**20, "n_threads": threads,
        "prompt_tokens": len(prompt_tokens), "max_tokens": args.tokens, "runs": args.runs,
        "app": {"decode_tok_s": med(app_runs, "decode_tok_s"), "ttft_s": med(app_runs, "ttft_s"),
                "tokens": med(app_runs, "tokens")},
        "plain": {"decode_tok_s": med(plain_runs, "decode_tok_s"), "ttft_s": med(plain_runs, "ttft_s"),
                  "tokens": med(plain_runs, "tokens")},
        "same_text": all(a["text"] == p["text"] for a, p in zip(app_runs, plain_runs)),
        "per_run": [{"app_ttft_s": a["ttft_s"], "plain_ttft_s": p["ttft_s"], "app_decode_tok_s": a["decode_tok_s"],
                     "plain_decode_tok_s": p["decode_tok_s"]} for a, p in zip(app_runs, plain_runs)],
        "bandwidth_gb_s": bw / 1e9,
        "ceiling_tok_s": bw / size,
    }
    result["decode_ratio"] = result["app"]["decode_tok_s"] / result["plain"]["decode_tok_s"]
    result["ttft_ratio_plain_over_app"] = result["plain"]["ttft_s"] / result["app"]["ttft_s"]
    result["app_share_of_ceiling"] = result["app"]["decode_tok_s"] / result["ceiling_tok_s"]
    if not args.skip_logits_all:
        result["logits_all_logprobs"] = run_logits_all(gguf, config.model.n_ctx, threads, min(args.tokens, 32))
    if args.cold_start:
        result["cold_start"] = cold_start()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    r = result
    print(f"machine: {r['machine']} (1-min load average {r['load_avg_1m']:.1f}); {r['gguf']} {r['gguf_mb']:.0f} MB; "
          f"{r['n_threads']} llama.cpp thread(s); prompt {r['prompt_tokens']} tokens; median of {r['runs']} runs")
    for name in ("app", "plain"):
        x = r[name]
        print(f"  {name:5s}: decode {x['decode_tok_s']:.1f} tok/s, TTFT {x['ttft_s'] * 1e3:.0f} ms ({x['tokens']:.0f} tokens)")
    print(f"  decode ratio app/plain {r['decode_ratio']:.3f} (target >= 0.95); "
          f"TTFT plain/app {r['ttft_ratio_plain_over_app']:.3f}; "
          f"same greedy text: {r['same_text']}")
    print(f"  memory bandwidth (numpy copy) {r['bandwidth_gb_s']:.1f} GB/s -> ceiling {r['ceiling_tok_s']:.0f} tok/s; "
          f"app decode = {100 * r['app_share_of_ceiling']:.0f}% of it")
    if "logits_all_logprobs" in r:
        x = r["logits_all_logprobs"]
        print(f"  for reference, create_chat_completion(logprobs=True) with logits_all=True: decode "
              f"{x['decode_tok_s']:.1f} tok/s, TTFT {x['ttft_s'] * 1e3:.0f} ms")
    if "cold_start" in r:
        x = r["cold_start"]
        print(f"  cold start `python -m app` (fresh home): serving after {x['serving_s']:.1f} s, first answer "
              f"({x['max_tokens']} tokens max) after {x['first_answer_s']:.1f} s (target <= 10 s); the app used "
              f"{x['app_cpu_s']:.1f} CPU-s until then")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
