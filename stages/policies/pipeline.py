"""What the real policy kinds (sd3, flux) share: a user's diffusers folder, referred to, never copied.

A real policy folder holds ``config.json`` and only what training changes — the LoRA adapter
(``pytorch_lora_weights.safetensors``) or, with full fine-tuning once trained, ``transformer/`` —
plus the optimizer state. ``config.json`` names the base folder by absolute path and records a
fingerprint of its files (sizes, and sha256 of small files whole and of sampled blocks of large
ones): a base folder that moved or changed is refused, naming the file, without rereading gigabytes.

Components load when first needed: the transformer always; text encoders on the first ``encode``
(a rollout; the update reads the embeddings the rollout stored); the VAE on the first ``decode``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from stages.artifacts.codecs import read_json
from stages.policies.base import Cond, Policy, hide_library_progress, policy_class, resolve_dtype, save_module, tensors_digest
from stages.policies.lora import (
    DEFAULT_TARGETS,
    LoraSpec,
    adapter_state,
    add_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
    spec_record,
)
from stages.support.errors import TempflowError

# diffusers and transformers are imported where they are used, for start-up time.

PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
"""The pipeline classes tempflow trains, by the ``_class_name`` in ``model_index.json``."""

_SMALL = 8 << 20  # files up to 8 MiB are hashed whole
_BLOCK = 1 << 20  # larger ones: their size, first and last MiB and 8 blocks spread between


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= _SMALL:
            digest.update(f.read())
        else:
            for offset in [0, *(size * i // 9 for i in range(1, 9)), size - _BLOCK]:
                f.seek(offset)
                digest.update(f.read(_BLOCK))
    return f"{size}:{digest.hexdigest()}"


def read_model_index(folder: Path) -> dict[str, Any]:
    """``folder/model_index.json``, checked to be a diffusers pipeline tempflow can train."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TempflowError(f"--from {folder}: no such folder (a diffusers pipeline folder, e.g. a local copy of "
                            "stabilityai/stable-diffusion-3.5-medium)")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise TempflowError(f"{folder}: no model_index.json, so not a diffusers pipeline folder (expected "
                            "model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/)")
    index = read_json(index_path, "a diffusers model_index.json")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in PIPELINES:
        raise TempflowError(f"{index_path}: pipeline class {name!r} is not supported; tempflow trains "
                            + ", ".join(f"{cls} ({kind})" for cls, kind in PIPELINES.items()))
    return index


def fingerprint(folder: Path, components: list[str]) -> dict[str, str]:
    """``relative path -> size:sha256`` for model_index.json and every file of ``components``."""
    folder = Path(folder)
    files = {"model_index.json": _file_digest(folder / "model_index.json")}
    for component in components:
        for path in sorted((folder / component).rglob("*")):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
                files[path.relative_to(folder).as_posix()] = _file_digest(path)
    return files


def check_base(base: dict[str, Any]) -> Path:
    """The base folder a policy refers to, refused when it moved or any of its files changed."""
    folder = Path(base["path"])
    if not (folder / "model_index.json").is_file():
        raise TempflowError(f"base model folder {folder} is gone (moved or deleted since `tempflow init`); "
                            "put it back or run `tempflow init --from NEW_DIR` again")
    now = fingerprint(folder, base["components"])
    for name, digest in base["files"].items():
        if name not in now:
            raise TempflowError(f"base model folder {folder} changed since `tempflow init`: {name} is missing")
        if now[name] != digest:
            raise TempflowError(f"base model folder {folder} changed since `tempflow init`: {name} differs "
                                f"(size:sha256 was {digest[:24]}..., now {now[name][:24]}...)")
    extra = sorted(set(now) - set(base["files"]))
    if extra:
        raise TempflowError(f"base model folder {folder} changed since `tempflow init`: {extra[0]} is new")
    return folder


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers 0.42 warns that ``torch_dtype`` is renamed; older releases know only that name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def loading(folder: Path, what: str) -> Iterator[None]:
    """diffusers, transformers and safetensors raise their own kinds for a damaged folder: one line."""
    try:
        yield
    except TempflowError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:
        if type(err).__name__ == "OutOfMemoryError":
            raise
        first = " ".join(str(err).split())[:300] or type(err).__name__
        raise TempflowError(f"{folder}: cannot load the {what} ({first})") from err


