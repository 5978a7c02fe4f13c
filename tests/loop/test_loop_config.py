import dataclasses
import importlib
import typing

import pytest

from annotation.config import AnnotationRootConfig
from loop.config import ConfigError, LoopConfig, load_config
from loop.core.config import CoreConfig
from trainer.config import TrainerRootConfig


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
    cfg = load_config(env={"LOOP_TRAINER__LEARNING_RATES": "1e-3, 5e-4"})
    assert cfg.trainer.learning_rates == [1e-3, 5e-4]


def test_every_section_is_a_typed_field_of_the_root(loop_home):
    cfg = load_config(env={})
    types = LoopConfig.section_types()
    assert set(cfg.as_dict()) == set(types)
    for name, section_type in types.items():
        assert dataclasses.is_dataclass(section_type) and callable(section_type.validate), name
        assert type(getattr(cfg, name)) is section_type, name
    with pytest.raises(AttributeError):
        cfg.nosuch  # noqa: B018 - no section looked up by name at run time


def test_every_section_a_layer_loads_is_in_the_root_with_the_same_type():
    root = LoopConfig.section_types()
    for part_root in (CoreConfig, AnnotationRootConfig, TrainerRootConfig):
        for name, section_type in part_root.section_types().items():
            assert root.get(name) is section_type, f"{part_root.__name__}.{name} is missing from LoopConfig"
    assert issubclass(LoopConfig, CoreConfig)  # the conductor's config goes wherever the shared one does


@pytest.mark.parametrize("module", ["loop.core.config", "loop.config", "annotation.config", "trainer.config",
                                    "trainer.export_config"])
def test_every_section_dataclass_beside_its_code_is_in_the_root(module):
    # A section is a `*Config` dataclass with a validate(); one not in LoopConfig would be refused in the file.
    root = LoopConfig.section_types()
    nested = {hint for section in root.values() for hint in typing.get_type_hints(section).values()}
    for name, cls in vars(importlib.import_module(module)).items():
        if (name.endswith("Config") and dataclasses.is_dataclass(cls) and cls.__module__ == module
                and callable(getattr(cls, "validate", None))):
            assert cls in root.values() or cls in nested, f"{module}.{name} is no section of LoopConfig"


def test_set_overrides_win_over_the_file_and_the_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[trainer]\nmax_steps = 10\nlearning_rate = 1e-3\n[app]\nport = 9000\n')
    cfg = load_config(path, env={"LOOP_TRAINER__MAX_STEPS": "20"},
                      overrides=["trainer.max_steps=40", "trainer.lora_ranks=[8, 16]", "trainer.objective=dpo",
                                 'app.system_prompt="Be brief."'])
    assert cfg.trainer.max_steps == 40 and cfg.trainer.learning_rate == 1e-3 and cfg.app.port == 9000
    assert cfg.trainer.lora_ranks == [8, 16] and cfg.trainer.objective == "dpo"
    assert cfg.app.system_prompt == "Be brief."


def test_every_bad_set_is_reported_at_once_with_its_key():
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=["trainer.learning_rate=fast", "trainer.bogus=1", "nosuch.x=1", "max_steps"])
    text = str(info.value)
    for fragment in ("trainer.learning_rate: expected float", "trainer.bogus: unknown setting",
                     "nosuch.x: unknown section", "'max_steps': expected section.field=value"):
        assert fragment in text, fragment
    assert len(info.value.problems) == 4
