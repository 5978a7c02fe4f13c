"""The durable mirror: append-only segments, idempotent restore, local directory and a fake hub."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from loop.config import load_config
from loop.mirror import TABLES, HubDatasetTarget, LocalDirTarget, Mirror, mirror_from_config, target_from_config
from loop.store import Store


def _fill(store: Store, turns: int = 3, start: int = 0) -> list[str]:
    cid = store.new_conversation(client="test")
    ids = []
    for i in range(start, start + turns):
        tid = store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": f"q{i}"}], answer=f"a{i}",
                             model_version="v1", gguf_sha256="abc", sampling={"temperature": 0.5})
        store.add_feedback(tid, thumbs="down", reasons=["style", "incomplete"], comment=f"c{i}", correction=f"better {i}")
        ids.append(tid)
    return ids


def _export(store: Store) -> list[dict]:
    return sorted(store.export_records(), key=lambda r: r["id"])


def _segment_bytes(target: LocalDirTarget) -> dict[str, bytes]:
    return {name: target.read_segment(name) for name in target.list_segments()}


def test_local_mirror_survives_a_wiped_home(tmp_path):
    home1 = tmp_path / "home1"
    target = LocalDirTarget(tmp_path / "durable")
    store = Store(home1 / "store.db")
    _fill(store, 3)
    mirror = Mirror(store, target, home1 / "mirror-state.json")
    first = mirror.flush()
    assert first.segment is not None and first.rows == {"conversations": 1, "turns": 3, "feedback": 3, "arena_votes": 0}
    assert mirror.flush().segment is None  # nothing new: no empty segment
    before = _segment_bytes(target)

    _fill(store, 2, start=3)
    store.add_arena_vote("p", "v1", "v2", "x", "y", "a")
    second = mirror.flush()
    assert second.rows == {"conversations": 1, "turns": 2, "feedback": 2, "arena_votes": 1}
    after = _segment_bytes(target)
    # Append-only: the old segment is byte-for-byte unchanged and a new one was added.
    assert len(after) == 2 and all(after[name] == data for name, data in before.items())

    expected = _export(store)
    # The Space restarts: the home (store and watermark) is gone, the mirror is not.
    home2 = tmp_path / "home2"
    fresh = Store(home2 / "store.db")
    assert fresh.count_turns() == 0
    restored = Mirror(fresh, target, home2 / "mirror-state.json").restore()
    assert restored.segments == 2 and restored.imported["turns"] == 5 and restored.imported["feedback"] == 5
    assert _export(fresh) == expected
    assert fresh.arena_votes()[0]["winner"] == "a"

    # Idempotent: restoring again imports nothing, and the restored rows are not mirrored twice.
    again = Mirror(fresh, target, home2 / "mirror-state.json")
    assert sum(again.restore().imported.values()) == 0
    assert again.flush().segment is None
    assert _export(fresh) == expected
    assert len(target.list_segments()) == 2


def test_restore_tops_up_a_partial_store_and_mirrors_only_new_rows(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    a = Store(tmp_path / "a" / "store.db")
    _fill(a, 2)
    Mirror(a, target, tmp_path / "a" / "state.json").flush()

    # A second home holds one local turn the mirror never saw; restore adds the mirrored two.
    b = Store(tmp_path / "b" / "store.db")
    local_only = _fill(b, 1, start=10)
    mb = Mirror(b, target, tmp_path / "b" / "state.json")
    mb.restore()
    assert b.count_turns() == 3 and b.count_feedback() == 3
    flushed = mb.flush()
    assert flushed.rows["turns"] == 1 and flushed.rows["feedback"] == 1  # only the local-only rows
    seg = target.read_segment(flushed.segment).decode().splitlines()
    turn_ids = [json.loads(line)["row"]["id"] for line in seg if json.loads(line)["table"] == "turns"]
    assert turn_ids == local_only


def test_restore_skips_a_torn_line_and_ignores_temp_files(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    s = Store(tmp_path / "a" / "store.db")
    _fill(s, 1)
    seg = Mirror(s, target, tmp_path / "a" / "state.json").flush().segment
    # A torn line in a (hypothetical) externally damaged segment, and a temp file from a crash.
    (target.dir / "zzzz-damaged.jsonl").write_text('{"table": "turns", "row": {"id": \n')
    (target.dir / f".{seg}.tmp").write_text("garbage")
    fresh = Store(tmp_path / "b" / "store.db")
    result = Mirror(fresh, target, tmp_path / "b" / "state.json").restore()
    assert result.segments == 2 and result.skipped_lines == 1
    assert fresh.count_turns() == 1


def test_a_segment_is_never_replaced(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    target.write_segment("x.jsonl", b"one\n")
    with pytest.raises(FileExistsError):
        target.write_segment("x.jsonl", b"two\n")
    assert target.read_segment("x.jsonl") == b"one\n"
    assert [p.name for p in target.dir.iterdir()] == ["x.jsonl"]  # no temp file left behind


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi (the hub cannot be reached here): an in-memory repo
    that, like the hub, keeps one commit per upload; it refuses to overwrite a path so that a
    test fails if the mirror ever rewrites a segment."""

    def __init__(self, download_dir: Path):
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.commits: list[str] = []
        self.download_dir = download_dir

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **_):
        key = (repo_type, repo_id)
        if key in self.repos and not exist_ok:
            raise RuntimeError("repo exists")
        self.repos.setdefault(key, {})

    def list_repo_files(self, repo_id, *, repo_type=None, **_):
        return sorted(self.repos[(repo_type, repo_id)])

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, repo_type=None, commit_message=None, **_):
        files = self.repos[(repo_type, repo_id)]
        if path_in_repo in files:
            raise AssertionError(f"mirror tried to overwrite {path_in_repo}")
        data = path_or_fileobj.read() if isinstance(path_or_fileobj, io.IOBase) else Path(path_or_fileobj).read_bytes()
        files[path_in_repo] = data
        self.commits.append(commit_message)

    def hf_hub_download(self, *, repo_id, filename, repo_type=None, **_):
        out = self.download_dir / repo_id.replace("/", "--") / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.repos[(repo_type, repo_id)][filename])
        return str(out)


