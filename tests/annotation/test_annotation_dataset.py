"""The chat-feedback dataset on the real local Argilla: idempotent creation, schema version, migrations."""

from __future__ import annotations

import uuid

import argilla as rg
import pytest

from annotation.client import connect
from annotation.config import AnnotationConfig
from annotation.schema import (
    CURRENT,
    GUIDELINES,
    ISSUE_LABELS,
    SCHEMA_VERSION,
    Migration,
    Schema,
    SchemaMismatchError,
    build_settings,
    describe,
    ensure_dataset,
    find_dataset,
    read_version,
)
from loop.core.reasons import ALL_REASONS


@pytest.fixture
def owner(argilla_stack):
    return connect(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)


@pytest.fixture
def cfg():
    return AnnotationConfig(dataset=f"cf-{uuid.uuid4().hex[:10]}", min_submitted=2)


def _v2_build(cfg, client, version):
    """A hypothetical next schema: v1 plus a `user_language` metadata property."""
    settings = build_settings(cfg, client, version)
    settings.metadata.add(rg.TermsMetadataProperty(name="user_language", client=client))
    return settings


def _add_user_language(dataset, cfg, client):
    dataset.settings.metadata.add(rg.TermsMetadataProperty(name="user_language", client=client))
    dataset.update()


def test_create_is_idempotent_and_records_the_schema(owner, cfg):
    first = ensure_dataset(owner, cfg)
    second = ensure_dataset(owner, cfg)
    assert first.id == second.id
    names = [d.name for d in owner.workspaces(cfg.workspace).datasets]
    assert names.count(cfg.dataset) == 1
    ds = find_dataset(owner, cfg)
    assert read_version(ds.settings.guidelines) == SCHEMA_VERSION
    assert GUIDELINES.splitlines()[0] in ds.settings.guidelines
    assert ds.settings.distribution.min_submitted == 2
    assert describe(ds.settings) == describe(build_settings(cfg, owner))
    spec = describe(ds.settings)
    assert spec["fields"] == {"conversation": {"kind": "ChatField", "required": True},
                              "answer": {"kind": "TextField", "required": True},
                              "user_feedback": {"kind": "TextField", "required": False}}
    assert spec["questions"]["quality"] == {"kind": "RatingQuestion", "required": True, "values": [1, 2, 3, 4, 5]}
    assert spec["questions"]["corrected_response"] == {"kind": "TextQuestion", "required": False}
    assert spec["questions"]["issues"]["labels"] == sorted(ALL_REASONS) == sorted(ISSUE_LABELS)
    assert {"model_version", "thumbs", "reasons", "logprob_mean", "logprob_min", "latency_s", "created_at",
            "priority", "tier", "schema_version"} == set(spec["metadata"])


def test_min_submitted_follows_the_config(owner, cfg):
    ensure_dataset(owner, cfg)
    cfg.min_submitted = 3
    assert ensure_dataset(owner, cfg).settings.distribution.min_submitted == 3


def test_a_changed_schema_without_a_new_version_is_an_error(owner, cfg):
    ensure_dataset(owner, cfg, schema=Schema(SCHEMA_VERSION, _v2_build, {}))  # same version, other structure
    with pytest.raises(SchemaMismatchError, match="user_language.*unexpected.*Bump"):
        ensure_dataset(owner, cfg)


def test_an_older_schema_is_migrated_in_place_keeping_records(owner, cfg):
    old = ensure_dataset(owner, cfg)
    old.records.log([rg.Record(id="keep-me", fields={"conversation": [{"role": "user", "content": "hi"}],
                                                       "answer": "hello"})])
    v2 = Schema(SCHEMA_VERSION + 1, _v2_build, {SCHEMA_VERSION: Migration(SCHEMA_VERSION, "in_place", "add user_language",
                                                                          _add_user_language)})
    migrated = ensure_dataset(owner, cfg, schema=v2)
    assert migrated.id == old.id
    assert read_version(migrated.settings.guidelines) == SCHEMA_VERSION + 1
    assert "user_language" in describe(migrated.settings)["metadata"]
    assert [r.id for r in migrated.records] == ["keep-me"]
    # and this code (v1) now refuses the newer dataset instead of writing records it would mangle
    with pytest.raises(SchemaMismatchError, match="newer"):
        ensure_dataset(owner, cfg)


def test_a_breaking_change_moves_to_a_new_dataset(owner, cfg):
    old = ensure_dataset(owner, cfg)
    v2 = Schema(SCHEMA_VERSION + 1, _v2_build, {SCHEMA_VERSION: Migration(SCHEMA_VERSION, "new_dataset", "new field")})
    assert v2.dataset_name(cfg.dataset) == f"{cfg.dataset}-v{SCHEMA_VERSION + 1}"
    assert v2.lineage(cfg.dataset) == [f"{cfg.dataset}-v{SCHEMA_VERSION + 1}", cfg.dataset]
    new = ensure_dataset(owner, cfg, schema=v2)
    assert new.id != old.id and new.name == f"{cfg.dataset}-v{SCHEMA_VERSION + 1}"
    assert read_version(find_dataset(owner, cfg, cfg.dataset).settings.guidelines) == SCHEMA_VERSION  # old kept as is
    assert CURRENT.lineage(cfg.dataset) == [cfg.dataset]


def test_a_foreign_dataset_with_the_same_name_is_not_touched(owner, cfg):
    foreign = rg.Dataset(name=cfg.dataset, workspace=cfg.workspace, client=owner, settings=rg.Settings(
        fields=[rg.TextField(name="text", client=owner)], questions=[rg.TextQuestion(name="note", client=owner)]))
    foreign.create()
    with pytest.raises(SchemaMismatchError, match="no schema marker"):
        ensure_dataset(owner, cfg)
