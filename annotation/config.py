"""Typed configuration for the annotation package.

`StackConfig` configures the local Argilla stack (`annotation.server`). The dataset/push/pull settings
(`AnnotationConfig`) live beside it in this module. `load_annotation_config` loads both with the shared
sections (`AnnotationRootConfig`); the conductor's root config (`loop.config.LoopConfig`) holds them among
all the others. The functions of this package take `AnnotationSettings`: the section, a root holding it, or
None for the defaults.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loop.core.config import CoreConfig, load_root

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def is_loopback(host: object) -> bool:
    """True for "localhost" and for IP addresses in 127.0.0.0/8 or ::1; anything else (a name, 0.0.0.0) is not."""
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_address(host: str) -> str:
    """The IP address a part binds to for `host` ("localhost" resolves differently per program; an IP does not)."""
    return "127.0.0.1" if host == "localhost" else host


@dataclass
class StackConfig:
    """How the local Argilla stack (search server + redis + argilla server + worker) is run."""

    # Interface every part listens on: a loopback address only (127.0.0.0/8 or "localhost"). The stack has
    # no TLS, and its search server answers without authentication, so it must never be reachable from the network.
    host: str = "127.0.0.1"
    # Port of the Argilla server (UI + REST API). The DESIGN contract is http://127.0.0.1:6900.
    port: int = 6900
    # Port of the in-memory OpenSearch-compatible search server (osmem-server) Argilla indexes records in.
    search_port: int = 6910
    # Port of the stack's own redis-server (Argilla's background-job queue); never the system redis on 6379.
    redis_port: int = 6911
    # Argilla workspace the owner creates and the reviewer is added to.
    workspace: str = "feedback"
    # Owner user (role owner): its API key is written to $LOOP_HOME/argilla/api_key.
    owner_username: str = "owner"
    # Demo/test annotator (role annotator, member of `workspace`); its password is stored under $LOOP_HOME/argilla/.
    reviewer_username: str = "reviewer"
    # Seconds to wait for each part to become healthy before `start` fails, naming the part and its log tail.
    startup_timeout_s: float = 120.0
    # rq worker processes for Argilla's background jobs (argilla-server defaults to 2). One is plenty for a few
    # reviewers and leaves the CPU to the app and the trainer.
    worker_processes: int = 1
    # redis-server executable (Debian's `redis-server` package); a name is looked up on PATH.
    redis_server_bin: str = "redis-server"
    # The argilla-server virtualenv; None means $LOOP_TOOLS/argilla-venv (created by `python -m annotation.install`).
    venv_dir: Path | None = None

    def validate(self) -> list[str]:
        """Every problem with this config, all at once (empty list when valid)."""
        problems: list[str] = []
        ports = {"port": self.port, "search_port": self.search_port, "redis_port": self.redis_port}
        for name, value in ports.items():
            if not isinstance(value, int) or not 1 <= value <= 65535:
                problems.append(f"stack.{name} must be an integer port in 1..65535, got {value!r}")
        if len(set(ports.values())) != len(ports):
            problems.append(f"stack ports must differ from each other, got {ports}")
        if not is_loopback(self.host):
            problems.append(f"stack.host must be a loopback address (127.0.0.0/8 or localhost): the stack has "
                            f"no TLS and its search server has no authentication, got {self.host!r}")
        elif ":" in self.host:
            # argilla-server 2.8's search client drops the brackets of an IPv6 URL and fails at startup.
            problems.append(f"stack.host {self.host!r}: Argilla's search client cannot reach an IPv6 address; "
                            "use an address in 127.0.0.0/8 or localhost")
        for name in ("workspace", "owner_username", "reviewer_username"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME.match(value):
                problems.append(f"stack.{name} must be lowercase letters, digits, '-' or '_', got {value!r}")
        if self.owner_username == self.reviewer_username:
            problems.append("stack.owner_username and stack.reviewer_username must differ")
        if not self.startup_timeout_s > 0:
            problems.append(f"stack.startup_timeout_s must be > 0, got {self.startup_timeout_s!r}")
        if not isinstance(self.worker_processes, int) or self.worker_processes < 1:
            problems.append(f"stack.worker_processes must be an integer >= 1, got {self.worker_processes!r}")
        if not self.redis_server_bin:
            problems.append("stack.redis_server_bin must not be empty")
        return problems


# Priority tiers a turn can fall in (see annotation/priority.py and docs/annotation.md).
PRIORITY_TIERS: tuple[str, ...] = ("negative", "uncertain", "recent", "positive")
# Privacy detectors (see annotation/scrub.py).
SCRUB_KINDS: tuple[str, ...] = ("secret", "email", "iban", "card", "crypto", "ip", "phone", "name")


@dataclass
class AnnotationConfig:
    """The Argilla dataset, what is pushed to it each cycle, and how reviews come back as a snapshot."""

    # Argilla workspace holding the dataset (the local stack creates it; see StackConfig.workspace).
    workspace: str = "feedback"
    # Dataset name. A breaking schema change moves to "<dataset>-v<N>" (see annotation/schema.py).
    dataset: str = "chat-feedback"
    # Argilla URL; "" = $ARGILLA_API_URL, else the local stack at http://127.0.0.1:6900.
    api_url: str = ""
    # Seconds one Argilla request may take before it counts as failed.
    request_timeout_s: int = 60
    # Submitted responses a record needs before it is complete (Argilla task distribution) and
    # before pull turns it into a training example.
    min_submitted: int = 1
    # Most NEW records sent per push (the active-learning budget). Updates of records already in
    # Argilla and retries from the outbox are always sent: reviewers must never see stale feedback.
    budget_per_cycle: int = 200
    # Order in which tiers fill the budget: "negative" (thumbs-down, corrected or a down-reason),
    # "uncertain" (logprob_mean below uncertainty_threshold, least confident first), "recent" (the
    # rest, newest first), "positive" (sampled thumbs-up, newest first). A tier left out is never pushed.
    priority_order: list[str] = field(default_factory=lambda: list(PRIORITY_TIERS))
    # Mean token log-probability (nats) below which an answer counts as uncertain; -1.0 means the
    # geometric-mean token probability is below about 0.37.
    uncertainty_threshold: float = -1.0
    # Fraction of thumbs-up turns pushed (0..1). Chosen by a hash of the turn id, so every run
    # (and every machine) agrees on which ones.
    thumbs_up_sample_rate: float = 0.2
    # Records per bulk request (Argilla accepts at most 500).
    push_batch_size: int = 200
    # Outbox backoff after a failed send: base * 2**(attempts-1) seconds, capped at retry_max_s.
    retry_base_s: float = 30.0
    retry_max_s: float = 3600.0
    # Scrub personal data and secrets from every text before it leaves the store.
    scrub: bool = True
    # Which detectors run (any of SCRUB_KINDS).
    scrub_kinds: list[str] = field(default_factory=lambda: list(SCRUB_KINDS))
    # Extra regular expressions replaced by "[REDACTED]" (e.g. internal hostnames, customer ids).
    scrub_extra_patterns: list[str] = field(default_factory=list)
    # Records per page when pulling (Argilla allows at most 1000).
    pull_batch_size: int = 500
    # Lowest reviewer quality (1-5) at which the model's own answer becomes a training example
    # when no correction was given (DESIGN.md: quality >= 4).
    min_quality: int = 4
    # The judge (annotation/judge_split.py): one wording of every correction taught by 3+ wordings is held
    # out, then wordings are added until at least eval_percent (0-50) of the examples, and never fewer than
    # min_held_out, judge the cycle. An id once held out stays held out. 0 turns the judge off (and with
    # it training: a cycle does not train what nothing can judge).
    eval_percent: int = 10
    # The fewest held-out examples a cycle may be judged on; smaller data stops the cycle with a reason.
    min_held_out: int = 2

    def validate(self) -> list[str]:
        """Every problem with this config, all at once (empty list when valid)."""
        problems: list[str] = []
        for name in ("workspace", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME.match(value):
                problems.append(f"annotation.{name} must be lowercase letters, digits, '-' or '_', got {value!r}")
        if self.api_url and not re.match(r"^https?://", self.api_url):
            problems.append(f"annotation.api_url must start with http:// or https://, got {self.api_url!r}")
        if not isinstance(self.request_timeout_s, int) or self.request_timeout_s < 1:
            problems.append(f"annotation.request_timeout_s must be an integer >= 1, got {self.request_timeout_s!r}")
        if not isinstance(self.min_submitted, int) or self.min_submitted < 1:
            problems.append(f"annotation.min_submitted must be an integer >= 1, got {self.min_submitted!r}")
        if not isinstance(self.budget_per_cycle, int) or self.budget_per_cycle < 0:
            problems.append(f"annotation.budget_per_cycle must be an integer >= 0, got {self.budget_per_cycle!r}")
        order = list(self.priority_order or [])
        unknown = [t for t in order if t not in PRIORITY_TIERS]
        if unknown:
            problems.append(f"annotation.priority_order has unknown tier(s) {unknown}; known: {', '.join(PRIORITY_TIERS)}")
        if len(set(order)) != len(order):
            problems.append(f"annotation.priority_order lists a tier twice: {order}")
        if not isinstance(self.uncertainty_threshold, (int, float)) or self.uncertainty_threshold > 0:
            problems.append("annotation.uncertainty_threshold is a log-probability and must be <= 0, "
                            f"got {self.uncertainty_threshold!r}")
        if not 0.0 <= self.thumbs_up_sample_rate <= 1.0:
            problems.append(f"annotation.thumbs_up_sample_rate must be in [0, 1], got {self.thumbs_up_sample_rate!r}")
        if not isinstance(self.push_batch_size, int) or not 1 <= self.push_batch_size <= 500:
            problems.append(f"annotation.push_batch_size must be an integer in 1..500, got {self.push_batch_size!r}")
        if not self.retry_base_s > 0:
            problems.append(f"annotation.retry_base_s must be > 0, got {self.retry_base_s!r}")
        if not self.retry_max_s >= self.retry_base_s:
            problems.append(f"annotation.retry_max_s must be >= retry_base_s, got {self.retry_max_s!r}")
        bad_kinds = [k for k in (self.scrub_kinds or []) if k not in SCRUB_KINDS]
        if bad_kinds:
            problems.append(f"annotation.scrub_kinds has unknown kind(s) {bad_kinds}; known: {', '.join(SCRUB_KINDS)}")
        for i, pattern in enumerate(self.scrub_extra_patterns or []):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                problems.append(f"annotation.scrub_extra_patterns[{i}] is not a valid regular expression: {exc}")
        if not isinstance(self.pull_batch_size, int) or not 1 <= self.pull_batch_size <= 1000:
            problems.append(f"annotation.pull_batch_size must be an integer in 1..1000, got {self.pull_batch_size!r}")
        if not isinstance(self.min_quality, int) or not 1 <= self.min_quality <= 5:
            problems.append(f"annotation.min_quality must be an integer in 1..5, got {self.min_quality!r}")
        if not isinstance(self.eval_percent, int) or not 0 <= self.eval_percent <= 50:
            problems.append(f"annotation.eval_percent must be an integer in 0..50, got {self.eval_percent!r}")
        if not isinstance(self.min_held_out, int) or self.min_held_out < 1:
            problems.append(f"annotation.min_held_out must be an integer >= 1, got {self.min_held_out!r}")
        return problems


class HasAnnotation(Protocol):
    """A root configuration holding the ``annotation`` section (``AnnotationRootConfig``, the loop's)."""

    @property
    def annotation(self) -> AnnotationConfig: ...


# What the annotation functions take as their configuration: the section, a root holding it, or None
# (the defaults).
AnnotationSettings = AnnotationConfig | HasAnnotation | None


@dataclass(frozen=True)
class AnnotationRootConfig(CoreConfig):
    """What the ``annotation`` CLIs run with: the shared sections plus ``stack`` and ``annotation``."""

    stack: StackConfig
    annotation: AnnotationConfig


def as_annotation_config(config: AnnotationSettings = None) -> AnnotationConfig:
    """Accept an AnnotationConfig, a root config holding one (its ``annotation`` section) or None."""
    if config is None:
        return AnnotationConfig()
    if isinstance(config, AnnotationConfig):
        return config
    section = getattr(config, "annotation", None)
    if not isinstance(section, AnnotationConfig):
        raise TypeError(f"expected an AnnotationConfig or the loop config, got {type(config).__name__}")
    return section


def load_annotation_config(path: str | os.PathLike[str] | None = None,
                           env: Mapping[str, str] | None = None) -> AnnotationRootConfig:
    """The shared sections plus ``stack`` and ``annotation``, validated (``loop.core.config`` says from
    where); what the ``annotation`` CLIs run with."""
    return load_root(AnnotationRootConfig, path, env)
