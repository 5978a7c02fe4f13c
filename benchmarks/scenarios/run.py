"""Does one cycle of the real loop teach what users and reviewers corrected? The scenario suite, end to end.

    python benchmarks/scenarios/run.py [--scenario NAME ...] [--seeds 0 1 2] [--split unseen|tune|all]
                                       [--objective sft kto sft+kto ...] [--out results.json] [--keep]
                                       [--write-results [--title "Preference: ..."]] [--plot suite.png]
    python benchmarks/scenarios/run.py --from s0.json s1.json ... [--out all.json] [--write-results] [--plot ...]

For every scenario (benchmarks/scenarios/*.json, see suite.py) and seed, in a fresh temporary LOOP_HOME
with its own local Argilla stack on free ports (a fresh home also gives every seed other ids):
  1. the bundled base model is registered as v1;
  2. every chat is logged into the store with the answer the base GGUF gives greedily (the app's token
     limit), unless the chat records the answer its user saw, and the chat's feedback is added;
  3. the turns are pushed to Argilla and reviewed through Argilla's API as the annotator user, by the
     demo's scripted reviewer (a correction is accepted, a thumbs-up rated 5, the rest discarded, or a
     thumbs-down rated 1 when the scenario's ``thumbs_down_review`` is "rate_low");
  4. one cycle runs (loop.cycle.Cycle) with LOOP_TRAINER__SEED=<seed>, timed; the summary's stage seconds
     split the cycle into training and everything else. ``--objective`` runs every scenario x seed once per
     objective, the grid's objective axis set to that one (LOOP_TRAINER__OBJECTIVES), so objectives are
     compared on the served GGUF; without it the configured grid runs;
  5. the served GGUF (the registry's current version) and the base GGUF answer every probe and general
     probe greedily (64 tokens), and the probe's check decides (checks.py).
Each run happens in a child process so that one run's environment, caches and memory never reach the
next. Per run the JSON records: scenario, split, seed, promoted (current != v1), outcome and reason, the
probe pass rate served vs base, how many general probes the base got right and how many of those the
served model still gets right, cycle / train / other seconds, every answer, and two measures of the signal:
the mean words of the probe answers (served vs base: what a thumbs scenario asks to move) and the chosen
variant's preference measure (trainer/preference_measure.py: the held-out rejected answers' log-probability
before and after training, and the chosen answers' win rate), when the snapshot had pairs or labels.

``--write-results`` replaces (or appends) today's section in benchmarks/RESULTS.md, headed ``--title`` (default
"Learning scenario suite") with the date and machine: one row per run and a summary per split (mean, min and
spread of the served pass rate, the worst share of general answers kept). ``--plot`` draws the same runs to a PNG
(plot.py: pass rate served vs base, general answers kept, the cycle's seconds by stage). ``--from`` runs nothing:
it reads the runs of earlier ``--out`` files and groups them by scenario, so a suite run in pieces (a seed at a time, or
resumed after a crash) gets one table, one summary and one plot; the section names the commands that made them.
A scenario file that fails validation stops everything before any run starts, listing every problem.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.scenarios import checks, suite  # noqa: E402
from trainer.config import OBJECTIVES  # noqa: E402

RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
SECTION_TITLE = "Learning scenario suite"
PROBE_MAX_TOKENS = 64


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def log(msg: str) -> None:
    print(f"[scenarios] {msg}", file=sys.stderr, flush=True)


# -- one run (in the child process) ----------------------------------------------------------------

def answer_probes(gguf: Path, probes: list[dict[str, Any]], n_ctx: int) -> list[dict[str, Any]]:
    from app.probe_runner import greedy_answer
    from loop.core.gguf_model import GgufModel

    llm = GgufModel.load(gguf, n_ctx=n_ctx)
    try:
        rows = []
        for probe in probes:
            answer = greedy_answer(llm, probe["messages"], max_tokens=PROBE_MAX_TOKENS).answer
            rows.append({"question": suite.last_user(probe["messages"]), "answer": answer,
                         "passed": checks.passes(probe["check"], answer)})
        return rows
    finally:
        llm.close()


def log_chats(scenario: dict[str, Any], store, base, config) -> dict[str, int]:
    """Log every chat as the app would: the base GGUF's greedy answer, then the user's feedback."""
    from app.probe_runner import greedy_answer
    from loop.core.gguf_model import GgufModel

    counts = {"generated": 0, "recorded": 0, "feedback": 0}
    llm = GgufModel.load(base.gguf_path, n_ctx=config.model.n_ctx)
    try:
        for chat in scenario["chats"]:
            cid = store.new_conversation(client=f"scenario:{scenario['name']}")
            if chat.get("answer"):
                answer, mean_logprob, source = chat["answer"], None, "scenario file"
                counts["recorded"] += 1
            else:
                generated = greedy_answer(llm, chat["messages"], max_tokens=config.app.max_tokens)
                answer, mean_logprob, source = generated.answer, generated.mean_logprob, "base GGUF, greedy"
                counts["generated"] += 1
            tid = store.log_turn(conversation_id=cid, messages=chat["messages"], answer=answer,
                                 model_version=base.id, gguf_sha256=base.gguf_sha256,
                                 sampling={"temperature": 0.0, "source": source}, logprob_mean=mean_logprob)
            fb = chat.get("feedback")
            if fb:
                store.add_feedback(tid, thumbs=fb.get("thumbs"), reasons=fb.get("reasons") or [],
                                   comment=fb.get("comment"), correction=fb.get("correction"),
                                   source=f"scenario:{scenario['name']}")
                counts["feedback"] += 1
    finally:
        llm.close()
    return counts


def mean_words(rows: list[dict[str, Any]]) -> float:
    return statistics.fmean(len(r["answer"].split()) for r in rows) if rows else 0.0


def chosen_preference(summary: dict[str, Any]) -> dict[str, Any]:
    """The preference measure of the variant the cycle's train stage chose ({} when none was chosen)."""
    from loop.cycle_results import TrainResult

    trained = TrainResult.from_dict((summary.get("stages") or {}).get("train", {}).get("result"))
    return (trained.best_row().get("preference") or {}) if trained.best else {}


