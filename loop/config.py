"""The root configuration: every section of every layer, assembled by the conductor.

The loader and the shared sections live in the core (``loop.core.config``, which says where the
values come from); the app, annotation and the trainer each keep their own section beside their
code. Only the conductor knows them all, so this is where they are put together as ``LoopConfig``
(one typed field per section), and the one load that refuses a section nobody owns. The conductor's
own sections (gate, cycle, schedule) are here.

``python -m loop.config [--config FILE] [--set section.field=value ...]`` prints the effective
configuration, or every problem in it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from annotation.config import AnnotationConfig, StackConfig
from loop.core.config import (
    ConfigError,
    CoreConfig,
    RolloutConfig,
    config_file,
    load_root,
)
from loop.core.errors import LoopError, error_exit
from trainer.config import TrainConfig
from trainer.export_config import ExportConfig

__all__ = ["ConfigError", "LoopConfig", "CycleConfig", "GateConfig", "RolloutConfig", "ScheduleConfig",
           "config_file", "load_config", "main"]


@dataclass
class GateConfig:
    """When a trained variant may replace the current version."""

    # The candidate's held-out loss must be lower than the current version's by at least this
    # (absolute, in nats/token) on the same held-out set.
    min_improvement: float = 0.0
    # The candidate's general-ability regression loss may be worse than the current's by at most this
    # fraction: a bound against a collapsed model, not the measure of forgetting. 50%, not 5%: the loss on
    # the set's reference phrasings falls 30-40% after one epoch, then rises 10-50% above the start with the
    # style the corrections teach, and a 5% bound on that noise kept or dropped the epochs that had learned
    # by chance (8/16 vs 15/16 recall between two seeds). Lost knowledge is judged by min_general_kept
    # below (docs/judging.md has the figures).
    regression_tolerance: float = 0.5
    # The candidate must still give at least this share of the general answers the current version gives
    # right (trainer/general_kept.py: greedy answers checked for e.g. the capital's name). A loss averaged
    # over a set cannot see one answer changing; this can. 0.6 refuses a model that lost a large part of
    # what it knew; the tuning runs lost 16-34% of these answers (docs/judging.md), so a stricter bound
    # would refuse every cycle until training forgets less.
    min_general_kept: float = 0.6
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
class CycleConfig:
    """One pass of the loop."""

    # Train only when at least this many curated examples arrived since the current version.
    min_new_examples: int = 8
    # Seconds after which a cycle lock whose owner is gone is considered stale.
    lock_stale_s: float = 6 * 3600.0
    # An unfinished cycle is abandoned once one of its stages has failed (or been killed) this many
    # times: a stage that keeps failing must not block the loop for good (docs/loop.md).
    max_stage_attempts: int = 3
    # After a promotion, take the new version's and its parent's fixed measures if missing (regression set,
    # probe set, general answers; loop.version_measures): about 40 s on 2 cores, for the Versions tab.
    measure_versions: bool = True

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


@dataclass(frozen=True)
class LoopConfig(CoreConfig):
    """Every section, typed (``config.trainer.learning_rate``): the conductor's configuration.

    The shared sections come from ``CoreConfig``; a new section is one more field here (its name is
    the TOML table), which is all the loader needs to read, override and validate it.
    """

    gate: GateConfig
    cycle: CycleConfig
    schedule: ScheduleConfig
    stack: StackConfig
    annotation: AnnotationConfig
    trainer: TrainConfig
    export: ExportConfig


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                overrides: Sequence[str] = ()) -> LoopConfig:
    """Load, coerce and validate every section; raise ConfigError listing every problem (an unknown
    section included). ``overrides``: ``section.field=value`` items applied last (``--set``)."""
    return load_root(LoopConfig, path, env, complete=True, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """`python -m loop.config [--config FILE] [--set section.field=value ...]`: print the effective config or
    every problem."""
    parser = argparse.ArgumentParser(prog="python -m loop.config", description=main.__doc__)
    parser.add_argument("--config", help="TOML file (default: $LOOP_CONFIG or $LOOP_HOME/config.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one setting, after the file and the environment (value: a TOML literal)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, overrides=args.overrides)
    except LoopError as exc:
        return error_exit(exc)
    print(json.dumps({"home": str(cfg.home), "source": cfg.source, **cfg.as_dict()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
