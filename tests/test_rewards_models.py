"""Model rewards (stages.rewards.models): tiny CLIP-family folders built at test time, saved and
loaded back offline through from_pretrained, checked against a direct computation of each
documented formula; the HPSv2 conversion against open_clip's own model; bad folders refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.rewards.models import load_model_reward, open_clip_to_transformers
from stages.rewards.tiny import save_clip_parts, tiny_clip_config
from stages.support.errors import TempflowError
from tests.conftest import invoke, make_rollout

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a photo of a cat",
           "an orange square left of a purple circle"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(5, 1, 1, 3))
    return np.clip(base + rng.integers(-40, 40, size=(5, 48, 40, 3)), 0, 255).astype(np.uint8)  # not square


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / folder.name
    shutil.copytree(folder, dest)
    return dest


def direct_cosine(folder: Path, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, float]:
    """cos(E_img, E_txt) per pair and exp(logit_scale), straight from transformers' own classes."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        img = model.get_image_features(**processor(images=list(images), return_tensors="pt")).pooler_output
        txt = model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return cos.numpy().astype(np.float64), float(model.logit_scale.detach().exp())


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "hpsv2"])
def test_clip_rewards_match_their_formula_in_order_and_any_batch(name, folders, images):
    reward = load_model_reward(name, folders["clip"])
    scores = np.asarray(reward(images, PROMPTS))
    assert scores.shape == (5,) and np.isfinite(scores).all()
    texts = ["A photo depicts " + p for p in PROMPTS] if name == "clipscore" else PROMPTS  # Hessel's prefix
    cos, scale = direct_cosine(folders["clip"], images, texts)
    expected = {"pickscore": scale * cos, "clipscore": 2.5 * np.maximum(cos, 0), "hpsv2": cos}[name]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    order = [3, 0, 4, 1, 2]
    np.testing.assert_allclose(reward(images[order], [PROMPTS[i] for i in order]), scores[order], rtol=1e-5, atol=1e-6)
    one_by_one = np.concatenate([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(one_by_one, scores, rtol=1e-5, atol=1e-6)
    assert np.ptp(scores) > 1e-4  # the images and prompts are told apart


def test_clipscore_is_positive_part_times_2_5(folders, images, tmp_path):
    """With the text projection negated every cosine flips sign: between the two folders, each image
    is scored 2.5 cos by one and 0 by the other."""
    from safetensors.torch import load_file, save_file

    folder = _copy(folders["clip"], tmp_path)
    weights = load_file(folder / "model.safetensors")
    cos, _ = direct_cosine(folder, images, ["A photo depicts " + p for p in PROMPTS])
    weights["text_projection.weight"] = -weights["text_projection.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    plain = np.asarray(load_model_reward("clipscore", folders["clip"])(images, PROMPTS))
    flipped = np.asarray(load_model_reward("clipscore", folder)(images, PROMPTS))
    np.testing.assert_allclose(plain, 2.5 * np.maximum(cos, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flipped, 2.5 * np.maximum(-cos, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain + flipped, 2.5 * np.abs(cos), rtol=1e-5, atol=1e-6)
    assert ((plain > 0) != (flipped > 0)).all()


def test_aesthetic_is_the_mlp_of_the_unit_image_embedding(folders, images):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, CLIPModel

    folder = folders["aesthetic"]
    scores = np.asarray(load_model_reward("aesthetic", folder)(images, PROMPTS))
    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        emb = model.get_image_features(**AutoProcessor.from_pretrained(folder)(images=list(images), return_tensors="pt"))
    x = emb.pooler_output.numpy().astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    head = load_file(folder / "aesthetic_head.safetensors")
    for layer in (0, 2, 4, 6, 7):  # Linear layers only; the reference MLP has no activations
        x = x @ head[f"layers.{layer}.weight"].double().numpy().T + head[f"layers.{layer}.bias"].double().numpy()
    np.testing.assert_allclose(scores, x[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(load_model_reward("aesthetic", folder)(images[::-1], PROMPTS), scores[::-1], rtol=1e-5)


def test_aesthetic_head_from_a_pth_state_dict(folders, images, tmp_path):
    """The released head is a torch state dict (.pth): read with weights_only, same scores."""
    from safetensors.torch import load_file

    folder = _copy(folders["aesthetic"], tmp_path)
    head = load_file(folder / "aesthetic_head.safetensors")
    (folder / "aesthetic_head.safetensors").unlink()
    torch.save(head, folder / "sac+logos+ava1-l14-linearMSE.pth")
    np.testing.assert_allclose(load_model_reward("aesthetic", folder)(images, PROMPTS),
                               load_model_reward("aesthetic", folders["aesthetic"])(images, PROMPTS), rtol=1e-6)


class Pickled:  # an object torch.load would have to unpickle
    def __init__(self) -> None:
        self.weights = {"layers.0.weight": torch.zeros(1)}


def test_a_pickled_head_is_refused_not_unpickled(folders, tmp_path):
    folder = _copy(folders["aesthetic"], tmp_path)
    (folder / "aesthetic_head.safetensors").unlink()
    torch.save(Pickled(), folder / "head.pth")
    with pytest.raises(TempflowError, match="head.pth is not a readable weight file"):
        load_model_reward("aesthetic", folder)


def _break(folder: Path, how: str) -> None:
    if how == "not clip":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif how == "no processor":
        (folder / "preprocessor_config.json").unlink()
    elif how == "few tokens":
        vocab = {"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}
        (folder / "tokenizer.json").unlink()
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
    elif how == "no config":
        (folder / "config.json").unlink()
    elif how == "null text config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "text_config": None}))
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        weights["visual_projection.weight"][0, 0] = float("nan")
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("how, needle", [
    ("not clip", "holds a gpt2 model, not the CLIP model"),
    ("no processor", "has no image processor (preprocessor_config.json or processor_config.json)"),
    ("few tokens", "tokenizer of 4 tokens"),
    ("no config", "has no readable config.json"),
    ("null text config", "text_config is not an object"),
    ("nan", "NaN or infinite image embeddings"),
])
def test_bad_folders_are_refused_in_one_line_naming_the_folder(how, needle, folders, images, tmp_path):
    folder = _copy(folders["clip"], tmp_path)
    _break(folder, how)
    with pytest.raises(TempflowError) as err:
        load_model_reward("pickscore", folder)(images, PROMPTS)
    message = str(err.value)
    assert needle in message and str(folder) in message and "\n" not in message


@pytest.mark.parametrize("change, needle", [
    (lambda w: w.update({"layers.2.weight": w["layers.2.weight"][:, :3]}), "is not a stack of Linear layers"),
    (lambda w: w.update({"layers.0.weight": w["layers.0.weight"][0]}), "has 1 dimensions, not 2"),
    (lambda w: w.pop("layers.7.bias"), "has no layers.7.bias"),
])
def test_a_broken_aesthetic_head_is_refused_in_one_line(change, needle, folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(folders["aesthetic"], tmp_path)
    head = load_file(folder / "aesthetic_head.safetensors")
    change(head)
    save_file({k: v.contiguous() for k, v in head.items()}, str(folder / "aesthetic_head.safetensors"))
    with pytest.raises(TempflowError) as err:
        load_model_reward("aesthetic", folder)
    assert needle in str(err.value) and str(folder) in str(err.value) and "\n" not in str(err.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(TempflowError, match="is not a folder"):
        load_model_reward("clipscore", tmp_path / "missing")


# --- HPSv2: open_clip's layout converted, checked against open_clip's own model -------------------

OPEN_CLIP_REFERENCE = textwrap.dedent("""
    # open_clip imports torchvision for its image transforms, which are not used here: stand-ins let
    # the model code import (transformers first, which looks for a real torchvision)
    import sys, types
    import transformers.models.clip  # noqa: F401

    class _Name(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return name

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Name(name, (), {})

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
             "torchvision.ops.misc"]
    for name in names:
        sys.modules[name] = _Module(name)
    for name in names[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])

    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vocab, checkpoint, inputs, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.manual_seed(5)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, mlp_ratio=2.0,
                                                         patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=vocab, width=32, heads=2, layers=2, mlp_ratio=2.0))
    with torch.no_grad():  # away from the initial values, so that every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    torch.save({"epoch": 1, "name": "tiny", "state_dict": model.state_dict()}, checkpoint)  # HPSv2's checkpoint layout
    given = torch.load(inputs)
    with torch.no_grad():
        image = model.encode_image(given["pixels"], normalize=True)
        text = model.encode_text(given["ids"], normalize=True)
    torch.save({"hps": (image @ text.T).diagonal()}, out)  # HPSv2's score: the diagonal of image @ text.T
""")


def _open_clip_available() -> bool:
    """Installed (the README's test set-up: pip install --no-deps open_clip_torch ftfy wcwidth); it
    does not import here without torchvision, which the reference script stands in for."""
    import importlib.util

    return importlib.util.find_spec("open_clip") is not None and importlib.util.find_spec("ftfy") is not None


@pytest.mark.skipif(not _open_clip_available() and not os.environ.get("CI"),
                    reason="open_clip_torch not installed (the README's test set-up installs it with --no-deps)")
def test_hpsv2_checkpoint_converts_to_the_same_scores_as_open_clip(images, tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    folder = tmp_path / "hpsv2"
    folder.mkdir()
    vocab = save_clip_parts(folder)
    tiny_clip_config(vocab).save_pretrained(folder)  # the config of the CLIP it was fine-tuned from; no weights
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=list(images), return_tensors="pt")["pixel_values"]
    ids = AutoTokenizer.from_pretrained(folder)(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt")["input_ids"]
    torch.save({"pixels": pixels, "ids": ids}, tmp_path / "inputs.pt")
    script = tmp_path / "reference.py"
    script.write_text(OPEN_CLIP_REFERENCE)
    run = subprocess.run([sys.executable, str(script), str(vocab), str(folder / "HPS_v2.1_compressed.pt"),
                          str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    reference = torch.load(tmp_path / "out.pt")["hps"].double().numpy()
    scores = np.asarray(load_model_reward("hpsv2", folder)(images, PROMPTS))
    np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-5)
    assert np.ptp(reference) > 1e-3  # the images and prompts are told apart


def test_open_clip_names_not_in_a_clip_model_are_refused():
    with pytest.raises(TempflowError, match="'visual.attnpool.q_proj.weight' has no place"):
        open_clip_to_transformers({"visual.attnpool.q_proj.weight": torch.zeros(2, 2)})


def test_two_hps_checkpoints_are_refused(folders, tmp_path):
    folder = _copy(folders["clip"], tmp_path)
    for name in ("a.pt", "b.pt"):
        torch.save({}, folder / name)
    with pytest.raises(TempflowError, match="holds 2 .pt checkpoints"):
        load_model_reward("hpsv2", folder)


# --- through tempflow score ---------------------------------------------------------------------

def test_score_with_model_rewards_records_their_folders(policy_dir, folders, tmp_path):
    import pyarrow.parquet as pq

    rollout = make_rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    r = invoke("score", "--rollout", rollout, "--reward", "pickscore:0.5", "--reward", "aesthetic",
               "--reward-model", f"pickscore={folders['clip']}", "--reward-model", f"aesthetic={folders['aesthetic']}",
               "--batch-size", "3", "--out", out)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    assert meta["rewards"] == [{"name": "pickscore", "weight": 0.5, "source": str(folders["clip"])},
                               {"name": "aesthetic", "weight": 1.0, "source": str(folders["aesthetic"])}]
    cols = {c: table.column(c).to_numpy() for c in table.column_names}
    np.testing.assert_allclose(cols["reward"], 0.5 * cols["reward_pickscore"] + cols["reward_aesthetic"])
    again = tmp_path / "s2.parquet"
    assert invoke("score", "--rollout", rollout, "--reward", "pickscore", "--reward-model", f"pickscore={folders['clip']}",
                  "--batch-size", "64", "--out", again).exit_code == 0
    np.testing.assert_allclose(pq.read_table(again).column("reward_pickscore").to_numpy(), cols["reward_pickscore"],
                               rtol=1e-5)  # batch size 3 or 64: the same scores


def _processor_layouts(clip: Path, tmp_path: Path) -> dict[str, tuple[Path, Path | None]]:
    """The same CLIP model in the layouts users have: one folder with ``preprocessor_config.json``
    (older releases); one with ``processor_config.json``, as today's ``CLIPProcessor.save_pretrained``
    writes it; and PickScore's, weights alone with the tokenizer and processor in a second folder."""
    from transformers import AutoTokenizer, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(clip),
                              tokenizer=AutoTokenizer.from_pretrained(clip))
    today = tmp_path / "today"
    shutil.copytree(clip, today)
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (today / name).unlink()
    processor.save_pretrained(today)
    weights_only, processor_folder = tmp_path / "weights-only", tmp_path / "clip-vit-h"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip / name, weights_only / name)
    processor.save_pretrained(processor_folder)
    return {"older": (clip, None), "today": (today, None), "two folders": (weights_only, processor_folder)}


def test_every_processor_layout_scores_the_same(folders, images, tmp_path):
    layouts = _processor_layouts(folders["clip"], tmp_path)
    assert (layouts["today"][0] / "processor_config.json").is_file()
    assert not (layouts["today"][0] / "preprocessor_config.json").exists()
    scores = {name: load_model_reward("pickscore", folder, processor=processor)(images, PROMPTS)
              for name, (folder, processor) in layouts.items()}
    assert np.array_equal(scores["older"], scores["today"]) and np.array_equal(scores["older"], scores["two folders"])
    with pytest.raises(TempflowError, match="has no image processor .*--reward-processor pickscore=DIR"):
        load_model_reward("pickscore", layouts["two folders"][0])


def test_score_takes_a_processor_folder_and_records_it(policy_dir, folders, tmp_path):
    import pyarrow.parquet as pq

    (weights, processor) = _processor_layouts(folders["clip"], tmp_path)["two folders"]
    rollout = make_rollout(policy_dir, tmp_path / "r")
    two = invoke("score", "--rollout", rollout, "--reward", "pickscore", "--reward-model", f"pickscore={weights}",
                 "--reward-processor", f"pickscore={processor}", "--out", tmp_path / "two.parquet")
    assert two.exit_code == 0, two.output
    one = invoke("score", "--rollout", rollout, "--reward", "pickscore", "--reward-model", f"pickscore={folders['clip']}",
                 "--out", tmp_path / "one.parquet")
    assert one.exit_code == 0
    table = pq.read_table(tmp_path / "two.parquet")
    assert json.loads(table.schema.metadata[b"tempflow"])["rewards"] == [
        {"name": "pickscore", "weight": 1.0, "source": str(weights), "processor": str(processor)}]
    assert np.array_equal(table.column("reward").to_numpy(), pq.read_table(tmp_path / "one.parquet").column("reward").to_numpy())
    stray = invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--reward-processor",
                   f"pickscore={processor}", "--out", tmp_path / "x.parquet")
    assert stray.exit_code == 2 and "goes with a model reward's --reward-model pickscore=DIR" in stray.stderr