def run_one(scenario: dict[str, Any], seed: int, home: Path) -> dict[str, Any]:
    """One scenario x seed in ``home`` (this process's environment is set up for it by ``child_main``)."""
    from annotation.push import push
    from annotation.server import start_stack, stop_stack
    from loop.bootstrap import ensure_hf_base
    from loop.config import load_config
    from loop.core.bootstrap import ensure_base_version
    from loop.core.registry import Registry
    from loop.core.store import Store
    from loop.cycle import Cycle
    from loop.demo import scripted_review

    config = load_config()
    result: dict[str, Any] = {"scenario": scenario["name"], "kind": scenario["kind"], "split": scenario["split"],
                              "seed": seed, "objective": ",".join(config.trainer.objectives)}
    t_run = time.perf_counter()
    try:
        stack = start_stack(config=config.stack)
        base = ensure_base_version(config)
        # Setting the home up, as `make demo` does: the cycle after the review does not derive the trainer's
        # weights (the train stage's base_derived_s says when one did).
        t_base = time.perf_counter()
        ensure_hf_base(config)
        result["base_derived_s"] = round(time.perf_counter() - t_base, 1)
        store = Store.open()
        result["chats"] = log_chats(scenario, store, base, config)
        result["push"] = push(config, store=store, progress=False).as_dict()
        result["review"] = scripted_review(config, store, stack,
                                           thumbs_down=scenario.get("thumbs_down_review", "discard"))
        t0 = time.perf_counter()
        summary = Cycle(config, progress=False).run()
        cycle_s = time.perf_counter() - t0
    finally:
        stop_stack()
    stages = summary.get("stages") or {}
    train_s = float((stages.get("train") or {}).get("seconds") or 0.0)
    registry = Registry()
    base_version, current = registry.list()[0], registry.current()
    result.update(
        promoted=current.id != base_version.id, current_version=current.id, outcome=summary.get("outcome"),
        reason=summary.get("reason"), variant=current.variant if current.id != base_version.id else None,
        cycle_seconds=round(cycle_s, 1), train_seconds=round(train_s, 1), other_seconds=round(cycle_s - train_s, 1),
        served_seconds=served_seconds(summary, cycle_s) if current.id != base_version.id else None,
        stage_seconds={name: s.get("seconds") for name, s in stages.items()},
        base_derived_in_cycle_s=((stages.get("train") or {}).get("result") or {}).get("base_derived_s"),
        preference=chosen_preference(summary),
        # the chosen variant trained again with the held-out wordings (trainer/refit.py): used, skipped, refused
        refit={k: v for k, v in (((stages.get("train") or {}).get("result") or {}).get("refit") or {}).items()
               if k in ("status", "reason", "examples", "general_kept", "wall_time_s")},
    )
    probes, general = scenario["probes"], scenario["general_probes"]
    base_probe = answer_probes(base_version.gguf_path, probes, config.model.n_ctx)
    base_general = answer_probes(base_version.gguf_path, general, config.model.n_ctx)
    if result["promoted"]:
        served_probe = answer_probes(current.gguf_path, probes, config.model.n_ctx)
        served_general = answer_probes(current.gguf_path, general, config.model.n_ctx)
    else:  # the served model is the base: its answers are the base's
        served_probe, served_general = base_probe, base_general
    base_right = [i for i, row in enumerate(base_general) if row["passed"]]
    kept = [i for i in base_right if served_general[i]["passed"]]
    result.update(
        probe_pass_served=sum(r["passed"] for r in served_probe) / len(probes),
        probe_pass_base=sum(r["passed"] for r in base_probe) / len(probes),
        probes=len(probes),
        general_base_right=len(base_right),
        general_kept=len(kept),
        general_probes=len(general),
        general_kept_rate=(len(kept) / len(base_right)) if base_right else None,
        probe_words_served=round(mean_words(served_probe), 1), probe_words_base=round(mean_words(base_probe), 1),
        run_seconds=round(time.perf_counter() - t_run, 1),
        answers={
            "probes": [{"question": b["question"], "base": b["answer"], "base_passed": b["passed"],
                        "served": s["answer"], "served_passed": s["passed"]} for b, s in zip(base_probe, served_probe)],
            "general": [{"question": b["question"], "base": b["answer"], "base_passed": b["passed"],
                         "served": s["answer"], "served_passed": s["passed"]}
                        for b, s in zip(base_general, served_general)],
        },
    )
    return result


