"""How often the canary rule (``loop.core.canary.decide``) is wrong, and how many rated turns it takes.

Many simulated canaries with known true thumbs-down rates: each rated turn goes to the canary with
probability ``share`` (else to the current version) and is a thumbs-down with that arm's true rate;
the rule is checked after every ``check_every`` rated turns (both arms together), exactly as the
cycle would call it, until it decides or the deadline (``max_rated`` rated turns in all) passes,
where ``on_deadline`` applies.

What counts as wrong (the truth is known here): a canary worse than the current version by more
than ``margin`` must be rolled back; a canary no worse (its rate <= the current's) must be
promoted; between the two (worse by at most the margin) either outcome is acceptable.

    python -m benchmarks.canary_sim [--streams 200] [--share 0.2] [--check-every 20] [--max-rated 3000] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

from loop.config import RolloutConfig
from loop.core.canary import Arm, decide

# (current's true thumbs-down rate, canary's): equal, better, slightly worse (inside the margin), worse.
SCENARIOS = [
    ("equal", 0.30, 0.30),
    ("better by 0.10", 0.30, 0.20),
    ("better by 0.05", 0.30, 0.25),
    ("worse by 0.03 (inside margin)", 0.30, 0.33),
    ("worse by 0.10", 0.30, 0.40),
    ("worse by 0.20", 0.30, 0.50),
    ("much worse (0.2 vs 0.8)", 0.20, 0.80),
]


def run_stream(p_current: float, p_canary: float, rules: RolloutConfig, share: float, check_every: int,
               max_rated: int, rng: random.Random) -> dict:
    canary, current = Arm("canary"), Arm("current")
    n = 0
    while True:
        n += 1
        if rng.random() < share:
            canary.rated += 1
            canary.down += rng.random() < p_canary
        else:
            current.rated += 1
            current.down += rng.random() < p_current
        expired = n >= max_rated
        if n % check_every == 0 or expired:
            verdict = decide(canary, current, rules, expired=expired)
            if verdict.decision != "continue":
                return {"decision": verdict.decision, "rated": n, "canary_rated": canary.rated, "deadline": expired}


def judge(decision: str, p_current: float, p_canary: float, margin: float) -> bool | None:
    """True when right, False when wrong, None inside the indifference zone (either is fine)."""
    diff = p_canary - p_current
    if diff > margin:
        return decision == "rollback"
    if diff <= 0:
        return decision == "promote"
    return None


def simulate(streams: int, share: float, check_every: int, max_rated: int, rules: RolloutConfig, seed: int = 0) -> list[dict]:
    out = []
    for name, p_current, p_canary in SCENARIOS:
        rng = random.Random(f"{seed}:{name}")
        t0 = time.perf_counter()
        runs = [run_stream(p_current, p_canary, rules, share, check_every, max_rated, rng) for _ in range(streams)]
        verdicts = [judge(r["decision"], p_current, p_canary, rules.margin) for r in runs]
        rated = [r["rated"] for r in runs]
        out.append({
            "scenario": name, "p_current": p_current, "p_canary": p_canary, "streams": streams,
            "promoted": sum(r["decision"] == "promote" for r in runs),
            "rolled_back": sum(r["decision"] == "rollback" for r in runs),
            "at_deadline": sum(r["deadline"] for r in runs),
            "wrong": sum(v is False for v in verdicts),
            "wrong_rate": (sum(v is False for v in verdicts) / streams) if any(v is not None for v in verdicts) else None,
            "rated_median": statistics.median(rated),
            "rated_p90": sorted(rated)[int(0.9 * (len(rated) - 1))],
            "canary_rated_median": statistics.median(r["canary_rated"] for r in runs),
            "seconds": round(time.perf_counter() - t0, 1),
        })
    return out


def table(rows: list[dict]) -> str:
    head = ("| scenario (current → canary thumbs-down) | promoted | rolled back | at deadline | wrong | "
            "rated turns, median (p90) | canary's rated, median |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        wrong = "n/a (either is fine)" if r["wrong_rate"] is None else f"{r['wrong']} ({r['wrong_rate']:.1%})"
        lines.append(f"| {r['scenario']} ({r['p_current']:.2f} → {r['p_canary']:.2f}) | {r['promoted']} | "
                     f"{r['rolled_back']} | {r['at_deadline']} | {wrong} | {r['rated_median']:.0f} ({r['rated_p90']}) | "
                     f"{r['canary_rated_median']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.canary_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--check-every", type=int, default=20)
    parser.add_argument("--max-rated", type=int, default=3000, help="the deadline, in rated turns of both arms")
    parser.add_argument("--min-rated", type=int, help="override rollout.min_rated_turns")
    parser.add_argument("--margin", type=float, help="override rollout.margin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rules = RolloutConfig()
    if args.min_rated is not None:
        rules = replace(rules, min_rated_turns=args.min_rated)
    if args.margin is not None:
        rules = replace(rules, margin=args.margin)
    rows = simulate(args.streams, args.share, args.check_every, args.max_rated, rules, args.seed)
    if args.json:
        print(json.dumps({"rules": vars(rules), "share": args.share, "check_every": args.check_every,
                          "max_rated": args.max_rated, "rows": rows}, indent=2))
    else:
        shown = {k: v for k, v in vars(rules).items() if k != "canary_share"}
        print(f"rules: {shown}; share {args.share}, checked every {args.check_every} rated turns, "
              f"deadline after {args.max_rated} rated turns; {args.streams} streams per scenario")
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
