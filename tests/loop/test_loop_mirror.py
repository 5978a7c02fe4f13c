"""The durable mirror: append-only segments, a restore that skips bad parts and keeps going,
batched Hub commits, retries on 429, and a Hub repo that must be private.

The Hub cannot be reached here: ``FakeHubApi`` (tests/fake_hub.py) is a fake of ``HfApi`` that
raises the library's own errors (429 with ``Retry-After``, 404) and models repo visibility and the
per-hour commit limit.
"""

from __future__ import annotations

import json
import time
from datetime import UTC

import pytest
from fake_hub import FakeHubApi

from loop.config import load_config
from loop.core.mirror import (
    HubBusyError,
    HubDatasetTarget,
    LocalDirTarget,
    Mirror,
    PublicRepoError,
    RetryPolicy,
    mirror_from_config,
    target_from_config,
)
from loop.core.store import Store

REPO = "org/chat-feedback-log"


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


def _rows(segment: bytes) -> list[dict]:
    return [json.loads(line) for line in segment.decode().splitlines() if line.strip()]


class Clock:
    """A hand-moved monotonic clock shared by the mirror and the fake Hub."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _no_sleep(recorded: list[float]) -> RetryPolicy:
    return RetryPolicy(sleep=recorded.append)


# -- append-only, idempotent -------------------------------------------------------------------------


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
    assert restored.complete and not restored.skipped_rows and not restored.failed_segments
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
    seg = _rows(target.read_segment(flushed.segment))
    assert [r["row"]["id"] for r in seg if r["table"] == "turns"] == local_only


def test_a_segment_is_never_replaced(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    target.write_segment("x.jsonl", b"one\n")
    with pytest.raises(FileExistsError):
        target.write_segment("x.jsonl", b"two\n")
    assert target.read_segment("x.jsonl") == b"one\n"
    assert [p.name for p in target.dir.iterdir()] == ["x.jsonl"]  # no temp file left behind
    assert target.dir.stat().st_mode & 0o077 == 0  # raw chats: the owner's alone


def test_a_large_backlog_is_split_into_bounded_segments_that_replay_in_order(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    store = Store(tmp_path / "a" / "store.db")
    _fill(store, 5)  # 1 conversation + 5 turns + 5 feedback = 11 rows
    flushed = Mirror(store, target, tmp_path / "a" / "state.json", segment_max_rows=3).flush()
    assert len(flushed.segments) == 4 and flushed.segments == sorted(flushed.segments)
    assert all(len(_rows(target.read_segment(n))) <= 1 + 3 for n in flushed.segments)  # header + 3 rows
    fresh = Store(tmp_path / "b" / "store.db")
    result = Mirror(fresh, target, tmp_path / "b" / "state.json").restore()
    assert result.complete and _export(fresh) == _export(store)


# -- a restore that keeps going ------------------------------------------------------------------------


def _bad_segment(good_turn_id: str) -> bytes:
    lines = [
        {"table": "_segment", "row": {"format": 1}},
        # A feedback row whose turn is in no segment (an orphan) ...
        {"table": "feedback", "row": {"id": "fb-orphan", "turn_id": "no-such-turn", "thumbs": "up", "reasons": "[]",
                                      "source": "app", "created_at": "2025-01-01T00:00:00Z"}},
        # ... a row without an id, a row the schema refuses, a table this version does not know ...
        {"table": "turns", "row": {"answer": "no id"}},
        {"table": "feedback", "row": {"id": "fb-bad-thumbs", "turn_id": good_turn_id, "thumbs": "sideways",
                                      "reasons": "[]", "source": "app", "created_at": "2025-01-01T00:00:00Z"}},
        {"table": "future_table", "row": {"id": "x"}},
        # ... and, after all of them, a good row that must still arrive.
        {"table": "arena_votes", "row": {"id": "vote-1", "prompt": "p", "version_a": "v1", "version_b": "v2",
                                         "answer_a": "x", "answer_b": "y", "winner": "b",
                                         "created_at": "2025-01-01T00:00:00Z"}},
    ]
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def test_restore_skips_bad_rows_reports_them_and_restores_every_later_segment(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    src = Store(tmp_path / "a" / "store.db")
    first_ids = _fill(src, 2)
    m = Mirror(src, target, tmp_path / "a" / "state.json")
    m.flush()
    target.write_segment(f"{target.list_segments()[0][:26]}-zz-bad.jsonl", _bad_segment(first_ids[0]))
    later_ids = _fill(src, 2, start=2)
    later = m.flush().segment
    assert target.list_segments()[-1] == later  # the bad segment sorts between the good ones

    fresh = Store(tmp_path / "b" / "store.db")
    result = Mirror(fresh, target, tmp_path / "b" / "state.json").restore()
    assert result.segments == 3 and not result.complete
    # Every good row is in, including those after the bad ones and in the later segment.
    assert _export(fresh) == _export(src) and fresh.count_turns() == 4
    assert {r["id"] for r in _export(fresh)} == set(first_ids + later_ids)
    assert [v["winner"] for v in fresh.arena_votes()] == ["b"]
    # Each bad row is named, with why.
    reasons = {(s.table, s.id): s.reason for s in result.skipped_rows}
    assert "orphan" in reasons[("feedback", "fb-orphan")]
    assert "without an id" in reasons[("turns", None)]
    assert "CHECK" in reasons[("feedback", "fb-bad-thumbs")]  # refused, not silently ignored
    assert "unknown table" in reasons[("future_table", None)]
    assert "fb-orphan" in result.summary()


def test_a_child_whose_parent_arrives_in_a_later_segment_is_restored(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    src = Store(tmp_path / "a" / "store.db")
    _fill(src, 1)
    Mirror(src, target, tmp_path / "a" / "state.json").flush()
    rows = _rows(target.read_segment(target.list_segments()[0]))
    by_table = {t: [r for r in rows if r["table"] == t] for t in ("conversations", "turns", "feedback")}
    # A second writer's segments arrive in the wrong order: the feedback first, its turn later.
    target.write_segment("A-child.jsonl", "\n".join(json.dumps(r) for r in by_table["feedback"]).encode())
    target.write_segment("B-parents.jsonl",
                         "\n".join(json.dumps(r) for r in by_table["conversations"] + by_table["turns"]).encode())
    for name in target.list_segments():
        if not name.startswith(("A-", "B-")):
            (target.dir / name).unlink()
    fresh = Store(tmp_path / "b" / "store.db")
    result = Mirror(fresh, target, tmp_path / "b" / "state.json").restore()
    assert result.complete and _export(fresh) == _export(src)


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


def _hub_with_segments(tmp_path, n: int, clock=time.time) -> tuple[FakeHubApi, Store, list[str]]:
    api = FakeHubApi(tmp_path / "downloads", clock=clock)
    src = Store(tmp_path / "src" / "store.db")
    mirror = Mirror(src, HubDatasetTarget(REPO, api=api, commit_interval_s=0), tmp_path / "src" / "state.json")
    names = []
    for i in range(n):
        _fill(src, 1, start=i)
        names.append(mirror.flush().segment)
    return api, src, names


def test_restore_waits_out_a_429_as_asked_and_restores_everything(tmp_path):
    api, src, names = _hub_with_segments(tmp_path, 3)
    api.fail("hf_hub_download", 429, times=2, retry_after=7, when=lambda call: call["filename"].endswith(names[1]))
    slept: list[float] = []
    fresh = Store(tmp_path / "b" / "store.db")
    result = Mirror(fresh, HubDatasetTarget(REPO, api=api, retry=_no_sleep(slept)), tmp_path / "b" / "s.json").restore()
    assert slept == [7.0, 7.0]  # Retry-After honoured, twice
    assert result.complete and result.segments == 3 and _export(fresh) == _export(src)


def test_a_segment_that_stays_rate_limited_is_reported_and_the_rest_restored(tmp_path):
    api, src, names = _hub_with_segments(tmp_path, 3)
    api.fail("hf_hub_download", 429, times=1000, retry_after=0, when=lambda call: call["filename"].endswith(names[1]))
    fresh = Store(tmp_path / "b" / "store.db")
    result = Mirror(fresh, HubDatasetTarget(REPO, api=api), tmp_path / "b" / "s.json").restore()
    assert result.segments == 2 and list(result.failed_segments) == [names[1]]
    assert "429" in result.failed_segments[names[1]]
    assert fresh.count_turns() == 2  # the first and the third segment, not only the first

    # Nothing is lost: the segment is still on the Hub, and the next restore brings it in.
    api._failures.clear()
    again = Mirror(fresh, HubDatasetTarget(REPO, api=api), tmp_path / "b" / "s.json").restore()
    assert again.complete and again.imported["turns"] == 1 and _export(fresh) == _export(src)


def test_retry_after_as_an_http_date_and_the_hubs_ratelimit_header_are_honoured():
    from datetime import datetime, timedelta
    from email.utils import format_datetime
    from types import SimpleNamespace

    from loop.core.mirror import retry_after_s

    def err(headers):
        return SimpleNamespace(response=SimpleNamespace(status_code=429, headers=headers))

    assert retry_after_s(err({"Retry-After": "12"})) == 12.0
    at = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert 80 <= retry_after_s(err({"Retry-After": at})) <= 90
    assert retry_after_s(err({"RateLimit": '"api";r=0;t=55'})) == 55.0
    assert retry_after_s(err({})) is None


# -- batched Hub commits -------------------------------------------------------------------------------


def test_hub_commits_stay_far_below_the_hourly_limit_and_lose_nothing(tmp_path):
    clock = Clock()
    api = FakeHubApi(tmp_path / "downloads", clock=clock)
    store = Store(tmp_path / "a" / "store.db")
    mirror = Mirror(store, HubDatasetTarget(REPO, api=api), tmp_path / "a" / "state.json", clock=clock)
    for i in range(2 * 120):  # two hours of the app's 30 s flush ticks, a new turn each time
        _fill(store, 1, start=i)
        clock.now += 30
        assert mirror._safe_flush() is not None, mirror.last_error
    mirror.stop()
    commits = api.commits_to(REPO, "dataset")
    # Default: one commit per 300 s at most, plus the final one; the Hub's limit is 128 an hour.
    assert 2 * 12 <= len(commits) <= 2 * 12 + 1
    assert not api.overwrites
    fresh = Store(tmp_path / "b" / "store.db")
    Mirror(fresh, HubDatasetTarget(REPO, api=api), tmp_path / "b" / "s.json").restore()
    assert _export(fresh) == _export(store) and fresh.count_turns() == 240


def test_one_commit_holds_every_segment_of_a_flush(tmp_path):
    api = FakeHubApi(tmp_path / "downloads")
    store = Store(tmp_path / "a" / "store.db")
    _fill(store, 4)
    flushed = Mirror(store, HubDatasetTarget(REPO, api=api), tmp_path / "a" / "s.json", segment_max_rows=2).flush()
    assert len(flushed.segments) == 5
    (commit,) = api.commits_to(REPO, "dataset")
    assert commit.paths == sorted(f"segments/{n}" for n in flushed.segments)


def test_the_shutdown_flush_is_never_held_back_by_the_commit_interval(tmp_path):
    clock = Clock()
    api = FakeHubApi(tmp_path / "downloads", clock=clock)
    store = Store(tmp_path / "a" / "store.db")
    mirror = Mirror(store, HubDatasetTarget(REPO, api=api, commit_interval_s=300), tmp_path / "a" / "s.json", clock=clock)
    _fill(store, 1)
    assert mirror.flush().segment is not None
    _fill(store, 1, start=1)
    clock.now += 30
    held = mirror.flush()
    assert held.deferred and held.segment is None and len(api.commits) == 1
    final = mirror.stop()
    assert final.segment is not None and final.rows["turns"] == 1 and len(api.commits) == 2


def test_a_rate_limited_commit_waits_as_asked_and_loses_nothing(tmp_path):
    clock = Clock()
    api = FakeHubApi(tmp_path / "downloads", clock=clock)
    store = Store(tmp_path / "a" / "store.db")
    slept: list[float] = []
    target = HubDatasetTarget(REPO, api=api, commit_interval_s=0, retry=_no_sleep(slept))
    mirror = Mirror(store, target, tmp_path / "a" / "s.json", clock=clock)
    _fill(store, 1)
    api.fail("create_commit", 429, times=1, retry_after=3)  # short: slept through within the flush
    assert mirror.flush().segment is not None and slept == [3.0]

    _fill(store, 1, start=1)
    api.fail("create_commit", 429, times=1, retry_after=600)  # long: not slept through
    with pytest.raises(HubBusyError) as busy:
        mirror.flush()
    assert busy.value.retry_after_s == 600 and slept == [3.0]
    calls = len(api.calls)
    clock.now += 300
    assert mirror.flush().deferred and len(api.calls) == calls  # the Hub is not asked again before then
    clock.now += 301
    later = mirror.flush()
    assert later.rows["turns"] == 1  # the rows waited in the store, and went with the next commit
    fresh = Store(tmp_path / "b" / "store.db")
    Mirror(fresh, HubDatasetTarget(REPO, api=api), tmp_path / "b" / "s.json").restore()
    assert _export(fresh) == _export(store)


def test_the_fake_hub_enforces_the_hourly_commit_limit(tmp_path):
    clock = Clock()
    api = FakeHubApi(tmp_path / "downloads", clock=clock, commits_per_hour=3)
    api.create_repo(REPO, repo_type="dataset", private=True)
    for i in range(3):
        api.upload_file(path_or_fileobj=b"x", path_in_repo=f"f{i}", repo_id=REPO, repo_type="dataset")
    with pytest.raises(Exception) as limited:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="f3", repo_id=REPO, repo_type="dataset")
    assert limited.value.response.status_code == 429 and int(limited.value.response.headers["Retry-After"]) == 3601
    clock.now += 3601
    api.upload_file(path_or_fileobj=b"x", path_in_repo="f3", repo_id=REPO, repo_type="dataset")


# -- privacy -------------------------------------------------------------------------------------------


def test_the_mirror_creates_its_dataset_repo_private(tmp_path):
    api = FakeHubApi(tmp_path / "downloads")
    store = Store(tmp_path / "a" / "store.db")
    _fill(store, 1)
    Mirror(store, HubDatasetTarget(REPO, api=api), tmp_path / "a" / "s.json").flush()
    assert api.repo_info(REPO, repo_type="dataset").private is True


def test_the_mirror_refuses_a_public_dataset_repo_and_uploads_nothing(tmp_path):
    api = FakeHubApi(tmp_path / "downloads")
    api.create_repo(REPO, repo_type="dataset")  # someone made it by hand: public, the Hub's default
    store = Store(tmp_path / "a" / "store.db")
    _fill(store, 2)
    mirror = Mirror(store, HubDatasetTarget(REPO, api=api, commit_interval_s=0), tmp_path / "a" / "s.json")
    with pytest.raises(PublicRepoError, match="not private"):
        mirror.flush()
    with pytest.raises(PublicRepoError):
        Mirror(Store(tmp_path / "b" / "store.db"), HubDatasetTarget(REPO, api=api), tmp_path / "b" / "s.json").restore()
    assert api.commits == [] and api.files(REPO, "dataset") == {}
    assert mirror._safe_flush() is None and "not private" in mirror.last_error  # the app keeps serving, and says why

    # Made private, the same rows go (the watermark never moved).
    api.update_repo_settings(REPO, repo_type="dataset", private=True)
    assert mirror.flush().rows["turns"] == 2
    # Flipped public again later: checked before every commit, so nothing more goes.
    api.update_repo_settings(REPO, repo_type="dataset", private=False)
    _fill(store, 1, start=5)
    with pytest.raises(PublicRepoError):
        mirror.flush()
    assert len(api.commits) == 1


# -- config and the background thread -------------------------------------------------------------------


def test_hub_dataset_mirror_round_trip_from_config(tmp_path, monkeypatch):
    api = FakeHubApi(tmp_path / "downloads")
    monkeypatch.setenv("LOOP_APP__MIRROR_HF_REPO", REPO)
    monkeypatch.setenv("LOOP_APP__MIRROR_HUB_COMMIT_INTERVAL_S", "0")
    config = load_config()
    store = Store.open(config.home)
    mirror = mirror_from_config(config, store, api=api)
    assert isinstance(mirror.target, HubDatasetTarget) and mirror.target.min_write_interval_s == 0
    _fill(store, 2)
    mirror.flush()
    _fill(store, 1, start=5)
    mirror.flush()
    assert mirror.flush().segment is None
    files = api.list_repo_files(REPO, repo_type="dataset")
    assert len(files) == 2 and all(f.startswith("segments/") and f.endswith(".jsonl") for f in files)
    assert len(api.commits) == 2 and not api.overwrites
    expected = _export(store)

    fresh = Store(tmp_path / "wiped" / "store.db")
    result = Mirror(fresh, HubDatasetTarget(REPO, api=api), tmp_path / "wiped" / "s.json").restore()
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
    monkeypatch.setenv("LOOP_APP__MIRROR_HF_REPO", REPO)
    hub = target_from_config(load_config(), api=FakeHubApi(tmp_path))
    assert isinstance(hub, HubDatasetTarget) and hub.min_write_interval_s == 300


def test_the_background_thread_flushes_on_its_interval(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    store = Store(tmp_path / "h" / "store.db")
    mirror = Mirror(store, target, tmp_path / "h" / "state.json")
    _fill(store, 1)
    mirror.start(interval_s=0.01)
    try:
        deadline = time.monotonic() + 30
        while not target.list_segments() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert target.list_segments(), "the background thread never flushed"
    finally:
        mirror.stop()


def test_stop_flushes_what_the_interval_has_not_yet(tmp_path):
    target = LocalDirTarget(tmp_path / "durable")
    store = Store(tmp_path / "h" / "store.db")
    mirror = Mirror(store, target, tmp_path / "h" / "state.json")
    mirror.start(interval_s=3600)  # the interval never comes within this test: only stop() can flush
    _fill(store, 2)
    assert target.list_segments() == []
    final = mirror.stop()
    assert final.segment is not None and final.rows["turns"] == 2 and target.list_segments() == [final.segment]
    fresh = Store(tmp_path / "r" / "store.db")
    Mirror(fresh, target, tmp_path / "r" / "state.json").restore()
    assert _export(fresh) == _export(store)
