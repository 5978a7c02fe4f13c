"""`python -m trainer.train`'s one configuration path: `--config FILE` and `--set trainer.field=value`, read by the
core's loader like the loop's own file and environment; and the GPU variants' child runs, configured through it."""

from __future__ import annotations

import subprocess

import pytest

from loop.core.config import toml_table
from trainer.config import TrainConfig, load_train_config


def config_of(*argv: str) -> TrainConfig:
    from trainer.train import _parser, config_from_args

    return config_from_args(_parser().parse_args(["--data", "d", "--output", "o", *argv]))


def test_set_reaches_the_train_config_after_the_file_and_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[trainer]\nmax_steps = 10\nlora_rank = 4\n[app]\nport = 9000\n')
    monkeypatch.setenv("LOOP_TRAINER__MAX_STEPS", "20")
    monkeypatch.setenv("LOOP_TRAINER__SEED", "7")
    config = config_of("--config", str(path), "--set", "trainer.max_steps=40", "--set", "trainer.learning_rate=5e-4",
                       "--set", "trainer.objective=sft+dpo", "--set", "trainer.learning_rates=[1e-3, 2e-4]")
    assert (config.max_steps, config.lora_rank, config.seed) == (40, 4, 7)  # --set, the file, the environment
    assert config.learning_rate == 5e-4 and config.objective == "sft+dpo" and config.learning_rates == [1e-3, 2e-4]


def test_without_a_config_the_run_reads_the_loops_file(loop_home):
    (loop_home / "config.toml").write_text("[trainer]\nlora_rank = 32\n")
    assert config_of().lora_rank == 32


def test_bad_sets_exit_2_naming_every_key_at_once(tmp_path, capsys):
    from trainer.train import main

    code = main(["--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "run"),
                 "--set", "trainer.learning_rate=fast", "--set", "trainer.lora_rnak=8", "--set", "model.n_ctx=512",
                 "--set", "trainer.max_steps=0"])
    err = capsys.readouterr().err
    assert code == 2
    for key in ("trainer.learning_rate: expected float", "trainer.lora_rnak: unknown setting",
                "model.n_ctx: unknown section", "trainer.max_steps must be"):
        assert key in err, key
    assert not (tmp_path / "run").exists()


def test_a_written_section_reads_back_equal(tmp_path):
    path = tmp_path / "variant.toml"
    for alpha in (None, 64):
        config = TrainConfig(learning_rate=2e-5, lora_alpha=alpha, target_modules='q_proj,"v_proj"\x7f\\',
                             epochs=2.5, learning_rates=[1e-3, 5e-4], lora_ranks=[8], objectives=["sft", "dpo"])
        path.write_text(toml_table("trainer", config))
        assert load_train_config(path, env={}) == config


def test_a_gpu_variant_runs_with_its_own_config_whatever_the_environment_says(tmp_path, monkeypatch):
    from trainer import variants
    from trainer.train import _parser

    spawned = {}

    def popen(command, env, **_):
        spawned.update(command=command, env=env)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setenv("LOOP_TRAINER__LEARNING_RATE", "1e-2")  # the parent's setting, before the variant's
    variant = TrainConfig(learning_rate=2e-4, lora_rank=64, objective="dpo", max_steps=3)
    variants._spawn(("lr0.0002_r64_dpo", variant), 1, "train.jsonl", None, "base", tmp_path, None, False)
    command, env = spawned["command"], spawned["env"]
    assert command[1:3] == ["-m", "trainer.train"] and env["CUDA_VISIBLE_DEVICES"] == "1"
    args = _parser().parse_args(command[3:])
    assert load_train_config(args.config, env, args.overrides) == variant


@pytest.mark.parametrize("text,value", [("40", 40), ("1e-3", 1e-3), ("true", True), ("[16, 64]", [16, 64]),
                                        ('"a b"', "a b"), ("dpo", "dpo"), ("q_proj,v_proj", "q_proj,v_proj")])
def test_set_values_are_toml_literals_and_bare_words_strings(text, value):
    from loop.core.config import toml_literal

    assert toml_literal(text) == value
