"""`python -m app [--host H] [--port P] [--share]`: the chat app on the registry's current model.

On start it bootstraps a fresh home (the bundled base model becomes v1), restores the store from
its durable mirror, loads the current model (so the first answer does not wait for it), and
serves. Host and port default to ``[app] host`` / ``[app] port`` in the config.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loop.core.config import CoreConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="The chat app with rich feedback.")
    parser.add_argument("--host", help="interface to listen on (default: [app] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: [app] port, 7860)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public Gradio link")
    parser.add_argument("--config", help="config file (default: $LOOP_CONFIG or $LOOP_HOME/config.toml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    from loop.core.config import load_config
    from loop.core.errors import LoopError, error_exit

    try:
        return _serve(args, load_config(args.config), started)
    except LoopError as exc:  # a bad config, no model to serve, a damaged registry
        return error_exit(exc)


def _serve(args: argparse.Namespace, config: CoreConfig, started: float) -> int:
    # Get the model ready (bootstrap, mirror restore, load, first token) on a thread while the
    # main thread imports Gradio and builds the page: together they are most of the start time.
    from app.engine import Engine

    prepared: dict = {}

    def prepare() -> None:
        try:
            engine = Engine(config)
            engine.start_mirror()
            engine.warm_up()
            prepared["engine"] = engine
        except BaseException as exc:  # reported below, on the main thread
            prepared["error"] = exc

    worker = threading.Thread(target=prepare, name="prepare-model")
    worker.start()
    from app.ui import CSS, build_app

    worker.join()
    if "error" in prepared:
        raise prepared["error"]
    engine = prepared["engine"]
    demo = build_app(engine)
    demo.queue(default_concurrency_limit=1)
    host = args.host or config.app.host
    port = args.port or config.app.port
    logging.getLogger("app").info("ready in %.1f s (model %s)", time.perf_counter() - started, engine.status()["version"])
    # A Space (or a service manager) stops the app with SIGTERM: turn it into the interrupt that
    # Gradio handles, so launch() returns and the last turns reach the store and the mirror.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # show_error=False: internal errors are logged, users get the app's own notices (app/errors.py).
        demo.launch(server_name=host, server_port=port, share=args.share, css=CSS, show_error=False, quiet=False)
    finally:
        engine.close()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    raise SystemExit(main())