def child_main(name: str, seed: int, home: str, out: str, objective: str | None = None) -> int:
    os.environ["LOOP_HOME"] = home
    os.environ.setdefault("LOOP_TOOLS", str(REPO / ".loop" / "tools"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["LOOP_TRAINER__SEED"] = str(seed)
    if objective:
        os.environ["LOOP_TRAINER__OBJECTIVES"] = objective
    port, search, redis = free_ports(3)
    os.environ.update({"LOOP_STACK__PORT": str(port), "LOOP_STACK__SEARCH_PORT": str(search),
                       "LOOP_STACK__REDIS_PORT": str(redis)})
    # An external Argilla would mix runs in one dataset: every run gets its own local stack.
    os.environ.pop("ARGILLA_API_URL", None)
    os.environ.pop("ARGILLA_API_KEY", None)
    (scenario,) = suite.load_scenarios(names=[name])
    for key, value in scenario.get("settings", {}).items():
        section, field = key.split(".")
        os.environ[f"LOOP_{section.upper()}__{field.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    result = run_one(scenario, seed, Path(home))
    Path(out).write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


# -- the suite (in the parent process) -------------------------------------------------------------

def run_suite(scenarios: list[dict[str, Any]], seeds: list[int], keep: bool,
              objectives: list[str] | None = None) -> list[dict[str, Any]]:
    results = []
    runs = [(scenario, seed, objective) for scenario in scenarios for objective in (objectives or [None])
            for seed in seeds]
    total = len(runs)
    for scenario, seed, objective in runs:
        home = Path(tempfile.mkdtemp(prefix=f"scenario-{scenario['name']}-s{seed}-"))
        out = home / "scenario-result.json"
        n = len(results) + 1
        log(f"run {n}/{total}: {scenario['name']} ({scenario['split']}) seed {seed}"
            f"{' objective ' + objective if objective else ''} in {home}")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", scenario["name"], str(seed), str(home),
             str(out)] + ([objective] if objective else []),
            cwd=str(REPO), stdout=sys.stderr)  # stdout stays the results' JSON alone
        if proc.returncode == 0 and out.is_file():
            result = json.loads(out.read_text(encoding="utf-8"))
        else:
            result = {"scenario": scenario["name"], "kind": scenario["kind"], "split": scenario["split"],
                      "seed": seed, "objective": objective, "promoted": False, "outcome": "failed",
                      "reason": f"the run's process exited with {proc.returncode} (its output is above)"}
        result["home"] = str(home) if keep else None
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
        results.append(result)
        log(progress_line(result, n, total, time.perf_counter() - t0))
    return results


def served_seconds(summary: dict[str, Any], cycle_s: float) -> float:
    """Seconds from the cycle's start until its new version served: the end of ``promote``. After it the fixed
    measures of the new version and its parent (the Versions tab: ``promote``'s ``after_stage_seconds``),
    ``publish`` and ``report`` run before the cycle returns."""
    from loop.cycle import STAGE_NAMES

    stages = summary.get("stages") or {}
    after = STAGE_NAMES[STAGE_NAMES.index("promote") + 1:]
    tail = float((stages.get("promote") or {}).get("after_stage_seconds") or 0.0) + sum(
        float((stages.get(name) or {}).get("seconds") or 0.0) for name in after)
    return round(cycle_s - tail, 1)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def progress_line(r: dict[str, Any], n: int, total: int, seconds: float) -> str:
    if "probe_pass_served" not in r:
        return f"done {n}/{total}: {r['scenario']} seed {r['seed']}: FAILED ({r.get('reason')}) in {seconds:.0f}s"
    return (f"done {n}/{total}: {r['scenario']} seed {r['seed']} objective {r.get('objective')}: "
            f"{'promoted ' + r['current_version'] if r['promoted'] else 'NOT promoted (' + str(r.get('reason')) + ')'}; "
            f"probes {_pct(r['probe_pass_served'])} served vs {_pct(r['probe_pass_base'])} base; "
            f"general kept {r['general_kept']}/{r['general_base_right']}; "
            f"probe words {r.get('probe_words_served')} served vs {r.get('probe_words_base')} base; "
            f"refit {(r.get('refit') or {}).get('status', '-')}; "
            f"cycle {r['cycle_seconds']:.0f}s (train {r['train_seconds']:.0f}s, served at "
            f"{_seconds(r.get('served_seconds'))}); run {seconds:.0f}s")


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}s"


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"


