#!/usr/bin/env bash
# Sets up everything the project needs on a fresh Debian machine, idempotently:
#   Debian packages (Chromium for the browser tests, redis-server for Argilla's worker),
#   the main virtualenv (.venv) with the project and its extras,
#   the Argilla server's own virtualenv and the GGUF converter under $LOOP_TOOLS.
# Re-running is cheap: each step checks a stamp before doing work.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export LOOP_TOOLS="${LOOP_TOOLS:-$ROOT/.loop/tools}"
export HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python3}"

say() { printf '\n== %s\n' "$*"; }

# --- Debian packages ---------------------------------------------------------------------------
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
    say "installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

# --- the main virtualenv -------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp_src="$(cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp_src" ]; then
    say "installing the project into .venv (llama-cpp-python compiles once; pip caches the wheel)"
    .venv/bin/pip install -q -U pip wheel
    # The CPU build of PyTorch; a GPU machine installs its own CUDA build before this script.
    if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
        .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    fi
    constraint=(); [ -f constraints.txt ] && constraint=(-c constraints.txt)
    .venv/bin/pip install -q "${constraint[@]}" -e ".[all,test]"
    echo "$stamp_src" > .venv/.setup-stamp
fi

# --- tools under $LOOP_TOOLS -------------------------------------------------------------------
say "setting up tools in $LOOP_TOOLS"
.venv/bin/python -m annotation.install
.venv/bin/python -m trainer.install_converter
say "setup done"
