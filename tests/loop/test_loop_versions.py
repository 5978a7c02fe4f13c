"""`python -m loop.versions`, run as a real command against a real registry and the real small model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import probe_runner
from loop.config import load_config
from loop.core.bootstrap import ensure_base_version
from loop.core.registry import Registry

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loop.versions", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **env), timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def registry(requantized_gguf) -> Registry:
    """v1 = the bundled base (current), v2 = a Q4_0 'fine-tune' promoted over it, v3 failed verification."""
    reg = Registry()
    ensure_base_version(load_config(), reg)
    reg.update("v1", metrics={"heldout_loss": 2.10, "regression_loss": 1.50})
    reg.register(requantized_gguf, base_model="SmolLM2-135M-Instruct", parent="v1", quantization="Q4_0",
                 metrics={"heldout_loss": 1.90, "regression_loss": 1.56}, variant={"lr": 1e-3, "rank": 16},
                 verification={"passed": True, "agreement": 0.9}, link=True)
    reg.promote("v2", reason="gate passed", decision={"promote": True})
    reg.register(requantized_gguf, base_model="SmolLM2-135M-Instruct", parent="v2", quantization="Q4_0",
                 verification={"passed": False, "reasons": ["held-out loss drift 0.30 > 0.12"]}, link=True)
    return reg


def test_list_table_and_json(registry):
    text = cli("list").stdout
    header, rule, *rows = text.splitlines()[:5]
    for column in ("ID", "PARENT", "QUANT", "SIZE", "HELD-OUT", "REGRESSION", "VERIFIED"):
        assert column in header
    assert rows[0].split()[:2] == ["<", "v1"] and rows[1].split()[:2] == ["*", "v2"]
    assert "2.1000" in rows[0] and "1.9000" in rows[1] and "FAILED" in rows[2]
    data = json.loads(cli("list", "--json").stdout)
    assert [(r["id"], r["marks"], r["verification"]) for r in data] == [
        ("v1", ["previous"], "passed"), ("v2", ["current"], "passed"), ("v3", [], "FAILED")]
    assert data[1]["parent"] == "v1" and data[1]["quantization"] == "Q4_0" and data[1]["size_bytes"] > 10_000_000


def test_show_readable_and_json(registry):
    text = cli("show", "v3").stdout
    assert text.startswith("v3") and "held-out loss drift" in text and "parent         v2" in text
    data = json.loads(cli("show", "v2", "--json").stdout)
    assert data["marks"] == ["current"] and data["variant"] == {"lr": 1e-3, "rank": 16}
    assert data["gguf_sha256"] == registry.get("v2").gguf_sha256
    missing = cli("show", "v9", ok=False)
    assert missing.returncode == 1 and "no version 'v9'" in missing.stderr


def test_rollback_is_one_command_and_refuses_failed_versions(registry):
    out = cli("rollback").stdout
    assert "v2 -> v1" in out and registry.current_id() == "v1"
    entry = json.loads(cli("rollback", "--to", "v2", "--reason", "fixed upstream", "--json").stdout)
    assert (entry["action"], entry["to"], entry["reason"]) == ("rollback", "v2", "fixed upstream")
    refused = cli("rollback", "--to", "v3", ok=False)
    assert refused.returncode == 1 and "failed verification" in refused.stderr
    assert registry.current_id() == "v2"
    history = json.loads(cli("history", "--json").stdout)
    assert [(h["action"], h["to"]) for h in history] == [
        ("promote", "v1"), ("promote", "v2"), ("rollback", "v1"), ("rollback", "v2")]
    table = cli("history").stdout
    assert "v1 -> v2" in table and "fixed upstream" in table


def test_pin_unpin_and_prune_with_configured_retention(registry, requantized_gguf):
    for _ in range(2):  # v4, v5
        registry.register(requantized_gguf, base_model="SmolLM2-135M-Instruct", verification={"passed": True}, link=True)
    assert "v4 pinned" in cli("pin", "v4").stdout
    plan = json.loads(cli("prune", "--dry-run", "--json", LOOP_REGISTRY__KEEP_VERSIONS="1").stdout)
    assert plan == {"removed": ["v3"], "dry_run": True, "keep": 1}
    assert [v.id for v in registry.list()] == ["v1", "v2", "v3", "v4", "v5"]
    assert "removed: v3" in cli("prune", LOOP_REGISTRY__KEEP_VERSIONS="1").stdout
    cli("unpin", "v4")
    assert json.loads(cli("prune", "--keep", "0", "--json").stdout)["removed"] == ["v4", "v5"]
    assert [v.id for v in registry.list()] == ["v1", "v2"]  # current and previous always stay


def test_compare_runs_both_ggufs_side_by_side(registry):
    probes, origin = probe_runner.load_probes(limit=2)
    result = json.loads(cli("compare", "v1", "v2", "--limit", "2", "--max-tokens", "8", "--json").stdout)
    assert (result["a"], result["b"], result["n_probes"]) == ("v1", "v2", 2)
    assert result["probes"] == origin
    assert [row["prompt"] for row in result["answers"]] == [probe_runner.last_user_text(p) for p in probes]
    for row in result["answers"]:
        assert row["a"] and row["b"] and row["a_mean_logprob"] < 0 and row["b_mean_logprob"] < 0
        assert 0 < row["a_tokens"] <= 8
    deltas = result["metrics"]
    assert "heldout_loss" not in deltas  # each cycle's held-out set is its own: no delta across versions
    assert result["gate"] == {"v1": "held-out 2.1000, no gate comparison recorded",
                              "v2": "held-out 1.9000, no gate comparison recorded"}
    assert deltas["regression_loss"]["delta"] == pytest.approx(0.06)
    assert deltas["size_mb"]["delta"] < 0  # Q4_0 is smaller than Q4_1
    # Same prompts, greedy: the run is deterministic, so v1's answers match a direct run.
    direct = probe_runner.run_probes(registry.get("v1").gguf_path, probes, max_tokens=8)
    assert [a.answer for a in direct.answers] == [row["a"] for row in result["answers"]]

    text = cli("compare", "v1", "v2", "--limit", "1", "--max-tokens", "4").stdout
    assert "[1] " + result["answers"][0]["prompt"] in text
    assert " | " in text and "DELTA (v2 - v1)" in text and "regression_loss" in text
    assert "v2: held-out 1.9000, no gate comparison recorded" in text  # held-out loss only beside its own gate


def test_probe_runner_reads_prompt_and_messages_probes(tmp_path, bundled_gguf):
    probes_file = tmp_path / "probes.jsonl"
    probes_file.write_text(
        json.dumps({"prompt": "Say hello.", "answer": "Hello!"}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": "4"}]}) + "\n")
    probes, origin = probe_runner.load_probes(probes_file)
    assert origin == "probes.jsonl"
    assert probes[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    run = probe_runner.run_probes(bundled_gguf, probes, max_tokens=6)
    assert [a.prompt for a in run.answers] == ["Say hello.", "2+2?"]
    assert all(a.n_tokens <= 6 and a.seconds > 0 for a in run.answers)
    assert run.mean_logprob is not None and run.mean_logprob < 0 and run.tokens_per_second > 0
