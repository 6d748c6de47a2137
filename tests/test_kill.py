"""Kill -9 anywhere: a real ``capcli pretrain`` SIGKILLed in its pixel cache's first fill, at a random
moment and in a checkpoint write, and a real ``capcli align`` in its feature cache, resumed each
time, end with the uninterrupted run's weights bit for bit and every step logged once. (Every
stage of a checkpoint write is killed in-process by test_engine.)

The harness is ``scripts/kill_harness.py``; its long form (many random kills) gives the figures of
docs/reliability.md. Each process takes seconds, so these are ``slow``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("kill_harness", Path(__file__).parents[1] / "scripts" / "kill_harness.py")
harness = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(harness)


@pytest.fixture(scope="module")
def whole_pretrain(tmp_path_factory, data_cache) -> Path:
    """The uninterrupted pretrain run: the reference of the pretrain test, the start of the align one."""
    whole = tmp_path_factory.mktemp("kill") / "whole"
    assert harness.launch(harness.command("pretrain", whole, None), harness.run_env(data_cache), None, None, 600) == 0
    return whole


@pytest.mark.slow(seconds=45)
def test_pretrain_killed_in_its_cache_fill_start_up_and_a_checkpoint_write_resumes_bit_for_bit(tmp_path, whole_pretrain):
    killed = tmp_path / "killed"
    # The killed run fills a pixel cache of its own, so that a kill can come in its first fill.
    env = harness.run_env(tmp_path / "cache")
    # 5 s is a moment in the start-up or the first epoch of the resumed process; the last kill comes
    # in a checkpoint write, before the run is done. The other stages of a checkpoint write (start,
    # state, weights, after) are killed in-process, at a fraction of the cost, by test_engine's
    # test_a_checkpoint_write_killed_at_any_stage_leaves_one_that_resumes.
    plan = ["pixel_cache.put@3", 5.0, "checkpoint.between@2"]
    injected, kills = harness.run_to_completion(harness.command("pretrain", killed, None), killed, env, plan)
    assert kills == len(plan), injected
    assert harness.compare(whole_pretrain, killed) == {}


@pytest.mark.slow(seconds=45)
def test_align_killed_in_its_cache_build_resumes_bit_for_bit(tmp_path, whole_pretrain,
                                                                                   data_cache):
    # One pair per image: 12 steps, as the pretrain's, instead of the tiny preset's five pairs' 60.
    env = {**harness.run_env(data_cache), "CAPCLI_ALIGN__PAIRS_PER_IMAGE": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert harness.launch(harness.command("align", whole, whole_pretrain), env, None, None, 600) == 0
    # Align's own stage: its frozen-feature cache. A checkpoint write is the engine's, the same as
    # pretrain's: killed in a real process above and at every stage in-process by test_engine.
    plan = ["caches.features@1"]
    injected, kills = harness.run_to_completion(harness.command("align", killed, whole_pretrain), killed, env, plan)
    assert kills == len(plan), injected
    assert harness.compare(whole, killed) == {}
