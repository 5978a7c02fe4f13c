import pytest
from skips import skip_or_fail

from loop.config import ConfigError, load_config


def test_defaults_validate(loop_home):
    cfg = load_config(env={})
    assert cfg.home == loop_home
    assert cfg.app.port == 7860
    assert cfg.model.n_ctx == 2048


def test_file_and_env_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[app]\nport = 9000\ntemperature = 0.1\n[cycle]\nmin_new_examples = 3\n')
    cfg = load_config(path, env={"LOOP_APP__PORT": "9100"})
    assert cfg.app.port == 9100  # environment wins over the file
    assert cfg.app.temperature == 0.1
    assert cfg.cycle.min_new_examples == 3
    assert cfg.source == str(path)


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[app]\nport = 0\ntemperature = "hot"\nbogus = 1\n[nosuch]\nx = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"LOOP_CYCLE__MIN_NEW_EXAMPLES": "0", "LOOP_SCHEDULE__CRON": "* *"})
    text = str(info.value)
    for fragment in ("app.port", "app.temperature", "app.bogus", "[nosuch]", "cycle.min_new_examples", "schedule.cron"):
        assert fragment in text, fragment
    assert len(info.value.problems) >= 6


def test_bad_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[app\nport=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})


def test_lists_from_env():
    cfg = load_config(env={})
    if "trainer" not in cfg.sections:
        skip_or_fail("trainer extra not installed")
    field = "learning_rates"
    if not hasattr(cfg.trainer, field):
        skip_or_fail("trainer config has no learning_rates field")
    cfg = load_config(env={"LOOP_TRAINER__LEARNING_RATES": "1e-3, 5e-4"})
    assert getattr(cfg.trainer, field) == [1e-3, 5e-4]
