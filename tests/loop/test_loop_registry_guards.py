"""Version ids are names, never paths; damaged registry files give clear errors, never tracebacks.

The first half reproduces issue 11's finding: ``versions rollback --to v2/`` stored ``"v2/"`` as
current, and ``versions prune --keep 0`` then deleted ``versions/v2``, the version being served.
The second half damages ``current.json`` and ``version.json`` the ways a crash, a full disk or a
hand edit can, and checks that the Registry, the CLI and the app's engine say so clearly and keep
going on what they can read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loop import versions
from loop.core.registry import InvalidVersionIdError, Registry, RegistryCorruptError, RegistryError, check_version_id

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def registry(tmp_path) -> Registry:
    """v1, v2, v3 registered and promoted in turn: v3 current, v2 previous."""
    reg = Registry()  # under this test's LOOP_HOME, where the CLI looks too
    for i in range(1, 4):
        gguf = tmp_path / f"m{i}.gguf"
        gguf.write_bytes(b"GGUF" + bytes([i]) * 64)
        vid = reg.register(gguf, base_model="tiny", verification={"passed": True}).id
        reg.promote(vid, reason=f"test {vid}")
    return reg


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loop.versions", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)


def not_ids(registry: Registry) -> list[str]:
    return ["v2/", "./v2", "v2/.", str(registry.versions_dir / "v2"), "../versions/v2", "..", ".", "", "v0",
            "v02", "V2", " v2", "v2\n", "v-1", "v2/../v1", "v\u0662"]


# -- version ids ------------------------------------------------------------------------------------


def test_only_plain_version_ids_are_ids(registry):
    for good in ("v1", "v2", "v10", "v123"):
        assert check_version_id(good) == good
    for bad in not_ids(registry) + [None, 2, ["v2"]]:
        with pytest.raises(InvalidVersionIdError, match="not a version id"):
            check_version_id(bad)


def test_issue_repro_rollback_to_a_path_is_refused_and_prune_keeps_the_served_version(registry, capsys):
    # The issue's commands, in order: `versions rollback --to v2/`, then `versions prune --keep 0`.
    assert versions.main(["rollback", "--to", "v2/"]) == 1
    assert "'v2/' is not a version id" in capsys.readouterr().err
    assert registry.pointer()["version"] == "v3"

    assert versions.main(["rollback", "--to", "v2"]) == 0
    assert versions.main(["prune", "--keep", "0"]) == 0
    assert "removed: v1" in capsys.readouterr().out
    assert registry.current_id() == "v2" and (registry.versions_dir / "v2" / "model.gguf").is_file()
    assert [v.id for v in registry.list()] == ["v2", "v3"]  # current and previous survive --keep 0


def test_every_entry_point_refuses_a_path_for_an_id(registry):
    pointer_before = registry.current_file.read_bytes()
    for bad in not_ids(registry):
        for call in (lambda: registry.get(bad), lambda: registry.promote(bad, reason="x"),
                     lambda: registry.rollback(bad), lambda: registry.pin(bad), lambda: registry.update(bad, note="x")):
            with pytest.raises(InvalidVersionIdError):
                call()
    assert registry.current_file.read_bytes() == pointer_before
    assert [v.pinned for v in registry.list()] == [False, False, False]


@pytest.mark.parametrize("command", [["show", "./v2"], ["pin", "v2/"], ["unpin", "/v2"], ["rollback", "--to", ".."],
                                     ["compare", "v1", "../versions/v2"]])
def test_the_cli_refuses_a_path_for_an_id_with_a_clear_error(registry, capsys, command):
    assert versions.main(command) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a version id" in err


def test_prune_refuses_when_a_legacy_pointer_names_a_path_and_rollback_repairs_it(registry, capsys):
    # A home where the old code already stored "v2/" as current.
    registry.current_file.write_text(json.dumps({"version": "v2/", "previous": "v3", "since": "x", "reason": "x"}))
    with pytest.raises(RegistryCorruptError, match="rollback --to"):
        registry.prune(0)
    assert versions.main(["prune", "--keep", "0"]) == 1
    assert "current.json is damaged" in capsys.readouterr().err
    assert [v.id for v in registry.list()] == ["v1", "v2", "v3"]

    assert versions.main(["rollback", "--to", "v2"]) == 0
    assert registry.pointer()["version"] == "v2"
    kept = list(registry.root.glob("current.json.damaged-*"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["version"] == "v2/"  # the evidence is kept
    assert registry.history()[-1]["decision"]["replaced_damaged_pointer"] == kept[0].name
    assert registry.prune(0) == ["v1", "v3"]  # v2 is current: never removed
    assert registry.current().id == "v2"


# -- damaged files ----------------------------------------------------------------------------------

DAMAGED_POINTERS = {
    "torn": b'{"version": "v3", "prev',
    "empty": b"",
    "not an object": b'["v3"]',
    "no version": b'{"previous": "v2"}',
    "version not a string": b'{"version": 3}',
    "version a path": b'{"version": "../v3"}',
    "previous a path": b'{"version": "v3", "previous": "/etc"}',
    "not text": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("content", DAMAGED_POINTERS.values(), ids=DAMAGED_POINTERS.keys())
def test_a_damaged_pointer_is_a_registry_error_naming_the_file_and_the_repair(registry, content):
    registry.current_file.write_bytes(content)
    for call in (registry.pointer, registry.current, registry.current_id, registry.reconcile,
                 lambda: registry.rollback(), lambda: registry.prune(0)):
        with pytest.raises(RegistryCorruptError, match=r"current\.json is damaged .*rollback --to ID") as info:
            call()
        assert isinstance(info.value, RegistryError)
    assert [v.id for v in registry.list()] == ["v1", "v2", "v3"]  # nothing was lost


def test_the_cli_on_a_damaged_pointer_explains_lists_and_repairs_without_a_traceback(registry):
    registry.current_file.write_bytes(DAMAGED_POINTERS["torn"])

    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    assert "warning:" in listed.stderr and "current.json is damaged" in listed.stderr
    assert [line.split()[1] for line in listed.stdout.splitlines()[2:5]] == ["v1", "v2", "v3"]
    assert [row["id"] for row in json.loads(cli("list", "--json").stdout)] == ["v1", "v2", "v3"]

    for args in (["rollback"], ["show", "v1"], ["prune", "--dry-run"]):
        proc = cli(*args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: ") and "current.json is damaged" in proc.stderr

    repaired = cli("rollback", "--to", "v3", "--reason", "repair")
    assert repaired.returncode == 0, repaired.stderr
    assert registry.current_id() == "v3" and registry.pointer()["previous"] is None
    assert cli("show", "v3").returncode == 0


def test_a_damaged_version_json_is_named_and_the_rest_of_the_registry_still_works(registry, capsys):
    meta = registry.versions_dir / "v1" / "version.json"
    meta.write_text('{"id": "v1", "parent": nu')
    with pytest.raises(RegistryCorruptError, match=r"v1/version\.json is damaged"):
        registry.get("v1")
    assert [v.id for v in registry.list()] == ["v2", "v3"]
    assert registry.prune(0) == []  # a version it cannot read is never deleted
    assert meta.is_file()

    assert versions.main(["show", "v1"]) == 1
    assert "v1/version.json is damaged" in capsys.readouterr().err
    proc = cli("list")
    assert proc.returncode == 0 and "warning:" in proc.stderr and "v1/version.json is damaged" in proc.stderr

    meta.write_text(json.dumps({"id": "v1"}))  # valid JSON, required fields missing
    with pytest.raises(RegistryCorruptError, match="is damaged"):
        registry.get("v1")
    meta.write_text(json.dumps(dict(json.loads((registry.versions_dir / "v2" / "version.json").read_text()))))
    with pytest.raises(RegistryCorruptError, match="describes 'v2', not 'v1'"):
        registry.get("v1")
