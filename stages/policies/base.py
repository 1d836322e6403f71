"""Policies: the models that are sampled and trained, behind one small interface.

A policy encodes prompts, predicts the velocity at ``(x, sigma)``, and decodes a final state to
images. It is stored as a folder laid out like a diffusers pipeline (``transformer/`` or ``unet/``,
``text_encoder/``, ``tokenizer/``) plus tempflow's own ``config.json``, whose schema is
:mod:`stages.artifacts.policy`'s: :func:`save_policy` writes the weights and that record,
:func:`load_policy` reads both and checks that they agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from stages.artifacts.policy import POLICY_KINDS, PolicyRecord, read_policy_record, write_policy_record
from stages.flow import make_sigmas
from stages.support.errors import TempflowError

# diffusers and transformers are imported where they are used, for start-up time.

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each of :data:`stages.support.dtypes.DTYPES`."""


def hide_library_progress() -> None:
    """diffusers and transformers draw their own tqdm bars on save/load; progress is the CLI's job.
    (Their log lines are the CLI's to silence too: it does, unless --debug.)"""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

Cond = dict[str, Tensor]  # prompt conditioning, every tensor batch-first


def index_cond(cond: Cond, index: Tensor | list[int], device: torch.device | str | None = None) -> Cond:
    """Rows ``index`` of every tensor in ``cond`` (e.g. one row per sample from one row per prompt),
    moved to ``device`` when given."""
    index = torch.as_tensor(index, dtype=torch.long)
    return {name: t[index] if device is None else t[index].to(device) for name, t in cond.items()}


def with_negative(cond: Cond, negative: Cond | None) -> Cond:
    """``cond`` plus the negative prompt's conditioning as ``negative.NAME``, one (shared) row per prompt."""
    rows = next(iter(cond.values())).shape[0]
    extra = {f"negative.{name}": t.expand(rows, *t.shape[1:]) for name, t in (negative or {}).items()}
    return {**cond, **extra}


def tensors_digest(digest: Any, tensors: dict[str, Tensor]) -> str:
    """Feed the names, dtypes, shapes and bytes of ``tensors`` (in name order) into ``digest``; its hex."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_module(module: nn.Module, folder: Path) -> None:
    """``module.save_pretrained(folder)`` in safetensors, its config naming no load path (diffusers
    records where a model was loaded from): the same weights give the same files wherever they came from."""
    if hasattr(module, "register_to_config"):
        module.register_to_config(_name_or_path=folder.name)
    module.save_pretrained(folder, safe_serialization=True)


def tensor_hash(modules: dict[str, nn.Module], extra: bytes = b"") -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer, in name order.

    Independent of file format and of how the weights were loaded: two policies with the same
    identity compute the same function.
    """
    digest = hashlib.sha256(extra)
    for prefix in sorted(modules):
        state = modules[prefix].state_dict()
        tensors_digest(digest, {f"{prefix}.{name}": t for name, t in state.items()})
    return digest.hexdigest()


