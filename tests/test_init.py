"""`tempflow init` and `tempflow make-tiny` (stages.init): a preset's vocabulary from a prompts file,
LoRA and preset options refused on the wrong side of --from, and toy reward folders that score."""

from __future__ import annotations

import json

from tests.conftest import _error, invoke, make_rollout


def test_lora_options_without_from_and_preset_options_with_it_are_refused(pipelines, tmp_path):
    result = invoke("init", "--out", tmp_path / "p", "--lora-rank", "8")
    assert result.exit_code == 1 and "init: --lora-rank must be left out without --from" in result.stderr
    result = invoke("init", "--from", pipelines["sd3"], "--out", tmp_path / "p", "--image-size", "64")
    assert result.exit_code == 1 and "init: --image-size must be left out with --from" in result.stderr
    assert "--lora-targets attn.nope" in _error("init", "--from", pipelines["sd3"], "--out", tmp_path / "p",
                                                "--lora-targets", "attn.nope")


def test_make_tiny_writes_reward_folders_that_score(policy_dir, tmp_path):
    for kind, reward in (("clip", "hpsv2"), ("aesthetic", "aesthetic")):
        r = invoke("make-tiny", kind, "--out", tmp_path / kind)
        assert r.exit_code == 0, r.output
        rollout = make_rollout(policy_dir, tmp_path / f"r-{kind}")
        r = invoke("score", "--rollout", rollout, "--reward", reward, "--reward-model", f"{reward}={tmp_path / kind}",
                   "--out", tmp_path / f"{kind}.parquet")
        assert r.exit_code == 0, r.output


def test_init_vocab_from_prompts(tmp_path):
    """--vocab-from adds a prompts file's words to the tokenizer; the preset builds and reports."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a zebra on a skateboard\n")
    r = invoke("init", "--out", tmp_path / "pol", "--image-size", 16, "--vocab-from", prompts)
    assert r.exit_code == 0, r.output
    assert "trainable parameters" in r.stdout
    config = json.loads((tmp_path / "pol" / "config.json").read_text())
    assert "zebra" in config["model"]["vocab"] and "skateboard" in config["model"]["vocab"]
    assert config["model"]["image_size"] == 16
