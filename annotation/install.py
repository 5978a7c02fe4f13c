"""Create the argilla-server virtualenv: `python -m annotation.install [--force]`.

argilla-server 2.8 pins old FastAPI/pydantic releases that clash with the main environment (Gradio, TRL), so it
lives in a virtualenv of its own under $LOOP_TOOLS/argilla-venv. Setup runs this once; `annotation.server` only
uses it. A marker file records the pinned requirements, so a second run is a no-op unless the pins change.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from loop.core.errors import LoopError, error_exit
from loop.core.paths import tools_dir

# What the server environment holds. click>=8.2 breaks argilla-server's typer CLI; osmem-server is the in-memory
# OpenSearch-compatible search engine (a bundled Go binary) that stands in for Elasticsearch.
REQUIREMENTS = (
    "argilla-server==2.8.0",
    "click<8.2",
    "osmem-server==0.1.6",
)
MARKER_NAME = ".loop-argilla-installed"
# Installed as the venv's sitecustomize.py: makes reviewers' submissions work on osmem (see the module).
COMPAT_SOURCE = Path(__file__).with_name("osmem_compat.py")


def venv_dir(override: Path | None = None) -> Path:
    """Where the argilla-server virtualenv lives."""
    return Path(override) if override else tools_dir() / "argilla-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _marker_text() -> str:
    import hashlib

    compat = hashlib.sha256(COMPAT_SOURCE.read_bytes()).hexdigest()[:16]
    return "\n".join(REQUIREMENTS) + f"\nosmem_compat {compat}\n"


def _install_compat(venv: Path) -> None:
    out = subprocess.run([str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    (Path(out) / "sitecustomize.py").write_text(COMPAT_SOURCE.read_text())


def is_installed(venv: Path | None = None) -> bool:
    """True when the venv exists and was completed with exactly the current pins."""
    venv = venv_dir(venv)
    marker = venv / MARKER_NAME
    return venv_python(venv).exists() and marker.exists() and marker.read_text() == _marker_text()


def osmem_binary(venv: Path | None = None) -> Path:
    """The osmem-server executable bundled in the osmem-server wheel inside the venv."""
    venv = venv_dir(venv)
    found = sorted(venv.glob("lib/python*/site-packages/osmem_server/bin/osmem-server"))
    if not found:
        raise FileNotFoundError(f"osmem-server binary not found in {venv}; run `python -m annotation.install --force`")
    return found[0]


def install(venv: Path | None = None, force: bool = False, python: str = sys.executable) -> Path:
    """Create (or complete) the argilla-server virtualenv and return its path. Idempotent."""
    venv = venv_dir(venv)
    if is_installed(venv) and not force:
        print(f"argilla-server environment already installed at {venv}")
        return venv
    if not force and venv_python(venv).exists() and (venv / MARKER_NAME).exists():
        previous = (venv / MARKER_NAME).read_text().split("osmem_compat")[0]
        if previous == "\n".join(REQUIREMENTS) + "\n":  # only the compatibility patch changed
            _install_compat(venv)
            (venv / MARKER_NAME).write_text(_marker_text())
            print(f"argilla-server environment at {venv}: compatibility patch updated")
            return venv
    started = time.monotonic()
    marker = venv / MARKER_NAME
    marker.unlink(missing_ok=True)  # a half-finished install must not look complete
    if not venv_python(venv).exists():
        print(f"creating virtualenv {venv}", flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    print("installing " + " ".join(REQUIREMENTS), flush=True)
    # pip prints its own per-package progress bars; keep them visible since this takes a minute or two.
    subprocess.run(
        [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS],
        check=True,
    )
    # Check the pieces `annotation.server` relies on actually import/run before declaring success.
    subprocess.run([str(venv_python(venv)), "-c", "import argilla_server, osmem_server"], check=True)
    binary = osmem_binary(venv)
    binary.chmod(binary.stat().st_mode | 0o111)
    subprocess.run([str(binary), "-version"], check=True, stdout=subprocess.DEVNULL)
    _install_compat(venv)
    subprocess.run([str(venv_python(venv)), "-c",
                    "from argilla_server.search_engine import commons; "
                    "assert commons.BaseElasticAndOpenSearchEngine.update_record_response.__module__ == 'sitecustomize'"],
                   check=True)
    marker.write_text(_marker_text())
    print(f"argilla-server environment ready at {venv} ({time.monotonic() - started:.0f} s)")
    return venv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotation.install", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help="virtualenv path (default $LOOP_TOOLS/argilla-venv)")
    parser.add_argument("--force", action="store_true", help="reinstall even when the marker file says it is done")
    args = parser.parse_args(argv)
    try:
        install(args.venv, force=args.force)
    except subprocess.CalledProcessError as exc:
        print(f"error: installing the argilla-server environment failed: {exc}", file=sys.stderr)
        return 1
    except LoopError as exc:
        return error_exit(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
