"""The built-in rewards (stages.rewards.builtin): the registered shapes rewards score a batch
cheaply, by name and through call_reward."""

from __future__ import annotations

import time

import numpy as np

from stages.rewards import REWARDS, call_reward, parse_reward_spec, resolve_reward
from stages.worlds import shapes


def test_registered_rewards_score_a_batch():
    rng = np.random.default_rng(3)
    scenes = [shapes.sample_scene(rng) for _ in range(64)]
    images = shapes.render_batch(scenes, rng)
    prompts = [s.prompt for s in scenes]
    images[::2] = 0  # every other image blank: score 0
    began = time.perf_counter()
    reward = REWARDS["shapes"](images, prompts)
    assert time.perf_counter() - began < 1.0  # a batch of 64 at 32x32 must be cheap next to sampling
    assert reward.tolist() == [0.0, 1.0] * 32
    assert REWARDS["shapes_strict"](images, prompts).tolist() == [0.0, 1.0] * 32
    spec = parse_reward_spec("shapes_strict:2")
    values = call_reward(spec, resolve_reward(spec), images, prompts, [f"k{i}" for i in range(64)])
    assert values.tolist() == [0.0, 1.0] * 32