def check_tokenizer(tokenizer: Any, vocab: int, where: str) -> None:
    """A tokenizer whose files were missing loads with a handful of special tokens and no error
    (transformers 5); its text encoder then sees garbage. Refuse it, naming the folder."""
    size = len(tokenizer)
    if size < 32 or size < vocab // 2:
        raise TempflowError(f"{where}: the tokenizer loaded with only {size} tokens but its text encoder has a "
                            f"{vocab}-token vocabulary; the tokenizer's files are missing or damaged")


class PipelinePolicy(Policy):
    """A transformer from a diffusers pipeline folder, trained through a LoRA adapter or in full."""

    pipeline_class: ClassVar[str]
    components: ClassVar[tuple[str, ...]]
    """Folders every pipeline of the kind has."""
    optional_components: ClassVar[tuple[str, ...]] = ()
    text_components: ClassVar[tuple[tuple[str, str], ...]]
    """(tokenizer, text encoder) pairs of the pipeline."""
    default_sequence_length: ClassVar[int]

    def __init__(self, model: dict[str, Any], transformer: nn.Module, dtype: torch.dtype) -> None:
        self.model, self.transformer, self.dtype = model, transformer, dtype
        self.base = Path(model["base"]["path"])
        self.lora = LoraSpec(**model["lora"]) if model.get("lora") else None
        self.device = torch.device("cpu")
        self.owns_weights = False  # full fine-tuning: the transformer differs from the base's
        self._text: Any = None
        self._vae: nn.Module | None = None
        self.vae_config = json.loads((self.base / "vae/config.json").read_text())
        self.resolution = self.default_resolution()
        self.guidance_scale: float | None = None
        self._negative: str | None = None

    # -- making and loading ---------------------------------------------------------------------

    @classmethod
    def base_record(cls, folder: Path, index: dict[str, Any]) -> dict[str, Any]:
        """Check the folder's components and fingerprint them: the policy's ``model["base"]``."""
        folder = Path(folder).resolve()
        present = []
        for name in cls.components + cls.optional_components:
            entry = index.get(name)
            if entry is None or entry == [None, None]:
                if name in cls.components:
                    raise TempflowError(f"{folder}/model_index.json: the {cls.pipeline_class} has no {name}, "
                                        "which tempflow needs")
                continue
            if not (folder / name).is_dir():
                raise TempflowError(f"{folder}: component {name}/ is missing (model_index.json lists it)")
            if name.startswith(("transformer", "vae", "text_encoder")) and not any((folder / name).glob("*.safetensors")):
                raise TempflowError(f"{folder}/{name}: no .safetensors weights (tempflow never loads pickled .bin files)")
            present.append(name)
        return {"path": str(folder), "pipeline": cls.pipeline_class, "components": present,
                "files": fingerprint(folder, present)}

    @classmethod
    def create(cls, folder: Path, index: dict[str, Any], lora: LoraSpec | None, dtype: torch.dtype,
               max_sequence_length: int = 0) -> PipelinePolicy:
        """A fresh policy on the base ``folder``: the base itself, plus a zero-effect adapter for LoRA."""
        model = {"base": cls.base_record(folder, index), "lora": None if lora is None else spec_record(lora),
                 "max_sequence_length": max_sequence_length or cls.default_sequence_length}
        return cls._build(model, None, dtype)

    @classmethod
    def load(cls, path: Path, model_config: dict[str, Any], dtype: torch.dtype = torch.float32) -> PipelinePolicy:
        check_base(model_config["base"])
        own = (Path(path) / "transformer").is_dir()
        if model_config.get("lora") and own:
            raise TempflowError(f"{path}: a LoRA policy folder holds no transformer/; the folder is damaged")
        return cls._build(model_config, Path(path), dtype, own_transformer=own)

    @classmethod
    def _build(cls, model: dict[str, Any], path: Path | None, dtype: torch.dtype,
               own_transformer: bool = False) -> PipelinePolicy:
        hide_library_progress()
        source = path if own_transformer else Path(model["base"]["path"])
        # full fine-tuning keeps float32 master weights and computes under autocast
        weights_dtype = dtype if model.get("lora") else torch.float32
        with quiet_loading(), loading(source, "transformer"):
            transformer = cls.transformer_class().from_pretrained(
                source, subfolder="transformer", torch_dtype=weights_dtype, local_files_only=True, use_safetensors=True)
        transformer.eval()
        if model.get("lora"):
            spec = LoraSpec(**model["lora"])
            if path is None:
                add_adapter(transformer, spec)
            else:
                state, stored = read_adapter(path)
                if (stored.rank, float(stored.alpha), sorted(stored.targets)) != (spec.rank, float(spec.alpha), sorted(spec.targets)):
                    raise TempflowError(f"{path}: the adapter file's LoRA config differs from config.json's")
                load_adapter(transformer, state, spec, path)
        else:
            transformer.requires_grad_(False)
        policy = cls(model, transformer, dtype)
        policy.owns_weights = own_transformer
        return policy

    @classmethod
    def transformer_class(cls) -> type:
        raise NotImplementedError

    # -- the Policy interface -------------------------------------------------------------------

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def pixels_per_state(self) -> int:  # type: ignore[override]
        return self.vae_factor

    @property
    def sample_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_factor
        return (int(self.vae_config["latent_channels"]), side, side)

    def default_resolution(self) -> int:
        raise NotImplementedError

    @property
    def negative_prompt(self) -> str | None:
        return self._negative

    trainable_attribute = "transformer"

    def prepare_training(self) -> None:
        self.owns_weights = self.lora is None or self.owns_weights
        if self.lora is None:
            self.transformer.requires_grad_(True)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named = self.transformer.named_parameters()
        if self.lora is not None:
            return [(n, p) for n, p in named if "lora_" in n and p.requires_grad]
        return [(n, p) for n, p in named if p.requires_grad]

    def saved_tensors(self) -> dict[str, Tensor]:
        if self.lora is not None:
            return adapter_state(self.transformer)
        return dict(self.transformer.state_dict()) if self.owns_weights else {}

    def save_weights(self, path: Path) -> None:
        if self.lora is not None:
            save_adapter(self.diffusers_pipeline(), path, self.transformer, self.lora)
        elif self.owns_weights:
            save_module(self.transformer, path / "transformer")

    def identity(self) -> str:
        """sha256 of the kind, the model record (the base's fingerprint included) and what training
        changed: the adapter, or the fine-tuned transformer (none yet: the base's, fingerprinted)."""
        digest = hashlib.sha256(json.dumps({"kind": self.kind, "model": self.model}, sort_keys=True).encode())
        return tensors_digest(digest, self.saved_tensors())

    def modules(self) -> dict[str, nn.Module]:
        loaded = {"transformer": self.transformer}
        if self._vae is not None:
            loaded["vae"] = self._vae
        if self._text is not None:
            loaded.update({name: getattr(self._text, name) for _, name in self.text_components
                           if getattr(self._text, name, None) is not None})
        return loaded

    def input_folders(self) -> tuple[Path, ...]:
        return (self.base,)

    def release_text_encoders(self) -> None:
        if self.keep_text_encoders:
            return
        self._text = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def builtin_reference(self) -> contextlib.AbstractContextManager | None:
        return self._adapter_disabled() if self.lora is not None else None

    @contextlib.contextmanager
    def _adapter_disabled(self) -> Iterator[None]:
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def compute(self) -> contextlib.AbstractContextManager:
        """Autocast for full fine-tuning below fp32 (float32 master weights); LoRA runs in its dtype."""
        enabled = self.lora is None and self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        pipe = self.text_pipeline()
        out = self._encode(pipe, list(prompts))
        return {name: t.float().cpu() for name, t in out.items()}

    @torch.no_grad()
    def decode(self, x: Tensor) -> np.ndarray:
        vae = self.vae()
        config = vae.config
        latents = x.detach().to(self.device, self.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        images = vae.decode(latents, return_dict=False)[0].float()
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def to(self, device: str | torch.device) -> PipelinePolicy:
        self.device = torch.device(device)
        for module in self.modules().values():
            module.to(self.device)
        return self

    # -- components loaded on demand ------------------------------------------------------------

    def diffusers_pipeline(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def text_pipeline(self) -> Any:
        """The pipeline with its tokenizers and text encoders only (no transformer, no VAE)."""
        if self._text is None:
            hide_library_progress()
            with quiet_loading(), loading(self.base, "text encoders"):
                absent = {name: None for name in self.optional_components
                          if name not in self.model["base"]["components"]}
                pipe = self.diffusers_pipeline().from_pretrained(
                    self.base, transformer=None, vae=None, torch_dtype=self.dtype, local_files_only=True,
                    use_safetensors=True, **absent)
            pipe.transformer = self.transformer  # SD3 without T5 sizes its zero T5 block from the transformer's config
            for tok_name, enc_name in self.text_components:
                tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
                if tokenizer is not None and encoder is not None:
                    check_tokenizer(tokenizer, int(encoder.config.vocab_size), str(self.base / tok_name))
                    encoder.to(self.device).eval()
            self._text = pipe
        return self._text

    def vae(self) -> nn.Module:
        if self._vae is None:
            from diffusers import AutoencoderKL

            with quiet_loading(), loading(self.base, "vae"):
                self._vae = AutoencoderKL.from_pretrained(self.base, subfolder="vae", torch_dtype=self.dtype,
                                                          local_files_only=True, use_safetensors=True)
            self._vae.to(self.device).eval().requires_grad_(False)
        return self._vae

    def _encode(self, pipe: Any, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def check_resolution(self, resolution: int, multiple: int, largest: int, why: str) -> int:
        """The sampling side in pixels: ``0`` means the model's default; refused unless a positive
        multiple of what the VAE and patching need (``why`` says what), within what the model covers."""
        side = resolution or self.default_resolution()
        if side < multiple or side % multiple or side > largest:
            raise TempflowError(f"--resolution {resolution}: this {self.kind} model takes sides that are multiples of "
                                f"{multiple} pixels ({why}), from {multiple} to {largest}")
        return side


def check_tokenizers(folder: Path, index: dict[str, Any], pairs: tuple[tuple[str, str], ...]) -> None:
    """Load each tokenizer the pipeline lists (cheap; no text encoder weights) and check it against
    its encoder's config: :func:`check_tokenizer`, before any model is loaded."""
    import transformers

    for tok_name, enc_name in pairs:
        if index.get(tok_name) in (None, [None, None]) or index.get(enc_name) in (None, [None, None]):
            continue
        library, class_name = index[tok_name]
        tokenizer_class = getattr(transformers, class_name, None)
        if library != "transformers" or tokenizer_class is None:
            raise TempflowError(f"{folder}/model_index.json: {tok_name} is {library}.{class_name}, not a transformers tokenizer")
        try:
            tokenizer = tokenizer_class.from_pretrained(folder / tok_name, local_files_only=True)
        except Exception as err:  # transformers raises many kinds for a damaged tokenizer folder
            raise TempflowError(f"{folder}/{tok_name}: the tokenizer does not load ({' '.join(str(err).split())[:200]})") from None
        config = read_json(folder / enc_name / "config.json", f"the {enc_name} config")
        vocab = config.get("vocab_size") if isinstance(config, dict) else None
        if not isinstance(vocab, int):
            raise TempflowError(f"{folder}/{enc_name}/config.json: no vocab_size")
        check_tokenizer(tokenizer, vocab, str(folder / tok_name))


def init_from(folder: Path, seed: int, lora: tuple[int, float | None, str | None] | None,
              max_sequence_length: int = 0, dtype: str = "fp32") -> PipelinePolicy:
    """A fresh policy on the diffusers folder ``folder``: its kind from model_index.json, a LoRA
    adapter ``(rank, alpha or 2 * rank, targets or the kind's)`` or full fine-tuning (``lora=None``).
    The options are `tempflow init`'s, checked by its config."""
    index = read_model_index(folder)
    kind = PIPELINES[index["_class_name"]]
    cls = policy_class(kind)
    check_tokenizers(Path(folder), index, cls.text_components)
    spec = None
    if lora is not None:
        rank, alpha, targets = lora
        spec = LoraSpec(rank=rank, alpha=float(2 * rank if alpha is None else alpha),
                        targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else DEFAULT_TARGETS[kind])
    torch.manual_seed(seed)
    return cls.create(Path(folder), index, spec, resolve_dtype(dtype), max_sequence_length)