def split_summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per split and objective (objectives are compared, never averaged together)."""
    rows = []
    objectives = list(dict.fromkeys(r.get("objective") for r in results))
    for split, objective in [(s, o) for s in suite.SPLITS for o in objectives]:
        runs = [r for r in results if r.get("split") == split and r.get("objective") == objective]
        if not runs:
            continue
        rates = [r.get("probe_pass_served", 0.0) for r in runs]
        kept = [r["general_kept_rate"] for r in runs if r.get("general_kept_rate") is not None]
        rows.append({
            "split": split, "objective": objective, "runs": len(runs), "promoted": sum(bool(r.get("promoted")) for r in runs),
            "scenarios": len({r["scenario"] for r in runs}),
            "pass_mean": statistics.fmean(rates), "pass_min": min(rates), "pass_spread": max(rates) - min(rates),
            "worst_general_kept": min(kept) if kept else None,
        })
    return rows


def markdown_section(results: list[dict[str, Any]], command: str | list[str], date: str, title: str = SECTION_TITLE,
                     machine_name: str | None = None) -> str:
    """Today's RESULTS.md section: one row per run, then ``split_summary``. ``command``: what made the runs
    (several when they were merged from earlier reports)."""
    commands = [command] if isinstance(command, str) else command
    lines = [
        f"## {title} ({date}, {machine_name or machine()})",
        "",
        f"Command{'s' if len(commands) > 1 else ''}: {'; '.join(f'`{c}`' for c in commands)} — per scenario and "
        "seed: a fresh LOOP_HOME and local Argilla stack, the chats "
        "answered by the base GGUF and logged with their feedback, push, the scripted reviewer, one real cycle "
        "(default config, `LOOP_TRAINER__SEED`=seed), then the served and the base GGUF answer every probe "
        f"greedily ({PROBE_MAX_TOKENS} tokens). Probes ask the taught things in words no chat used; general "
        "kept = general probes the base answered right that the served model still answers right.",
        "",
        "| scenario | split | objective | seed | promoted | probe pass (served vs base) | general kept "
        "| probe words (served vs base) | rejected log-prob (start → trained) | cycle s (train / other) "
        "| served at s |",
        "| --- | --- | --- | ---: | --- | --- | --- | --- | --- | --- | ---: |",
    ]
    for r in results:
        if "probe_pass_served" not in r:
            lines.append(f"| {r['scenario']} | {r['split']} | {r.get('objective') or '-'} | {r['seed']} | "
                         f"failed: {r.get('reason')} | - | - | - | - | - | - |")
            continue
        promoted = "yes" if r["promoted"] else f"no: {r.get('reason') or r.get('outcome')}"
        pref = r.get("preference") or {}
        rejected = (f"{pref['rejected_logprob_start']:.2f} → {pref['rejected_logprob']:.2f}"
                    if pref.get("rejected_logprob") is not None and pref.get("rejected_logprob_start") is not None
                    else "-")
        words = (f"{r['probe_words_served']:.0f} vs {r['probe_words_base']:.0f}"
                 if r.get("probe_words_served") is not None else "-")
        lines.append(
            f"| {r['scenario']} | {r['split']} | {r.get('objective') or '-'} | {r['seed']} | {promoted} | "
            f"{_pct(r['probe_pass_served'])} vs {_pct(r['probe_pass_base'])} | "
            f"{r['general_kept']}/{r['general_base_right']} | {words} | {rejected} | "
            f"{r['cycle_seconds']:.0f} ({r['train_seconds']:.0f} / {r['other_seconds']:.0f}) | "
            f"{_seconds(r.get('served_seconds')).rstrip('s')} |")
    lines += ["", "| split | objective | scenarios | runs | promoted | pass mean | pass min | pass spread "
              "| worst general kept |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in split_summary(results):
        lines.append(f"| {s['split']} | {s['objective'] or '-'} | {s['scenarios']} | {s['runs']} | "
                     f"{s['promoted']}/{s['runs']} | "
                     f"{_pct(s['pass_mean'])} | {_pct(s['pass_min'])} | {_pct(s['pass_spread'])} | "
                     f"{_pct(s['worst_general_kept'])} |")
    return "\n".join(lines) + "\n"


def write_results(section: str, path: Path = RESULTS_MD) -> None:
    """Replace the section with the same heading (same title, date and machine) or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    heading = section.splitlines()[0]
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n\n" + tail if tail else "")
    path.write_text(new, encoding="utf-8")


