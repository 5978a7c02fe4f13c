"""What the served file's number type costs a fine-tuned model: the same merged weights at f16 and at Q8_0.

    python benchmarks/served_type.py --from RUN.json [RUN.json ...] [--types f16 Q8_0 Q8_0:f16] [--speed-runs 5]

A type ``Q:E`` is quantisation Q with the token embedding and output tensors in E (``export.embedding_type``).

Input: the ``--out`` files of ``benchmarks/scenarios/run.py --keep`` (each run keeps its LOOP_HOME). For every
run, the cycle's merged model (``cycles/<cycle>/export/merged``, what its GGUF was made from) is written as each
type the way the exporter writes it (a float type by the converter, a quantised one from the converter's f32
file). Every file answers the scenario's probes and general probes the way the suite asks the served file
(greedy, llama.cpp, ``run.answer_probes``). Reported per run and type: probe pass rate, general probes kept (of
those the base GGUF answered right in that run), and whether the file made here has the served file's sha256
(the export is deterministic, so the column of the type the cycle served is the served model itself). With
``--speed-runs N``: decode speed and time to first token of every type, the types alternating run by run on one
fixed chat prompt (``app_decode.run_plain``, cold KV cache; medians), with the app's thread settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def merged_dir(run: dict) -> Path:
    return Path(run["home"]) / "cycles" / run["variant"]["cycle"] / "export" / "merged"


def served_gguf(run: dict) -> Path:
    return Path(run["home"]) / "registry" / "versions" / run["current_version"] / "model.gguf"


def scored(gguf: Path, scenario: dict, run: dict, n_ctx: int) -> dict:
    from scenarios.run import answer_probes

    probes = answer_probes(gguf, scenario["probes"], n_ctx)
    general = answer_probes(gguf, scenario["general_probes"], n_ctx)
    base_right = [g["base_passed"] for g in run["answers"]["general"]]
    return {"probe_pass": sum(p["passed"] for p in probes) / len(probes),
            "general_kept": sum(g["passed"] for g, right in zip(general, base_right) if right),
            "general_base_right": sum(base_right),
            "answers": [p["answer"] for p in probes]}


def speed(files: dict[str, Path], runs: int, n_ctx: int) -> dict[str, dict]:
    """Median decode tok/s and time to first token per file, the files alternating run by run (who goes first
    swapped every run), each run with a cold KV cache."""
    from app_decode import MESSAGES, run_plain

    from loop.core.gguf_model import GgufModel

    models = {name: GgufModel.load(path, n_ctx=n_ctx) for name, path in files.items()}
    try:
        tokens = {name: model.prompt_tokens(MESSAGES) for name, model in models.items()}
        for name, model in models.items():
            run_plain(model.llama, tokens[name], 8)  # warm every file the same way
        seen: dict[str, list[dict]] = {name: [] for name in files}
        for i in range(runs):
            for name in (list(files) if i % 2 == 0 else list(reversed(files))):
                seen[name].append(run_plain(models[name].llama, tokens[name], 128))
        return {name: {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rows),
                       "ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in rows)} for name, rows in seen.items()}
    finally:
        for model in models.values():
            model.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="runs_from", nargs="+", required=True, help="run.py --keep --out files")
    parser.add_argument("--types", nargs="+", default=["f16", "Q8_0", "Q8_0:f16"])
    parser.add_argument("--speed-runs", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from scenarios.suite import load_scenarios

    from loop.config import load_config
    from loop.core.io import sha256_file
    from trainer.export_config import FLOAT_TYPES
    from trainer.gguf_convert import convert_hf_to_gguf, quantize_gguf

    n_ctx = load_config().model.n_ctx
    rows = []
    for path in args.runs_from:
        for run in json.loads(Path(path).read_text())["runs"]:
            (scenario,) = load_scenarios(names=[run["scenario"]])
            served_sha = sha256_file(served_gguf(run))
            with tempfile.TemporaryDirectory(prefix="served-type-") as tmp:
                f32 = convert_hf_to_gguf(merged_dir(run), Path(tmp) / "model-f32.gguf", "f32")
                files = {}
                for kind in args.types:  # as the exporter makes them: float types by the converter, the rest quantised
                    quant, _, embedding = kind.partition(":")
                    target = Path(tmp) / f"model-{kind.replace(':', '-')}.gguf"
                    files[kind] = (f32 if kind == "f32" else convert_hf_to_gguf(merged_dir(run), target, kind)
                                   if kind in FLOAT_TYPES else quantize_gguf(f32, target, quant, 0, embedding or None))
                row = {"scenario": run["scenario"], "seed": run["seed"], "served_pass": run["probe_pass_served"]}
                for kind, gguf in files.items():
                    row[kind] = scored(gguf, scenario, run, n_ctx)
                    row[kind]["is_served"] = sha256_file(gguf) == served_sha
                if args.speed_runs:
                    row["speed"] = speed(files, args.speed_runs, n_ctx)
            rows.append(row)
            print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "answers"} if isinstance(v, dict) else v)
                              for k, v in row.items()}), flush=True)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores; types {' / '.join(args.types)}")
    print("| scenario | seed | " + " | ".join(f"{t} probes | {t} general kept" for t in args.types) + " |")
    for row in rows:
        cells = [f"{row[t]['probe_pass']:.0%} | {row[t]['general_kept']}/{row[t]['general_base_right']}"
                 for t in args.types]
        print(f"| {row['scenario']} | {row['seed']} | " + " | ".join(cells) + " |")
        if "speed" in row:
            print("   speed: " + ", ".join(f"{t} {v['decode_tok_s']:.1f} tok/s, first token {v['ttft_ms']:.0f} ms"
                                         for t, v in row["speed"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