class Policy(ABC):
    """A text-conditioned flow model. ``x`` is the model's state (pixels or latents), batch-first.

    Beyond the abstract methods, a kind may override the hooks below them: how it samples (resolution,
    guidance, schedule), and whether it carries its own KL reference (a LoRA adapter disabled)."""

    kind: ClassVar[str]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    """What the models compute in; states, log-probs and the loss stay float32."""
    keep_text_encoders: bool = False
    """Keep the text encoders loaded after a rollout has encoded its prompts (a process that rolls out
    again, `tempflow loop`, then never reloads them)."""

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one state ``x`` without the batch dim, e.g. ``(C, H, W)``."""

    @abstractmethod
    def encode(self, prompts: list[str]) -> Cond:
        """Conditioning for each prompt (no gradient: text encoders stay frozen)."""

    @abstractmethod
    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Predicted velocity ``~ noise - x_data`` at noise level ``sigma`` (shape ``(B,)``), float32."""

    @abstractmethod
    def decode(self, x: Tensor) -> np.ndarray:
        """Final states to images, uint8 ``(B, H, W, 3)``."""

    trainable_attribute: ClassVar[str]
    """The attribute holding the module whose parameters GRPO updates, which :meth:`velocity` calls."""

    def trainable(self) -> nn.Module:
        """The module whose parameters GRPO updates."""
        return getattr(self, self.trainable_attribute)

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every module loaded now (moved by :meth:`to`)."""

    @abstractmethod
    def save_weights(self, path: Path) -> None:
        """Write the weights under ``path`` (the policy folder; config.json is written by the caller)."""

    @abstractmethod
    def identity(self) -> str:
        """A sha256 of what decides the function: the rollout manifest records it, the update checks it."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path, model_config: dict[str, Any], dtype: torch.dtype = torch.float32) -> Policy:
        """Load from a policy folder whose config.json had ``model = model_config``."""

    # -- hooks with defaults ------------------------------------------------------------------

    def saved_tensors(self) -> dict[str, Tensor]:
        """Every tensor :meth:`save_weights` writes (checked finite before anything is written)."""
        return {f"{prefix}.{name}": t for prefix, module in self.modules().items()
                for name, t in module.state_dict().items()}

    def prepare_training(self) -> None:
        """Called once before an update trains the policy (full fine-tuning marks its weights its own)."""

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters GRPO updates, by name (the optimizer state is stored by these names)."""
        return [(n, p) for n, p in self.trainable().named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def trainable_called_through(self, wrapper: nn.Module) -> Iterator[None]:
        """Within the block :meth:`velocity` calls ``wrapper`` (e.g. a DistributedDataParallel of
        :meth:`trainable`) in place of the module itself."""
        module = self.trainable()
        setattr(self, self.trainable_attribute, wrapper)
        try:
            yield
        finally:
            setattr(self, self.trainable_attribute, module)

    def configure_sampling(self, resolution: int, guidance_scale: float, negative_prompt: str) -> dict[str, Any]:
        """Set how this policy samples and return the resolved values (the rollout records them, the
        update passes them back). ``0`` means the kind's default. Kinds without guidance refuse it."""
        side = self.sample_shape[-1] * self.pixels_per_state
        if resolution not in (0, side):
            raise TempflowError(f"--resolution {resolution}: a {self.kind} policy draws {side}x{side} images only "
                                "(its size is fixed when it is created)")
        if guidance_scale not in (0.0, 1.0) or negative_prompt:
            raise TempflowError(f"a {self.kind} policy has no classifier-free guidance: leave --guidance-scale and "
                                "--negative-prompt unset")
        return {"resolution": side, "guidance_scale": None, "negative_prompt": None}

    pixels_per_state: int = 1
    """Image pixels per state element along a side (a latent policy's autoencoder factor)."""

    @property
    def negative_prompt(self) -> str | None:
        """The prompt of the unconditional branch when classifier-free guidance is on, else None."""
        return None

    def sigmas(self, num_steps: int, shift: float) -> Tensor:
        """The sampling schedule (SD3's static shift; FLUX overrides it with its resolution-dependent one)."""
        return make_sigmas(num_steps, shift)

    def input_folders(self) -> tuple[Path, ...]:
        """Folders besides the policy folder that the policy reads (a real kind's base model): stages
        protect them like their inputs, so no output can replace or land inside them."""
        return ()

    def release_text_encoders(self) -> None:
        """Free the text encoders once a rollout has encoded its prompts, unless :attr:`keep_text_encoders`."""

    def builtin_reference(self) -> Any | None:
        """A context manager under which the policy computes its KL reference (a LoRA adapter
        disabled), or None: the reference is another policy folder, loaded beside it."""
        return None

    def to(self, device: str | torch.device) -> Policy:
        for module in self.modules().values():
            module.to(device)
        self.device = torch.device(device)
        return self


# --------------------------------------------------------------------------------------------
# Policy folders


def save_policy(policy: Policy, path: Path, record: PolicyRecord) -> None:
    """Write weights and config.json into ``path`` (an empty folder: callers make it atomic); a
    non-finite weight is refused, naming it, before anything is written."""
    for name, tensor in policy.saved_tensors().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TempflowError(f"{name} holds NaN or infinite values; a policy is never written so")
    path.mkdir(parents=True, exist_ok=True)
    policy.save_weights(path)
    record.identity = policy.identity()
    write_policy_record(path, record)


def resolve_device(device: str) -> torch.device:
    """A torch device that exists on this machine, or a one-line error saying what does."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise TempflowError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TempflowError(f"--device {device}: this torch has no CUDA device available; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise TempflowError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return resolved


def resolve_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` to a torch dtype, or a one-line error naming the choices."""
    if name not in TORCH_DTYPES:
        raise TempflowError(f"--dtype {name!r}: choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def policy_class(kind: str) -> type[Policy]:
    """The class of a policy kind, imported on demand (a kind's module loads only when it is used)."""
    module, _, name = POLICY_KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load_policy(path: Path | str, device: str = "cpu", dtype: str = "fp32") -> tuple[Policy, PolicyRecord]:
    """Load a policy folder; refuses one whose weights do not match the identity it was saved with."""
    path = Path(path)
    resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    record = read_policy_record(path)
    try:
        policy = policy_class(record.kind).load(path, record.model, torch_dtype)
    except TempflowError as err:
        raise TempflowError(f"{path}/config.json: {err}") from None
    except Exception as err:  # diffusers, transformers and safetensors each raise their own kinds
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TempflowError(f"{path}: cannot load the {record.kind} policy ({first_line})") from err
    policy.to(device)
    if policy.identity() != record.identity:
        raise TempflowError(f"{path}: weights do not match the identity in config.json; the folder was modified")
    return policy, record