def test_hub_dataset_mirror_round_trip_with_fake_hub(tmp_path, monkeypatch):
    api = FakeHubApi(tmp_path / "downloads")
    monkeypatch.setenv("LOOP_APP__MIRROR_HF_REPO", "org/chat-feedback-log")
    config = load_config()
    store = Store.open(config.home)
    mirror = mirror_from_config(config, store, api=api)
    assert isinstance(mirror.target, HubDatasetTarget)
    _fill(store, 2)
    mirror.flush()
    _fill(store, 1, start=5)
    mirror.flush()
    assert mirror.flush().segment is None
    files = api.list_repo_files("org/chat-feedback-log", repo_type="dataset")
    assert len(files) == 2 and all(f.startswith("segments/") and f.endswith(".jsonl") for f in files)
    assert len(api.commits) == 2
    expected = _export(store)

    fresh = Store(tmp_path / "wiped" / "store.db")
    result = Mirror(fresh, HubDatasetTarget("org/chat-feedback-log", api=api), tmp_path / "wiped" / "s.json").restore()
    assert result.imported["turns"] == 3
    assert _export(fresh) == expected


def test_config_picks_the_target(tmp_path, monkeypatch, loop_home):
    config = load_config()
    default = target_from_config(config)
    assert isinstance(default, LocalDirTarget) and default.root == loop_home.parent / f"{loop_home.name}-mirror"
    monkeypatch.setenv("LOOP_APP__MIRROR_DIR", "off")
    assert target_from_config(load_config()) is None
    monkeypatch.setenv("LOOP_APP__MIRROR_DIR", str(tmp_path / "elsewhere"))
    assert target_from_config(load_config()).root == tmp_path / "elsewhere"


def test_background_flush_and_final_flush_on_stop(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    store = Store(tmp_path / "h" / "store.db")
    mirror = Mirror(store, target, tmp_path / "h" / "state.json")
    mirror.start(interval_s=0.05)
    _fill(store, 1)
    import time

    deadline = time.time() + 10
    while not target.list_segments() and time.time() < deadline:
        time.sleep(0.05)
    assert target.list_segments(), "the background thread never flushed"
    _fill(store, 1, start=1)
    mirror.stop()  # the final flush catches what the interval has not yet
    fresh = Store(tmp_path / "r" / "store.db")
    Mirror(fresh, target, tmp_path / "r" / "state.json").restore()
    assert fresh.count_turns() == 2 and set(TABLES) >= {"turns"}
    shutil.rmtree(tmp_path / "durable")
