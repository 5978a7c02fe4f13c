"""The Versions tab's measures plot and table: every version, the base v1 included, on the same fixed measures,
read from the registry's cache (measured here for real on the bundled model), never measured by the tab."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.versions_tab import VersionsTab
from loop.config import load_config
from loop.core.registry import Registry
from loop.core.store import Store

REPO = Path(__file__).resolve().parents[2]
FIXED = ("regression_loss", "probe_pass_rate", "general_right")


@pytest.fixture
def small_sets(tmp_path, monkeypatch) -> None:
    """Fixed sets small enough to measure in seconds: 3 regression examples, 2 checked probes."""
    lines = (REPO / "trainer" / "regression_set.jsonl").read_text().splitlines()
    (tmp_path / "regression.jsonl").write_text("\n".join(lines[:3]) + "\n")
    from loop.core import probes as core_probes

    probes = [line for line in core_probes.PROBES_FILE.read_text().splitlines()
              if json.loads(line)["prompt"] in ("Who wrote 'Romeo and Juliet'?", "What does CPU stand for?")]
    (tmp_path / "probes.jsonl").write_text("\n".join(probes) + "\n")
    monkeypatch.setenv("LOOP_TRAINER__REGRESSION_SET", str(tmp_path / "regression.jsonl"))
    monkeypatch.setattr(core_probes, "PROBES_FILE", tmp_path / "probes.jsonl")


def _ctx() -> SimpleNamespace:
    return SimpleNamespace(config=load_config(), store=Store.open(), registry=Registry())


def _two_versions(bundled_gguf, tmp_path) -> Registry:
    """v1 = the bundled base (current), v2 = a cycle's version of it with its gate's held-out comparison."""
    import shutil

    from loop.core.bootstrap import ensure_base_version

    registry = Registry()
    ensure_base_version(load_config(), registry)
    copy = tmp_path / "candidate.gguf"
    shutil.copyfile(bundled_gguf, copy)
    registry.register(copy, base_model="SmolLM2", parent="v1", verification={"passed": True},
                      metrics={"heldout_loss": 1.5, "regression_loss": 0.9,
                               "current_at_gate": {"heldout_loss": 2.0, "version": "v1"}})
    return registry


def _entries(version, **values) -> dict:
    """Cache entries in the documented format (docs/registry.md), for the tab to read."""
    return {name: {"value": value, "set": "set.jsonl", "set_hash": sh, "method": {"version": 1},
                   "gguf_sha256": sha or version.gguf_sha256, "measured_at": at, "n": 3}
            for name, (value, sh, at, sha) in values.items()}


def test_the_plot_data_includes_the_base_v1_on_every_fixed_measure(small_sets, bundled_gguf, tmp_path):
    from loop import version_measures as vm

    registry = _two_versions(bundled_gguf, tmp_path)
    vm.measure_versions(registry, ["v1", "v2"], load_config(), progress=False)  # the conductor's job, for real
    registry.start_canary("v2", share=0.2, reason="test")
    registry.end_canary("rolled_back", reason="users disliked it",
                        decision={"canary": {"version": "v2", "rated": 40, "down": 14, "rate": 0.35}})
    ctx = _ctx()
    ctx.store.add_arena_vote("Name a colour.", "v1", "v2", "Blue.", "Red.", "a")

    tab = VersionsTab(ctx)
    data = tab.plot_data()
    v1 = registry.get("v1").metrics["measures"]
    assert data["ids"] == ["v1", "v2"] and data["current"] == "v1"
    for name in FIXED:
        assert data["series"][name][0] == v1[name]["value"] is not None  # the base is plotted, from its cache
        assert data["series"][name][1] == registry.get("v2").metrics["measures"][name]["value"]
    assert data["series"]["canary_thumbs_down_rate"] == [None, 0.35]  # v1 was never a canary
    assert data["series"]["arena_rating"][0] > data["series"]["arena_rating"][1]

    fig = tab.figure()
    loss = next(line for line in fig.axes[0].get_lines() if line.get_label() == "regression loss")
    assert list(loss.get_ydata()) == [v1["regression_loss"]["value"], data["series"]["regression_loss"][1]]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["v1*", "v2"]
    assert not any("held-out" in line.get_label() for ax in fig.axes for line in ax.get_lines())

    rows = {row[0]: row for row in tab.measures_table()}
    assert rows["v1*"][1] == f"{v1['regression_loss']['value']:.4f}" and rows["v1*"][4] == "not canaried"
    assert rows["v1*"][6] == "- (no gate: not made by a cycle)"
    assert rows["v2"][4] == "35.0% of 40 rated" and rows["v2"][5].endswith("(1 games)")
    assert rows["v2"][6] == "candidate 1.5000 vs current v1 2.0000"  # held-out figures only as the gate saw them


def test_missing_and_stale_values_are_shown_as_missing_never_as_zero(bundled_gguf, tmp_path):
    registry = _two_versions(bundled_gguf, tmp_path)
    v1, v2 = registry.get("v1"), registry.get("v2")
    new, old = "2030-01-02T00:00:00+00:00", "2030-01-01T00:00:00+00:00"
    # v1: regression loss from an older set, probe pass rate of another file, no general answers at all.
    registry.update("v1", metrics={"measures": _entries(v1, regression_loss=(0.4, "old-set", old, None),
                                                        probe_pass_rate=(0.6, "probe-set", new, "f" * 64))})
    registry.update("v2", metrics={**v2.metrics, "measures": _entries(
        v2, regression_loss=(0.5, "new-set", new, None), probe_pass_rate=(0.0, "probe-set", new, None),
        general_right=(1.0, "new-set", new, None))})

    tab = VersionsTab(_ctx())
    data = tab.plot_data()
    assert data["series"]["regression_loss"] == [None, 0.5]
    assert data["series"]["probe_pass_rate"] == [None, 0.0]  # a measured 0 stays 0; a missing one is None
    assert data["series"]["general_right"] == [None, 1.0]
    assert data["stale"]["regression_loss"] == ["v1"] and data["sets"]["regression_loss"]["hash"] == "new-set"
    rows = {row[0]: row for row in tab.measures_table()}
    assert rows["v1*"][1:4] == ["stale: older set", "not measured", "not measured"]
    assert rows["v2"][1:4] == ["0.5000", "0.0%", "100.0%"]
    loss = next(line for line in tab.figure().axes[0].get_lines() if line.get_label() == "regression loss")
    assert math.isnan(loss.get_ydata()[0]) and loss.get_ydata()[1] == 0.5  # a gap, not a point at 0


def test_the_tab_never_loads_a_model_for_the_plot(bundled_gguf, tmp_path, monkeypatch):
    import gradio as gr
    import llama_cpp

    from app.probe_runner import LlamaCache
    from app.versions_tab import build_versions_tab

    _two_versions(bundled_gguf, tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("the Versions tab loaded a model to draw its plot")

    monkeypatch.setattr(llama_cpp.Llama, "__init__", no_model)
    monkeypatch.setattr(LlamaCache, "get", no_model)
    with gr.Blocks():
        tab = build_versions_tab(_ctx())  # draws the plot, the table and the canary plot once
    tab.refresh()
    assert [row[0] for row in tab.measures_table()] == ["v1*", "v2"]

    # In a fresh process: drawing the plot and the table imports no conductor module, no trainer, no llama.cpp.
    code = """
import sys
from types import SimpleNamespace
from app.versions_tab import VersionsTab
from loop.core.config import load_config
from loop.core.registry import Registry
from loop.core.store import Store
tab = VersionsTab(SimpleNamespace(config=load_config(), store=Store.open(), registry=Registry()))
tab.figure(); tab.measures_table()
banned = ("loop.cycle", "loop.versions", "loop.version_measures", "loop.rollout", "trainer", "llama_cpp", "torch")
print(sorted(m for m in sys.modules if m.startswith(banned)))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
