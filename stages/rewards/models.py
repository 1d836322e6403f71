"""Model rewards: CLIP-family scorers loaded once per stage from a local folder.

Every folder is a transformers CLIP folder (``config.json`` of ``model_type`` clip, the weights, the
tokenizer files and the image processor's config), as ``CLIPProcessor`` and ``CLIPModel.save_pretrained``
and the hubs' releases lay it out, or with the tokenizer and processor in a second folder (PickScore's
release); plus, for two kinds, one more file:

- ``hpsv2``: the released open_clip checkpoint (``HPS_v2.1_compressed.pt``) beside the config,
  tokenizer and processor of the CLIP ViT-H/14 it was fine-tuned from
  (laion/CLIP-ViT-H-14-laion2B-s32B-b79K); its weights are converted to the transformers layout on
  load (:func:`open_clip_to_transformers`), so neither open_clip nor torchvision is needed. A folder
  already in the transformers layout (no ``.pt``) loads as it is.
- ``aesthetic``: the predictor's MLP head (``sac+logos+ava1-l14-linearMSE.pth`` or
  ``aesthetic_head.safetensors``) beside CLIP ViT-L/14 (openai/clip-vit-large-patch14).

Weights load from safetensors, or with ``torch.load(weights_only=True)``: nothing is unpickled.
Images are resized and cropped by the folder's own image processor; prompts are cut at the text
encoder's context (77 tokens for the released models).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.policies.base import resolve_device, resolve_dtype
from stages.support.errors import TempflowError

# transformers and safetensors are imported where a model is loaded, for start-up time.

CONTEXT = 77
"""Tokens a CLIP text encoder reads (prompts are truncated there)."""
HEAD_FILES = ("aesthetic_head.safetensors", "sac+logos+ava1-l14-linearMSE.pth")
"""Names the aesthetic predictor's head may have; otherwise the folder's one ``*.pth`` file."""
HEAD_LAYERS = (0, 2, 4, 6, 7)
"""The predictor's ``nn.Sequential`` indices that hold Linear layers (the others are Dropout)."""


