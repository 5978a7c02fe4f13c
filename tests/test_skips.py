"""Under CI a missing part fails its tests; elsewhere it skips them (tests/skips.py, tests/argilla_fixtures.py).

Each case runs a small test file in a child pytest, once with ``CI=true`` and once without, and reads
the outcome pytest reports: a skip under CI would turn a broken setup into a green run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CASES = {
    "module-level import": "from skips import import_or_skip\n"
                           "missing = import_or_skip('no_such_module_anywhere')\n"
                           "def test_uses_it():\n    pass\n",
    "import inside a test": "from skips import import_or_skip\n"
                            "def test_uses_it():\n    import_or_skip('no_such_module_anywhere')\n",
    "argilla stack not installed": "import argilla_fixtures\n"
                                   "def test_needs_the_stack():\n    argilla_fixtures.stack_config()\n",
}


def _child_pytest(tmp_path: Path, source: str, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
               LOOP_TOOLS=str(tmp_path / "no-tools"))  # no argilla venv there
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-o", "addopts=", str(tmp_path / "test_case.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_a_missing_part_fails_under_ci_and_skips_elsewhere(case, tmp_path):
    under_ci = _child_pytest(tmp_path, CASES[case], "true")
    assert under_ci.returncode != 0, under_ci.stdout[-2000:]
    assert "skipped" not in under_ci.stdout.splitlines()[-1]
    assert "CI is set: a missing part fails the run instead of skipping" in under_ci.stdout

    elsewhere = _child_pytest(tmp_path, CASES[case], None)
    assert elsewhere.returncode in (0, 5), elsewhere.stdout[-2000:]  # 5: the whole module skipped
    assert "1 skipped" in elsewhere.stdout.splitlines()[-1]


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("yes", True), ("", False),
                                             ("0", False), ("false", False), ("no", False)])
def test_ci_is_read_from_the_environment_as_ci_services_set_it(value, expected, monkeypatch):
    from skips import in_ci

    monkeypatch.setenv("CI", value)
    assert in_ci() is expected
