"""Fixed measures of versions (loop/version_measures.py), taken from the served GGUF of the real small model.

Measuring runs the real bundled SmolLM2 GGUF through llama.cpp. To keep each run short, most tests measure
on small copies of the fixed sets (the first regression examples, a few probes): a set is whatever the
config names, and its hash is of its content, so these are fixed sets like the shipped ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_loop_cycle_promote import _trained_cycle

from app import probe_runner
from loop import version_measures as vm
from loop import versions
from loop.config import load_config
from loop.core import probes as core_probes
from loop.core.bootstrap import ensure_base_version
from loop.core.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parents[2]
SMALL_PROBES = ["Who wrote 'Romeo and Juliet'?", "What is 12 multiplied by 7?", "What does CPU stand for?",
                "Write a haiku about the sea."]  # three with checks, one open-ended (unchecked)


@pytest.fixture
def small_sets(tmp_path, monkeypatch) -> dict[str, Path]:
    """The config's regression set: the shipped set's first 4 examples; the probe set: 4 shipped probes."""
    lines = (REPO / "trainer" / "regression_set.jsonl").read_text().splitlines()
    regression = tmp_path / "regression_small.jsonl"
    regression.write_text("\n".join(lines[:4]) + "\n")
    probes = tmp_path / "probes_small.jsonl"
    shipped = {json.loads(line)["prompt"]: line for line in core_probes.PROBES_FILE.read_text().splitlines()}
    probes.write_text("\n".join(shipped[p] for p in SMALL_PROBES) + "\n")
    monkeypatch.setenv("LOOP_TRAINER__REGRESSION_SET", str(regression))
    monkeypatch.setattr(core_probes, "PROBES_FILE", probes)  # the fixed probe set's file (load_sets reads it)
    return {"regression": regression, "probes": probes}


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    ensure_base_version(load_config(), reg)  # v1: the bundled base, current
    return reg


def _measure_cli(*args: str, capsys) -> list[dict]:
    assert versions.main(["measure", *args, "--quiet", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_base_v1_gets_every_fixed_measure_from_its_served_gguf(small_sets, registry, capsys):
    [report] = _measure_cli("v1", capsys=capsys)
    assert report["measured"] == list(vm.NAMES) and not report["copied"]

    v1, sets = registry.get("v1"), vm.load_sets(load_config())
    cached = v1.metrics["measures"]
    for name in vm.NAMES:
        assert cached[name]["gguf_sha256"] == v1.gguf_sha256
        assert cached[name]["set_hash"] == sets.for_measure(name).hash
        assert cached[name]["value"] is not None
    loss = cached["regression_loss"]
    assert 0 < loss["value"] < 10 and loss["n"] == 4 and loss["tokens"] > 4 * 3
    right = cached["general_right"]
    ids = [json.loads(line)["id"] for line in small_sets["regression"].read_text().splitlines()]
    assert sorted(right["items"]) == sorted(ids) and right["value"] == right["right"] / 4
    probes = cached["probe_pass_rate"]
    assert probes["n"] == 3 and probes["unchecked"] == 1 and probes["value"] == probes["passed"] / 3

    # The probes are scored the way `versions compare` answers them: greedy, from the served file.
    checked = [p for p in sets.probes.items]
    run = probe_runner.run_probes(v1.gguf_path, [p["messages"] for p in checked], max_tokens=vm.PROBE_TOKENS)
    from trainer.general_kept import is_right

    assert probes["items"] == {p["prompt"]: is_right(a.answer, p["expect"]) for p, a in zip(checked, run.answers)}

    assert versions.main(["show", "v1"]) == 0
    shown = capsys.readouterr().out
    assert "fixed measures:" in shown and "regression_loss" in shown and sets.regression.hash[:12] in shown


def test_the_answers_of_a_version_are_decoded_side_by_side_one_pass_per_measure(small_sets, registry, capsys,
                                                                                  monkeypatch):
    from loop.core.gguf_model import GgufModel

    passes: list[int] = []
    batch = GgufModel.greedy_batch

    def counted(self, prompts, max_tokens, **kw):
        passes.append(len(prompts))
        return batch(self, prompts, max_tokens, **kw)

    monkeypatch.setattr(GgufModel, "greedy_batch", counted)
    [report] = _measure_cli("v1", capsys=capsys)
    assert report["measured"] == list(vm.NAMES)
    assert passes == [4, 3]  # the 4 regression prompts with expect, then the 3 checked probes: one pass each


def test_the_regression_loss_is_the_trainers_regression_loss_measured_on_the_served_file(base_hf_dir):
    """The same tokens scored as trainer/evaluate.py scores them (answer and end-of-turn, prompt not), on the
    shipped regression set: against HF weights derived from this very GGUF, the two losses may differ only
    by llama.cpp's quantised arithmetic, within the verifier's tolerance for the file's quantisation."""
    from trainer.evaluate import eval_loss, regression_examples
    from trainer.export_config import VerifyConfig

    sets = vm.load_sets(load_config())
    assert sets.regression.name == "regression_set.jsonl" and len(sets.regression.items) >= 30
    base = ensure_base_version(load_config())
    measured = vm.run_measures(base.gguf_path, sets, ["regression_loss"], progress=False)["regression_loss"]["value"]
    reference = eval_loss(base_hf_dir, regression_examples(), max_length=512)
    verify = VerifyConfig()
    _, max_rel = verify.thresholds(base.quantization)
    assert abs(measured - reference) / reference <= max_rel or abs(measured - reference) <= verify.max_loss_abs_delta