class ClipModel:
    """A CLIP model, its tokenizer and its image processor, for scoring: all three from ``folder``, or
    the tokenizer and image processor from ``processor`` (PickScore's release uses those of the CLIP
    ViT-H/14 it was fine-tuned from). They load through transformers' own loaders, which read the
    processor as either file name releases use (``preprocessor_config.json``, or ``processor_config.json``
    as today's ``CLIPProcessor.save_pretrained`` writes it)."""

    def __init__(self, reward: str, folder: Path, device: str, dtype: str, processor: Path | None = None) -> None:
        import transformers.utils.logging
        from transformers import CLIPModel

        transformers.utils.logging.disable_progress_bar()  # progress is the CLI's job (and its log lines, but with --debug)
        self.reward, self.folder = reward, folder
        config = self._read_config()
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        source = Path(processor) if processor else folder
        self.processor, self.tokenizer = self._load_processor(source)
        vocab = config["text_config"].get("vocab_size", 49408)
        if not vocab // 2 <= len(self.tokenizer) <= vocab:
            raise self.error(f"has a tokenizer of {len(self.tokenizer)} tokens for a text encoder of {vocab}; "
                             f"its tokenizer files are not {folder}'s model's", source)
        self.model = self._load_model(CLIPModel, config)
        positions = config["text_config"].get("max_position_embeddings", CONTEXT)
        self.context = min(CONTEXT, positions)

    def error(self, what: str, folder: Path | None = None) -> TempflowError:
        return TempflowError(f"reward {self.reward}: {folder or self.folder} {what}")

    def _load_processor(self, source: Path) -> tuple[Any, Any]:
        """The image processor and the tokenizer of ``source``."""
        from transformers import AutoTokenizer
        from transformers.models.clip import CLIPImageProcessorPil

        hint = "" if source != self.folder else (
            f"; a release without them takes another folder's: --reward-processor {self.reward}=DIR")
        if not source.is_dir():
            raise self.error("is not a folder", source)
        try:
            processor = CLIPImageProcessorPil.from_pretrained(source, local_files_only=True)
        except OSError:
            raise self.error(f"has no image processor (preprocessor_config.json or processor_config.json){hint}",
                             source) from None
        except Exception as err:  # transformers' many ways to fail on a damaged folder: one line
            raise self.error(f"has no usable image processor ({type(err).__name__}: {err})", source) from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as err:
            raise self.error(f"has no usable tokenizer ({type(err).__name__}: {str(err).splitlines()[0]}){hint}",
                             source) from err
        return processor, tokenizer

    def _read_config(self) -> dict[str, Any]:
        if not self.folder.is_dir():
            raise self.error("is not a folder")
        path = self.folder / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise self.error(f"has no readable config.json ({err}); is it a transformers model folder?") from None
        if not isinstance(config, dict) or config.get("model_type") != "clip":
            kind = config.get("model_type") if isinstance(config, dict) else None
            raise self.error(f"holds a {kind or 'non-CLIP'} model, not the CLIP model {self.reward} scores with")
        if not isinstance(config.setdefault("text_config", {}), dict):
            raise self.error("has a config.json whose text_config is not an object; is it a CLIP model's?")
        return config

    def _load_model(self, cls: Any, config: dict[str, Any]) -> Any:
        checkpoint = self.open_clip_checkpoint()
        try:
            if checkpoint is None:
                model = cls.from_pretrained(self.folder, dtype=self.dtype)
            else:
                model = cls(cls.config_class.from_pretrained(self.folder))
                model.load_state_dict(open_clip_to_transformers(_load_weights(checkpoint, self.reward)), strict=True)
                model = model.to(self.dtype)
        except TempflowError:
            raise
        except Exception as err:
            raise self.error(f"does not load as a CLIP model ({type(err).__name__}: {str(err).splitlines()[0]})") from err
        return model.to(self.device).eval()

    def open_clip_checkpoint(self) -> Path | None:
        """The open_clip checkpoint whose weights replace the folder's (hpsv2 only)."""
        if self.reward != "hpsv2":
            return None
        found = sorted(self.folder.glob("*.pt"))
        if len(found) > 1:
            raise self.error(f"holds {len(found)} .pt checkpoints; keep only the HPSv2 one")
        return found[0] if found else None

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """Unit-norm projected image embeddings ``(N, D)`` in float32."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return self._unit(out.pooler_output, "image")

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``(N, D)`` in float32."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.context, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return self._unit(out.pooler_output, "text")

    def _unit(self, embeds: torch.Tensor, what: str) -> torch.Tensor:
        embeds = embeds.float()
        bad = ~torch.isfinite(embeds).all(dim=-1)
        if bad.any():
            raise self.error(f"gave NaN or infinite {what} embeddings for {int(bad.sum())} of {len(embeds)} inputs; "
                             f"its weights are broken{' or overflow in ' + str(self.dtype) if self.dtype != torch.float32 else ''}")
        return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def cosine(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """``cos(E_img(x_i), E_txt(c_i))`` per image and its own prompt."""
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(dim=-1)


class PickScore:
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(E_img(x), E_txt(c))``, the logit of
    its preference model, with the released model's exp(logit_scale) = 100, so typical images score
    about 18 to 23. Flow-GRPO trains on this divided by 26; give ``--reward pickscore:0.0385`` for
    that scale."""

    def __init__(self, folder: Path, device: str, dtype: str, processor: Path | None = None) -> None:
        self.clip = ClipModel("pickscore", folder, device, dtype, processor)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        scale = self.clip.model.logit_scale.detach().float().exp()
        return (scale * self.clip.cosine(images, prompts)).cpu().numpy().astype(np.float64)


class ClipScore:
    """CLIPScore (Hessel et al. 2021): ``2.5 * max(cos(E_img(x), E_txt("A photo depicts " + c)), 0)``,
    in [0, 2.5], with the prefix its reference implementation puts before every caption; the paper's
    model is CLIP ViT-B/32, any CLIP folder works."""

    PREFIX = "A photo depicts "

    def __init__(self, folder: Path, device: str, dtype: str, processor: Path | None = None) -> None:
        self.clip = ClipModel("clipscore", folder, device, dtype, processor)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        cos = self.clip.cosine(images, [self.PREFIX + p for p in prompts])
        return (2.5 * cos.clamp_min(0)).cpu().numpy().astype(np.float64)


class HPSv2:
    """HPSv2 (Wu et al. 2023): ``cos(E_img(x), E_txt(c))`` of the fine-tuned open_clip ViT-H/14, the
    diagonal of its reference scorer's ``image_features @ text_features.T``; typical images score
    about 0.2 to 0.3."""

    def __init__(self, folder: Path, device: str, dtype: str, processor: Path | None = None) -> None:
        self.clip = ClipModel("hpsv2", folder, device, dtype, processor)

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        return self.clip.cosine(images, prompts).cpu().numpy().astype(np.float64)


