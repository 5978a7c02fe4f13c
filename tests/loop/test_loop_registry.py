"""The registry: promotion, rollback, retention, and crash safety with real killed processes.

Crash tests run a promotion in a child Python process and SIGKILL it: at a chosen step (the
child wraps one registry function to announce itself and wait, so the kill lands exactly there)
and at random moments during a long loop of promotions. Registry-level tests use tiny but valid
GGUF files (written with the `gguf` package): the registry manages files, it does not load them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from loop.config import load_config
from loop.core.bootstrap import ensure_base_version
from loop.core.io import sha256_file
from loop.core.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parents[2]


def tiny_gguf(path: Path, tag: str) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", tag)
    w.add_tensor("t", np.full(64, hash(tag) % 1000, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_versions(reg: Registry, tmp: Path, n: int, **kw) -> list[str]:
    ids = []
    for i in range(n):
        v = reg.register(tiny_gguf(tmp / f"m{i}.gguf", f"m{i}"), base_model="tiny", parent=ids[-1] if ids else None,
                         quantization="F32", verification={"passed": True}, **kw)
        ids.append(v.id)
    return ids


def assert_consistent(reg: Registry, known: set[str]) -> dict:
    """current.json whole and naming a known version; every listed version whole."""
    pointer = json.loads(reg.current_file.read_text())  # raises on a half-written pointer
    assert pointer["version"] in known
    for v in reg.list():
        assert sha256_file(v.gguf_path) == v.gguf_sha256, f"{v.id} is not whole"
        assert v.size_bytes == v.gguf_path.stat().st_size
    return pointer


def child(script: str, home: Path) -> subprocess.Popen:
    env = dict(os.environ, LOOP_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, "child never reached the crash point"
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# -- promotion and rollback --------------------------------------------------------------------------


def test_bootstrap_promote_rollback_history(bundled_gguf, tmp_path):
    reg = Registry()
    v1 = ensure_base_version(load_config(), reg)
    assert v1.id == "v1" and reg.current_id() == "v1"
    assert v1.gguf_sha256 == sha256_file(bundled_gguf)
    (v2,) = make_versions(reg, tmp_path, 1)
    entry = reg.promote(v2, reason="gate passed", decision={"promote": True, "numbers": {"heldout_improvement": 0.1}})
    assert reg.pointer()["version"] == v2 and reg.pointer()["previous"] == "v1"
    assert entry["decision"]["numbers"]["heldout_improvement"] == 0.1

    back = reg.rollback(reason="users complained")
    assert back == {**back, "action": "rollback", "from": v2, "to": "v1"}
    assert reg.current_id() == "v1" and reg.pointer()["previous"] == v2
    reg.rollback(to=v2)
    assert reg.current_id() == v2
    assert [(h["action"], h["to"]) for h in reg.history()] == [
        ("promote", "v1"), ("promote", v2), ("rollback", "v1"), ("rollback", v2)]
    with pytest.raises(RegistryError, match="already current"):
        reg.rollback(to=v2)
    with pytest.raises(RegistryError, match="no version 'v99'"):
        reg.rollback(to="v99")


def test_rollback_needs_something_to_go_back_to(tmp_path):
    reg = Registry()
    with pytest.raises(RegistryError, match="nothing is current"):
        reg.rollback()
    (v1,) = make_versions(reg, tmp_path, 1)
    reg.promote(v1, reason="first")
    with pytest.raises(RegistryError, match="no previous version"):
        reg.rollback()


def test_gguf_whose_sha256_changed_is_refused(tmp_path):
    reg = Registry()
    v1, v2 = make_versions(reg, tmp_path, 2)
    reg.promote(v1, reason="first")
    gguf = reg.get(v2).gguf_path
    with open(gguf, "r+b") as f:  # one flipped byte on disk: a corrupted or swapped file
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(RegistryError, match="sha256 does not match"):
        reg.promote(v2, reason="should not happen")
    assert reg.current_id() == v1 and len(reg.history()) == 1


def test_failed_verification_is_refused_for_promotion_and_rollback(tmp_path):
    reg = Registry()
    (v1,) = make_versions(reg, tmp_path, 1)
    bad = reg.register(tiny_gguf(tmp_path / "bad.gguf", "bad"), base_model="tiny", parent=v1,
                       verification={"passed": False, "reasons": ["probe agreement 0.40 < 0.80"]})
    reg.promote(v1, reason="first")
    with pytest.raises(RegistryError, match="probe agreement 0.40"):
        reg.promote(bad.id, reason="no")
    with pytest.raises(RegistryError, match="failed verification"):
        reg.rollback(to=bad.id)  # a rollback must not serve what the gate refused either
    assert reg.current_id() == v1
    reg.promote(bad.id, reason="operator override", force=True)  # explicit and recorded
    assert reg.history()[-1]["to"] == bad.id


# -- retention -----------------------------------------------------------------------------------------


def test_prune_keeps_current_previous_pinned_and_newest(tmp_path):
    reg = Registry()
    ids = make_versions(reg, tmp_path, 8)  # v1..v8
    reg.promote("v3", reason="x")
    reg.promote("v5", reason="x")  # current v5, previous v3
    reg.pin("v1")
    assert reg.prune(keep=2, dry_run=True) == ["v2", "v4", "v6"]
    assert [v.id for v in reg.list()] == ids  # a dry run removes nothing
    removed = reg.prune(keep=2)
    assert removed == ["v2", "v4", "v6"]
    assert [v.id for v in reg.list()] == ["v1", "v3", "v5", "v7", "v8"]
    assert reg.prune(keep=0) == ["v7", "v8"]
    assert [v.id for v in reg.list()] == ["v1", "v3", "v5"]
    # A pruned id is never handed out again: history and arena votes name it forever.
    new = reg.register(tiny_gguf(tmp_path / "n.gguf", "n"), base_model="tiny")
    assert new.id == "v9"
    reg.pin("v1", False)
    assert reg.prune(keep=1) == ["v1"]


# -- crash safety ----------------------------------------------------------------------------------------

SETUP = """
    import os, sys, time, json
    from pathlib import Path
    import loop.core.registry as R
    import loop.core.registry.base as B  # where the registry's writes are looked up: the crash points
    reg = R.Registry()
    marker = Path(os.environ["LOOP_HOME"]) / "at-crash-point"
    def stop_here(*_a, **_k):
        marker.touch()
        time.sleep(600)