def test_a_second_registered_version_is_measured_on_the_same_set_hashes(small_sets, registry, requantized_gguf, capsys):
    registry.register(requantized_gguf, base_model="SmolLM2-135M-Instruct", parent="v1", quantization="Q4_0",
                      verification={"passed": True}, link=True,
                      metrics={"heldout_loss": 1.5, "regression_loss": 1.1,
                               "current_at_gate": {"heldout_loss": 2.0, "version": "v1"}})
    reports = _measure_cli("--all", capsys=capsys)
    assert [r["version"] for r in reports] == ["v1", "v2"] and all(r["measured"] == list(vm.NAMES) for r in reports)

    v1, v2 = registry.get("v1"), registry.get("v2")
    for name in vm.NAMES:
        a, b = v1.metrics["measures"][name], v2.metrics["measures"][name]
        assert a["set_hash"] == b["set_hash"] and a["method"] == b["method"]
        assert (a["gguf_sha256"], b["gguf_sha256"]) == (v1.gguf_sha256, v2.gguf_sha256) != (v1.gguf_sha256,) * 2
    loss = (v1.metrics["measures"]["regression_loss"]["value"], v2.metrics["measures"]["regression_loss"]["value"])
    assert loss[0] != loss[1]  # another quantisation: another file, another number

    # compare shows them side by side from the cache; held-out loss only as each gate saw it.
    assert versions.main(["compare", "v1", "v2", "--limit", "1", "--max-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fixed"]["regression_loss"] == {"a": loss[0], "b": loss[1], "delta": pytest.approx(loss[1] - loss[0])}
    assert result["fixed_missing"] == {"v1": [], "v2": []}
    assert "heldout_loss" not in result["metrics"]  # two cycles' held-out sets are not one scale
    assert result["gate"] == {"v1": None, "v2": "candidate 1.5000 vs current v1 2.0000"}
    assert versions.main(["compare", "v1", "v2", "--limit", "1", "--max-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "fixed measures" in text and "regression loss" in text and "v2: candidate 1.5000 vs current v1" in text


def test_the_cache_is_reused_and_a_byte_identical_file_is_not_measured_twice(small_sets, registry, bundled_gguf,
                                                                            tmp_path, monkeypatch):
    sets = vm.load_sets(load_config())
    first = vm.measure_version(registry, "v1", sets, progress=False)
    assert first["measured"] == list(vm.NAMES)

    def measured_again(*args, **kwargs):
        raise AssertionError("a cached measure was taken again")

    monkeypatch.setattr(vm, "run_measures", measured_again)
    again = vm.measure_version(registry, "v1", sets, progress=False)
    assert again["measured"] == [] and again["cached"] == list(vm.NAMES) and again["values"] == first["values"]

    copy = tmp_path / "same-bytes.gguf"
    shutil.copyfile(bundled_gguf, copy)
    v2 = registry.register(copy, base_model="SmolLM2", parent="v1", verification={"passed": True})
    report = vm.measure_version(registry, v2.id, sets, progress=False)
    assert report["copied"] == {name: "v1" for name in vm.NAMES} and report["values"] == first["values"]
    assert vm.missing(registry.get(v2.id), sets) == []


def test_a_changed_set_is_measured_again_and_replaces_the_old_value(small_sets, registry, monkeypatch):
    sets = vm.load_sets(load_config())
    before = vm.measure_version(registry, "v1", sets, progress=False)["values"]

    rows = [json.loads(line) for line in small_sets["regression"].read_text().splitlines()]
    rows[0]["messages"][-1]["content"] = "I would rather not say which city that is."
    small_sets["regression"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = vm.load_sets(load_config())
    assert changed.regression.hash != sets.regression.hash and changed.probes.hash == sets.probes.hash
    assert vm.missing(registry.get("v1"), changed) == ["regression_loss", "general_right"]

    calls = []
    real = vm.run_measures
    monkeypatch.setattr(vm, "run_measures", lambda gguf, s, names, **kw: calls.append(list(names)) or real(gguf, s, names, **kw))
    report = vm.measure_version(registry, "v1", changed, progress=False)
    assert calls == [["regression_loss", "general_right"]] and report["cached"] == ["probe_pass_rate"]
    cached = registry.get("v1").metrics["measures"]
    assert cached["regression_loss"]["set_hash"] == changed.regression.hash  # replaced, not kept beside
    assert report["values"]["regression_loss"] != before["regression_loss"]  # another answer, another loss
    assert vm.valid(registry.get("v1"), "regression_loss", sets) is None  # the old set's value is gone


def test_a_changed_gguf_is_measured_again_and_a_file_changed_on_disk_is_not_measured(
        small_sets, registry, requantized_gguf, monkeypatch):
    sets = vm.load_sets(load_config())
    fake = {name: {"value": 0.5, "n": 1} for name in vm.NAMES}
    calls = []
    monkeypatch.setattr(vm, "run_measures", lambda gguf, s, names, **kw: calls.append(list(names)) or {
        n: {**fake[n], "set": s.for_measure(n).name, "set_hash": s.for_measure(n).hash, "method": s.method(n),
            "measured_at": "2030-01-01T00:00:00+00:00"} for n in names})
    vm.measure_version(registry, "v1", sets, progress=False)
    # An entry measured on another file (the version's GGUF replaced and registered anew) is not used.
    v1 = registry.get("v1")
    metrics = json.loads(json.dumps(v1.metrics))
    for entry in metrics["measures"].values():
        entry["gguf_sha256"] = "0" * 64
    registry.update("v1", metrics=metrics)
    assert vm.missing(registry.get("v1"), sets) == list(vm.NAMES)
    vm.measure_version(registry, "v1", sets, progress=False)
    assert calls == [list(vm.NAMES)] * 2
    assert {e["gguf_sha256"] for e in registry.get("v1").metrics["measures"].values()} == {v1.gguf_sha256}

    v2 = registry.register(requantized_gguf, base_model="SmolLM2", verification={"passed": True})  # a copy of its own
    with open(v2.gguf_path, "ab") as fh:
        fh.write(b"\0")  # the file on disk is no longer the registered one
    with pytest.raises(RegistryError, match="file changed on disk"):
        vm.measure_version(registry, v2.id, sets, progress=False)
    assert "measures" not in registry.get(v2.id).metrics and len(calls) == 2


def test_the_cycle_measures_the_new_version_and_its_parent_after_promotion(small_sets, candidate_gguf, monkeypatch):
    monkeypatch.setenv("LOOP_CYCLE__MEASURE_VERSIONS", "true")
    from loop.cycle import Cycle

    _trained_cycle(candidate_gguf)
    logs: list[str] = []
    summary = Cycle(load_config(), progress=False, log=logs.append).run()

    assert summary["outcome"] == "promoted" and summary["current_version"] == "v2", summary
    registry, sets = Registry(), vm.load_sets(load_config())
    for vid in ("v1", "v2"):
        assert vm.missing(registry.get(vid), sets) == [], vid
    # The candidate stands in with the base's very bytes: measured once, copied to the other id.
    copied = {e.get("copied_from") for v in ("v1", "v2") for e in registry.get(v).metrics["measures"].values()}
    assert copied == {None, "v2"}
    assert any(line.startswith("fixed measures of v2:") for line in logs)


def test_a_failing_measure_is_logged_and_never_fails_the_cycle(small_sets, candidate_gguf, monkeypatch):
    monkeypatch.setenv("LOOP_CYCLE__MEASURE_VERSIONS", "true")
    from loop.cycle import Cycle

    def broken(*args, **kwargs):
        raise RuntimeError("llama.cpp could not load the file")

    monkeypatch.setattr(vm, "run_measures", broken)
    _trained_cycle(candidate_gguf)
    logs: list[str] = []
    summary = Cycle(load_config(), progress=False, log=logs.append).run()

    assert summary["outcome"] == "promoted" and summary["current_version"] == "v2", summary
    assert summary["stages"]["publish"]["status"] == "done" and summary["stages"]["report"]["status"] == "done"
    assert any("v2: not measured: llama.cpp could not load the file" in line for line in logs)
    assert "measures" not in Registry().get("v2").metrics