class ReportError(ValueError):
    """Earlier ``--out`` files that cannot be read back; the message lists every problem."""


def load_reports(paths: list[str]) -> list[dict[str, Any]]:
    """The reports of earlier ``--out`` files, in the order given; every problem is reported at once."""
    reports, problems = [], []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: cannot be read as JSON ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(report, dict) or not isinstance(report.get("runs"), list):
            problems.append(f"{path}: not a report of this script (no list of runs)")
            continue
        bad = [i for i, r in enumerate(report["runs"]) if not isinstance(r, dict) or not {"scenario", "seed"} <= set(r)]
        if bad:
            problems.append(f"{path}: run(s) {bad} lack a scenario and a seed")
            continue
        reports.append(report)
    if problems:
        raise ReportError("\n".join(problems))
    return reports


def merged_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of several: their runs grouped by scenario (in the order scenarios first appear), then by
    objective and seed; their dates as a range; their machines and commands."""
    runs = [r for report in reports for r in report["runs"]]
    first = {name: i for i, name in reversed(list(enumerate(r["scenario"] for r in runs)))}
    runs.sort(key=lambda r: (first[r["scenario"]], str(r.get("objective") or ""), r["seed"]))
    dates = sorted({report.get("date") for report in reports if report.get("date")})
    date = dates[0] if len(dates) == 1 else (f"{dates[0]} to {dates[-1]}" if dates else dt.date.today().isoformat())
    machines = list(dict.fromkeys(report.get("machine") for report in reports if report.get("machine")))
    commands = list(dict.fromkeys(report.get("command") for report in reports if report.get("command")))
    seeds = sorted({r["seed"] for r in runs})
    return {"date": date, "machine": "; ".join(machines) or machine(), "seeds": seeds, "commands": commands,
            "summary": split_summary(runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        name, seed, home, out = argv[1:5]
        return child_main(name, int(seed), home, out, argv[5] if len(argv) > 5 else None)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", default=[], help="scenario names (default: every one in the split)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--split", choices=("unseen", "tune", "all"), default="all")
    parser.add_argument("--objective", nargs="+", default=[], choices=OBJECTIVES,
                        help="run each scenario x seed once per objective (default: the configured grid, once)")
    parser.add_argument("--out", help="also write the results (every answer included) to this JSON file")
    parser.add_argument("--write-results", action="store_true", help="write today's section of benchmarks/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep each run's LOOP_HOME (its path is in the results)")
    parser.add_argument("--title", default=SECTION_TITLE,
                        help="heading of the RESULTS.md section --write-results writes (date and machine follow it)")
    parser.add_argument("--plot", help="also draw the runs to this PNG (pass rates, general answers kept, seconds)")
    parser.add_argument("--from", dest="from_files", nargs="+", default=[], metavar="JSON",
                        help="run nothing: take the runs of these earlier --out files")
    args = parser.parse_args(argv)
    command = ("python benchmarks/scenarios/run.py " + " ".join(argv)).strip()
    if args.from_files:
        try:
            report = merged_report(load_reports(args.from_files))
        except ReportError as exc:
            print(f"--from files have problems:\n{exc}", file=sys.stderr)
            return 2
        # Reports saved before they named their command are drawn under the command that merged them.
        report["commands"] = report["commands"] or [command]
        return finish(report, args)
    try:
        scenarios = suite.load_scenarios(names=args.scenario)
    except suite.ScenarioError as exc:
        print(f"scenario files have problems:\n{exc}", file=sys.stderr)
        return 2
    if args.split != "all":
        scenarios = [s for s in scenarios if s["split"] == args.split]
    if not scenarios:
        print(f"no scenario matches (split {args.split}, names {args.scenario or 'any'})", file=sys.stderr)
        return 2
    results = run_suite(scenarios, args.seeds, args.keep, args.objective)
    report = {"date": dt.date.today().isoformat(), "machine": machine(), "seeds": args.seeds, "command": command,
              "summary": split_summary(results), "runs": results}
    return finish(report, args)


def finish(report: dict[str, Any], args: argparse.Namespace) -> int:
    """Write what was asked for (--out, --write-results, --plot), print the report; 1 when a run failed.
    The section names the report's commands: its own, or those of the reports it merged."""
    results = report["runs"]
    commands = report.get("commands") or [report["command"]]
    if args.out:
        Path(args.out).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    if args.write_results:
        write_results(markdown_section(results, commands, report["date"], args.title, report["machine"]), RESULTS_MD)
    if args.plot:
        from benchmarks.scenarios.plot import plot_suite

        plot_suite(results, args.plot, title=f"{args.title} ({report['date']}, {report['machine']})")
    print(json.dumps(report, ensure_ascii=False))
    return 0 if all(r.get("outcome") != "failed" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