"""


def test_kill_between_pointer_and_history_then_reconcile(tmp_path, loop_home):
    reg = Registry()
    v1, v2 = make_versions(reg, tmp_path, 2)
    reg.promote(v1, reason="first")
    proc = child(SETUP + f"""
    R.Registry._append_history = lambda self, entry: stop_here()   # pointer written, history not yet
    reg.promote("{v2}", reason="crash test")
    """, loop_home)
    wait_for(loop_home / "at-crash-point", proc)
    kill(proc)

    pointer = assert_consistent(reg, {v1, v2})
    assert pointer["version"] == v2 and pointer["previous"] == v1  # the new pointer, whole
    assert reg.history()[-1]["to"] == v1  # its history line never made it
    assert reg.reconcile() is True
    last = reg.history()[-1]
    assert (last["action"], last["from"], last["to"]) == ("recovered", v1, v2)
    assert reg.reconcile() is False  # idempotent
    reg.rollback()  # and the registry works on
    assert reg.current_id() == v1


def test_kill_while_replacing_pointer_leaves_old_one(tmp_path, loop_home):
    reg = Registry()
    v1, v2 = make_versions(reg, tmp_path, 2)
    reg.promote(v1, reason="first")
    proc = child(SETUP + f"""
    real_replace = B.os.replace
    def replace(src, dst):
        if str(dst).endswith("current.json"):
            stop_here()   # the new pointer is written and fsynced to a temp file, not renamed yet
        real_replace(src, dst)
    B.os.replace = replace
    reg.promote("{v2}", reason="crash test")
    """, loop_home)
    wait_for(loop_home / "at-crash-point", proc)
    kill(proc)

    assert list(reg.root.glob(".current.json.tmp-*")), "the temp pointer should be left behind"
    pointer = assert_consistent(reg, {v1, v2})
    assert pointer["version"] == v1  # the old pointer, whole
    assert reg.reconcile() is False  # history already agrees with the pointer
    assert not list(reg.root.glob(".current.json.tmp-*"))  # leftovers of the dead writer removed


def test_kill_while_registering_never_lists_a_partial_version(tmp_path, loop_home):
    reg = Registry()
    (v1,) = make_versions(reg, tmp_path, 1)
    src = tiny_gguf(tmp_path / "next.gguf", "next")
    proc = child(SETUP + f"""
    real_write = B.atomic_write_text
    def write(path, text):
        if path.name == "version.json":
            stop_here()   # GGUF copied and hashed, description not written, not renamed into place
        real_write(path, text)
    B.atomic_write_text = write
    reg.register("{src}", base_model="tiny")
    """, loop_home)
    wait_for(loop_home / "at-crash-point", proc)
    kill(proc)

    assert [v.id for v in reg.list()] == [v1]
    assert list(reg.versions_dir.glob(".*partial*")), "the half-built dir should be left behind"
    reg.reconcile()
    assert not list(reg.versions_dir.glob(".*partial*"))
    assert reg.register(src, base_model="tiny").id == "v2"


def test_readers_never_see_a_partial_version_while_registering(tmp_path, loop_home):
    reg = Registry()
    src = tiny_gguf(tmp_path / "m.gguf", "m")
    proc = child(f"""
    import loop.core.registry as R
    reg = R.Registry()
    for i in range(40):
        reg.register("{src}", base_model="tiny")
    """, loop_home)
    seen = set()
    while proc.poll() is None:
        for v in reg.list():
            assert sha256_file(v.gguf_path) == v.gguf_sha256
            seen.add(v.id)
    assert proc.returncode == 0, proc.communicate()
    assert len(reg.list()) == 40 and len(seen) > 1


def test_random_kills_during_many_promotions_leave_registry_consistent(tmp_path, loop_home):
    reg = Registry()
    ids = make_versions(reg, tmp_path, 4)
    reg.promote(ids[0], reason="first")
    rng = random.Random(1234)
    loop_script = SETUP + f"""
    import random
    ids = {ids!r}
    marker.touch()
    i = 0
    while True:
        i += 1
        if i % 3 == 0:
            reg.rollback(reason="loop")
        else:
            cur = reg.current_id()
            reg.promote(random.choice([v for v in ids if v != cur]), reason="loop", decision={{"i": i}})
    """
    kills = 0
    for _ in range(12):
        (loop_home / "at-crash-point").unlink(missing_ok=True)
        proc = child(loop_script, loop_home)
        wait_for(loop_home / "at-crash-point", proc)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:
            raise AssertionError(f"promotion loop died by itself: {proc.communicate()}")
        kill(proc)
        kills += 1
        pointer = assert_consistent(reg, set(ids))
        reg.reconcile()
        assert reg.history()[-1]["to"] == pointer["version"]
        assert reg.pointer() == pointer  # reconciling never moves the pointer
    assert kills == 12
    assert len(reg.history()) > 12  # the loop really promoted between kills


def test_history_line_after_a_torn_one_is_kept(tmp_path):
    reg = Registry()
    v1, v2 = make_versions(reg, tmp_path, 2)
    reg.promote(v1, reason="first")
    with open(reg.history_file, "a") as f:
        f.write('{"at": "2030-01-01", "act')  # a crash mid-append: no newline
    reg.promote(v2, reason="second")
    assert [h["to"] for h in reg.history()] == [v1, v2]


def test_concurrent_threads_promote_without_interleaving(tmp_path):
    reg = Registry()
    ids = make_versions(reg, tmp_path, 3)
    reg.promote(ids[0], reason="first")
    errors = []

    def worker(vid: str) -> None:
        try:
            for _ in range(10):
                Registry(reg.root).promote(vid, reason="thread")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(v,)) for v in ids[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    hist = reg.history()
    # Every entry's "from" is the previous entry's "to": no two promotions interleaved.
    assert all(a["to"] == b["from"] for a, b in zip(hist, hist[1:]))
    assert len(hist) == 21
