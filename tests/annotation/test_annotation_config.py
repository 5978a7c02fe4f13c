"""AnnotationConfig: defaults valid, every problem reported at once, composed by the loop's config."""

from __future__ import annotations

import dataclasses
import inspect
import sys

import pytest

from annotation.config import AnnotationConfig, as_annotation_config


def test_defaults_are_valid_and_documented():
    assert AnnotationConfig().validate() == []
    source = inspect.getsource(sys.modules[AnnotationConfig.__module__])
    body = source[source.index("class AnnotationConfig"):]
    for f in dataclasses.fields(AnnotationConfig):
        line = next(i for i, text in enumerate(body.splitlines()) if text.strip().startswith(f"{f.name}:"))
        above = body.splitlines()[line - 1].strip()
        assert above.startswith("#") or body.splitlines()[line - 2].strip().startswith("#"), f"{f.name} has no comment"


def test_every_problem_is_reported_at_once():
    bad = AnnotationConfig(dataset="Chat Feedback", min_submitted=0, budget_per_cycle=-1,
                           priority_order=["negative", "loud", "negative"], uncertainty_threshold=0.5,
                           thumbs_up_sample_rate=1.5, push_batch_size=501, retry_base_s=0, scrub_kinds=["ssn"],
                           scrub_extra_patterns=["("], pull_batch_size=0, min_quality=6, eval_percent=60,
                           api_url="ftp://x")
    problems = bad.validate()
    for name in ("dataset", "min_submitted", "budget_per_cycle", "unknown tier", "twice", "uncertainty_threshold",
                 "thumbs_up_sample_rate", "push_batch_size", "retry_base_s", "scrub_kinds", "scrub_extra_patterns[0]",
                 "pull_batch_size", "min_quality", "eval_percent", "api_url"):
        assert any(name in p for p in problems), f"no problem mentions {name}: {problems}"


def test_loop_config_composes_the_annotation_section(loop_home, monkeypatch):
    from loop.config import ConfigError, load_config

    (loop_home / "config.toml").write_text('[annotation]\nbudget_per_cycle = 7\nscrub_kinds = ["email", "card"]\n')
    monkeypatch.setenv("LOOP_ANNOTATION__MIN_SUBMITTED", "2")
    monkeypatch.setenv("LOOP_ANNOTATION__PRIORITY_ORDER", "uncertain,negative")
    cfg = as_annotation_config(load_config())
    assert (cfg.budget_per_cycle, cfg.min_submitted) == (7, 2)
    assert cfg.scrub_kinds == ["email", "card"] and cfg.priority_order == ["uncertain", "negative"]
    monkeypatch.setenv("LOOP_ANNOTATION__EVAL_PERCENT", "90")
    with pytest.raises(ConfigError, match="annotation.eval_percent"):
        load_config()
    with pytest.raises(TypeError):
        as_annotation_config(object())
