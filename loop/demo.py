"""``python -m loop.demo`` (``make demo``): the whole loop on one machine, start to finish.

1. start the local Argilla stack (or use ARGILLA_API_URL/ARGILLA_API_KEY);
2. register the bundled SmolLM2-135M-Instruct as version v1;
3. load the sample conversations the team ships (loop/scenario/sample_conversations.jsonl):
   questions about a fictional product the base model cannot know, answered wrongly, with
   users' thumbs-down, reasons and corrected answers; plus general chats with thumbs-up;
4. push them to Argilla, where a SCRIPTED REVIEWER (a stand-in for a person, named as such in
   the demo's output) signs in as the annotator user `reviewer` and submits reviews: a user's correction is
   accepted as the corrected response, a thumbs-up answer is rated 5, the rest is discarded;
5. run one cycle (train the variants, gate, export, verify, promote);
6. start the chat app on the promoted version and print the URLs of the app and the Argilla UI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from loop.config import LoopConfig, load_config
from loop.core import paths
from loop.core.errors import LoopError, error_exit

SCENARIO = Path(__file__).parent / "scenario"
SCRIPTED_REVIEWER = "scripted-reviewer (demo stand-in for a person)"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def load_samples(store, path: Path = SCENARIO / "sample_conversations.jsonl", model_version: str = "v1") -> int:
    """Log the shipped sample conversations once (a marker in LOOP_HOME makes reruns no-ops)."""
    marker = paths.loop_home() / "demo-samples-loaded"
    if marker.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        cid = store.new_conversation(client="demo-samples")
        tid = store.log_turn(
            conversation_id=cid,
            messages=row["messages"],
            answer=row["answer"],
            model_version=model_version,
            sampling={"temperature": 0.0, "source": "shipped sample"},
            logprob_mean=row.get("logprob_mean"),
            logprob_min=row.get("logprob_min"),
        )
        fb = row.get("feedback")
        if fb:
            store.add_feedback(tid, thumbs=fb.get("thumbs"), reasons=fb.get("reasons") or [],
                               comment=fb.get("comment"), correction=fb.get("correction"), source="demo-samples")
    marker.write_text(str(len(rows)))
    return len(rows)


def scripted_review(config: LoopConfig, store, stack, thumbs_down: str = "discard") -> dict[str, int]:
    """Submit reviews as the annotator user, the way a careful reviewer would for this data: a correction is
    accepted (quality 2 for the logged answer), a thumbs-up answer rated 5; any other turn is discarded, or,
    with ``thumbs_down="rate_low"``, a thumbs-down answer is rated 1 with nothing written, so the thumb
    stays an undesirable label for preference training (trainer/preference_data.py)."""
    import argilla as rg

    from annotation.pull import review_queue, submit_review
    from annotation.schema import find_dataset

    client = rg.Argilla(api_url=stack.api_url, api_key=stack.reviewer_api_key)
    dataset = find_dataset(client, config.annotation)
    if dataset is None:
        raise RuntimeError("the chat-feedback dataset does not exist: the push did not run")
    counts = {"accepted_correction": 0, "rated_good": 0, "rated_bad": 0, "discarded": 0, "already_reviewed": 0}
    for record in review_queue(client, dataset.id):
        if record.get("responses"):
            counts["already_reviewed"] += 1
            continue
        turn = store.get_turn(record["external_id"])
        fb = (turn or {}).get("feedback") or {}
        if fb.get("correction") and "unsafe_or_offensive" not in (fb.get("reasons") or []):
            submit_review(client, record["id"], quality=2, correction=fb["correction"],
                          issues=[r for r in fb.get("reasons") or [] if r])
            counts["accepted_correction"] += 1
        elif fb.get("thumbs") == "up":
            submit_review(client, record["id"], quality=5, correction=turn["answer"])
            counts["rated_good"] += 1
        elif fb.get("thumbs") == "down" and thumbs_down == "rate_low":
            submit_review(client, record["id"], quality=1, issues=[r for r in fb.get("reasons") or [] if r])
            counts["rated_bad"] += 1
        else:
            submit_review(client, record["id"], status="discarded")
            counts["discarded"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.demo", description="Run the whole loop once, then the app.")
    parser.add_argument("--no-app", action="store_true", help="stop after the cycle (do not start the chat app)")
    parser.add_argument("--port", type=int, default=None, help="app port (default: app.port)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except LoopError as exc:
        return error_exit(exc)


def _run(args: argparse.Namespace) -> int:
    """Start Argilla, load the sample chats, push, review, run a cycle, then serve the app."""
    t0 = time.perf_counter()
    config = load_config()
    say(f"LOOP_HOME = {config.home}")

    from annotation.server import start_stack

    stack = start_stack(config=config.stack)
    say(f"Argilla: {stack.api_url} ({'external' if stack.external else 'local stack'}, "
        f"{stack.startup_seconds:.0f}s to start)")

    from loop.core.bootstrap import ensure_base_version
    from loop.core.store import Store

    base = ensure_base_version(config)
    say(f"current version: {base.id} ({base.gguf_path.name})")
    # The trainer's weights are part of setting a home up, not of its first cycle: derived now, the cycle after
    # the review trains at once (loop.bootstrap.hf_base_ready).
    from loop.bootstrap import ensure_hf_base, hf_base_ready

    if not hf_base_ready(config):
        started = time.perf_counter()
        say(f"trainer weights derived from {base.gguf_path.name}: {ensure_hf_base(config)} "
            f"({time.perf_counter() - started:.0f}s, once per home)")
    store = Store.open()
    loaded = load_samples(store, model_version=base.id)
    say(f"sample conversations loaded: {loaded} (turns in the store: {store.count_turns()})")

    from annotation.push import push

    report = push(config, store=store)
    say(f"pushed to Argilla: {report.as_dict()}")
    if stack.reviewer_api_key:
        counts = scripted_review(config, store, stack)
        say(f"{SCRIPTED_REVIEWER} submitted: {counts}")
    else:
        say("external Argilla: no scripted reviewer; review the records in the UI, then run `python -m loop.cycle`")

    from loop.cycle import Cycle

    summary = Cycle(config).run()
    say(f"cycle {summary['cycle']}: {summary['outcome']}" + (f" ({summary['reason']})" if summary.get("reason") else ""))
    for name, stage in summary["stages"].items():
        say(f"  {name:8s} {stage.get('status'):8s} {stage.get('seconds') or 0:7.1f}s")
    say(f"report: {summary.get('report')}")
    say(f"current version: {summary['current_version']}; demo took {time.perf_counter() - t0:.0f}s so far")
    owner = f" (user {stack.owner_username}, password in {config.home / 'argilla'})" if stack.owner_username else ""
    say(f"Argilla UI: {stack.api_url}{owner}")
    if args.no_app:
        return 1 if summary["outcome"] in ("failed", "abandoned") else 0
    port = args.port or config.app.port
    say(f"chat app: http://{config.app.host}:{port}  (Ctrl-C to stop)")
    from app.__main__ import main as app_main

    return app_main(["--host", config.app.host, "--port", str(port)])


if __name__ == "__main__":
    sys.exit(main())