class Aesthetic:
    """LAION aesthetic predictor v2 (improved-aesthetic-predictor): ``MLP(E_img(x) / |E_img(x)|)``, a
    stack of five Linear layers without activations over CLIP ViT-L/14's projected image embedding,
    trained to predict mean human ratings on a 1-to-10 scale. The prompt is not used."""

    def __init__(self, folder: Path, device: str, dtype: str, processor: Path | None = None) -> None:
        self.clip = ClipModel("aesthetic", folder, device, dtype, processor)
        self.head = self._load_head()

    def _load_head(self) -> torch.nn.Sequential:
        folder = self.clip.folder
        named = [folder / name for name in HEAD_FILES if (folder / name).is_file()]
        found = named or sorted(folder.glob("*.pth"))
        if len(found) != 1:
            raise self.clip.error(f"needs exactly one aesthetic head file ({' or '.join(HEAD_FILES)}, or one *.pth); "
                                  f"found {len(found)}")
        weights = _load_weights(found[0], "aesthetic")
        try:
            head = _mlp_head(weights)
        except KeyError as err:
            raise self.clip.error(f"head {found[0].name} has no {err.args[0]}: not the predictor's MLP") from None
        except (RuntimeError, IndexError, ValueError) as err:
            raise self.clip.error(f"head {found[0].name} is not a stack of Linear layers ({err})") from None
        dims = (head[0].in_features, head[-1].out_features)
        width = self.clip.model.config.projection_dim
        if dims != (width, 1):
            raise self.clip.error(f"head {found[0].name} maps {dims[0]} to {dims[1]} values; the CLIP model "
                                  f"embeds in {width} and the head must give 1")
        return head.to(self.clip.device).float().eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        score = self.head(self.clip.image_embeds(images)).squeeze(-1)
        if not torch.isfinite(score).all():
            raise self.clip.error("head gave NaN or infinite scores; its weights are broken")
        return score.cpu().numpy().astype(np.float64)


MODELS = {"pickscore": PickScore, "clipscore": ClipScore, "hpsv2": HPSv2, "aesthetic": Aesthetic}


def load_model_reward(name: str, folder: Path, device: str = "cpu", dtype: str = "fp32",
                      processor: Path | None = None) -> Any:
    """The scorer of model reward ``name`` with its model loaded from ``folder`` (and its tokenizer and
    image processor from ``processor``, when given)."""
    return MODELS[name](Path(folder), device, dtype, processor)


def _mlp_head(weights: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """The aesthetic predictor's Linear layers (:data:`HEAD_LAYERS` of its ``layers`` Sequential) as
    one Sequential, shapes taken from the weights."""
    layers = []
    for i in HEAD_LAYERS:
        weight, bias = weights[f"layers.{i}.weight"], weights[f"layers.{i}.bias"]
        if weight.dim() != 2:
            raise ValueError(f"layers.{i}.weight has {weight.dim()} dimensions, not 2")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        layers.append(linear)
    for a, b in zip(layers, layers[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"a layer of {a.out_features} outputs feeds one of {b.in_features} inputs")
    return torch.nn.Sequential(*layers)


def mlp_head_weights(dims: list[int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random weights of an aesthetic head mapping ``dims[0]`` through ``dims[1:]``, in the released
    file's names (for toy and full-size test folders)."""
    weights = {}
    for i, (n_in, n_out) in zip(HEAD_LAYERS, zip(dims, dims[1:])):
        weights[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=generator) / n_in ** 0.5
        weights[f"layers.{i}.bias"] = torch.zeros(n_out)
    return weights


def _load_weights(path: Path, reward: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from safetensors, or from a torch checkpoint without unpickling
    (``weights_only``); a checkpoint's ``state_dict`` entry and DDP's ``module.`` prefixes unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights: Any = load_file(path)
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TempflowError(f"reward {reward}: {path} is not a readable weight file ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise TempflowError(f"reward {reward}: {path} holds no name -> tensor weights")
    return {k.removeprefix("module."): v for k, v in weights.items()}


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOWER = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
          "visual.class_embedding": "vision_model.embeddings.class_embedding",
          "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
          "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
          "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
          "positional_embedding": "text_model.embeddings.position_embedding.weight",
          "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}


def open_clip_to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT towers, as HPSv2 releases) in transformers' ``CLIPModel``
    names: each block's fused ``in_proj`` split into q, k, v; the projections ``x @ P`` transposed
    to Linear weights; everything else renamed. Unknown names are refused, not dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        if name in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if name == "visual.proj" else "text_projection.weight"] = value.t().contiguous()
            continue
        prefix, _, rest = name.partition("transformer.resblocks.")
        if rest and prefix in ("", "visual."):
            layer, _, part = rest.partition(".")
            tower = "vision_model" if prefix else "text_model"
            base = f"{tower}.encoder.layers.{layer}."
            if part.startswith("attn.in_proj_"):
                kind = part.removeprefix("attn.in_proj_")
                for proj, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{proj}_proj.{kind}"] = chunk.contiguous()
                continue
            module, _, param = part.rpartition(".")
            if module in _BLOCK:
                out[f"{base}{_BLOCK[module]}.{param}"] = value
                continue
        module, _, param = name.rpartition(".")
        if name in _TOWER:
            out[_TOWER[name]] = value
        elif module in _TOWER:
            out[f"{_TOWER[module]}.{param}"] = value
        else:
            raise TempflowError(f"open_clip weight {name!r} has no place in a transformers CLIP model "
                                "(only ViT image and text towers convert)")
    return out
