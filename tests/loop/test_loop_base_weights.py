"""A home's trainer weights: derived from the base GGUF once, when the home is set up, and reported by the one
cycle that had to derive them itself (a home nobody set up), so its seconds are never mistaken for training."""

from __future__ import annotations

import pytest

from loop.bootstrap import hf_base_ready
from loop.config import load_config
from loop.core.bootstrap import ensure_base_version
from loop.cycle_pipeline import CycleContext
from loop.cycle_stages_build import _current_hf_dir

pytestmark = pytest.mark.slow  # one real conversion of the bundled GGUF (about 35 s on 2 cores)


def test_the_cycle_that_derives_the_trainer_weights_reports_it_and_the_next_one_derives_nothing():
    config = load_config()
    ensure_base_version(config)
    ctx = CycleContext.create(config, progress=False)
    assert not hf_base_ready(config)

    path, derived_s = _current_hf_dir(ctx)
    assert derived_s is not None and derived_s > 0
    assert hf_base_ready(config)
    assert _current_hf_dir(ctx) == (path, None)


def test_configured_trainer_weights_are_ready_without_deriving_anything(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOP_MODEL__HF_BASE", str(tmp_path))
    assert hf_base_ready(load_config())
