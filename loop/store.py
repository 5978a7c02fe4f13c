"""The store's command line (the store itself is the core's: ``loop.core.store``).

``python -m loop.store export`` prints every turn with its feedback as JSON lines.
``python -m loop.store stats`` prints counts.
``python -m loop.store forget TURN_ID... [--conversation ID] [--client ID]`` deletes turns from
the store and from everywhere else they went (``loop.forget``).
"""

from __future__ import annotations

import argparse
import json
import sys

from loop.core.errors import LoopError, error_exit
from loop.core.store import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.store", description="The turn and feedback log.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="print every turn with its feedback as JSON lines")
    sub.add_parser("stats", help="print counts")
    p = sub.add_parser("forget", help="delete turns everywhere: store, mirror, Argilla, snapshots, cycles, reports",
                       description="Forget turns everywhere and print a receipt (loop/forget.py says where and how).")
    p.add_argument("turn_ids", nargs="*", metavar="TURN_ID")
    p.add_argument("--conversation", action="append", default=[], metavar="ID", help="every turn of a conversation")
    p.add_argument("--client", action="append", default=[], metavar="ID", help="every conversation of a client")
    p.add_argument("--config", help="TOML config file (default: $LOOP_CONFIG or $LOOP_HOME/config.toml)")
    p.add_argument("--json", action="store_true", help="print the receipt as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "forget":
            # Imported here: `export` and `stats` need none of what forgetting reaches (Argilla, the Hub).
            from loop.config import load_config
            from loop.forget import forget, receipt_text

            receipt = forget(load_config(args.config), args.turn_ids, args.conversation, args.client)
            print(json.dumps(receipt.as_dict(), indent=2) if args.json else receipt_text(receipt))
            return 0 if receipt.complete else 1
        store = Store.open()
        if args.command == "export":
            for record in store.export_records():
                sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif args.command == "stats":
            print(json.dumps({"turns": store.count_turns(), "feedback_events": store.count_feedback(),
                              "path": str(store.path)}))
    except LoopError as exc:
        return error_exit(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
