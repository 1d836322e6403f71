"""The recommender: a causal GPT-2 over item embeddings, its item logits tied to those embeddings,
and a Q head over all items (the critic of CRR, SQN and SA2C shares the transformer).

Inputs are item ids, 0 being the start token (and padding): a window ``[0, i_1, ..., i_W]`` gives
W + 1 states; state j has seen the items before it, its action is the item that follows. Padding
at the end of a window is never attended to by earlier positions (the attention is causal), so no
attention mask is needed; losses mask the padded positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stages.support.errors import TempflowError
from stages.support.rules import Rules

# transformers is imported where the GPT-2 blocks are built, for start-up time.


@dataclass
class RecModelConfig(Rules):
    """The transformer's shape. Every field is also a ``tempflow rec pretrain`` option."""

    command = "rec pretrain"

    layers: int = 6
    """Transformer blocks (DistilGPT2: 6)."""
    heads: int = 12
    """Attention heads (DistilGPT2: 12)."""
    width: int = 768
    """Hidden width, also the item embedding's (DistilGPT2: 768)."""
    context: int = 50
    """Events a training window holds; a state sees at most this many past items."""
    dropout: float = 0.1
    """Dropout of embeddings, attention and residuals (GPT-2's 0.1)."""

    def __post_init__(self) -> None:
        self.at_least(1, "layers", "heads", "width", "context")
        self.require(self.width % self.heads == 0, "width", f"a multiple of --heads {self.heads}")
        self.at_most("context", 1024, "GPT-2 has 1024 positions")
        self.within("dropout", 0.0, 1.0, high_open=True)


class RecTransformer(nn.Module):
    """``forward(items) -> (logits, q)``, each ``(B, L, n_items + 1)``; column 0 (the start token)
    is never an action: its logit is -inf and its Q the lowest float, so that no max or argmax over
    Q picks it (and ``pi(0) * Q(0)`` is 0, not NaN)."""

    def __init__(self, n_items: int, config: RecModelConfig) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.n_items, self.config = n_items, config
        gpt = GPT2Config(vocab_size=1, n_positions=config.context + 1, n_embd=config.width, n_layer=config.layers,
                         n_head=config.heads, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                         attn_pdrop=config.dropout, bos_token_id=None, eos_token_id=None)
        self.transformer = GPT2Model(gpt)
        self.items = nn.Embedding(n_items + 1, config.width)
        nn.init.normal_(self.items.weight, std=gpt.initializer_range)
        self.q_head = nn.Linear(config.width, n_items + 1)

    def hidden(self, items: Tensor) -> Tensor:
        return self.transformer(inputs_embeds=self.items(items)).last_hidden_state

    def forward(self, items: Tensor) -> tuple[Tensor, Tensor]:
        h = self.hidden(items)
        start = torch.zeros(self.n_items + 1, dtype=torch.bool, device=h.device)
        start[0] = True
        logits = (h @ self.items.weight.t()).masked_fill(start, -math.inf)
        q = self.q_head(h).masked_fill(start, torch.finfo(h.dtype).min)
        return logits, q


def polyak(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- (1 - tau) target + tau online``, parameter by parameter."""
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.mul_(1 - tau).add_(o, alpha=tau)


def init_from_gpt2(model: RecTransformer, folder: Path) -> dict[str, Any]:
    """Copy a local GPT-2 checkpoint's transformer (e.g. DistilGPT2's folder, as ``save_pretrained``
    or a hub download leaves it) into ``model``: every block, the final layer norm, and the first
    ``context + 1`` position embeddings. Its word embeddings are not taken (items are not words).
    The folder's shape must be ``model``'s; returns what was loaded, for the model's record."""
    from transformers import GPT2Config, GPT2Model

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise TempflowError(f"--init-from {folder}: not a model folder (it has no config.json)")
    try:
        source_config = GPT2Config.from_pretrained(folder)
    except Exception as err:  # transformers' own errors for unreadable or foreign configs
        raise TempflowError(f"--init-from {folder}: its config.json is not a GPT-2 config ({err})") from None
    mine = model.transformer.config
    wanted = {"layers": (source_config.n_layer, mine.n_layer), "heads": (source_config.n_head, mine.n_head),
              "width": (source_config.n_embd, mine.n_embd)}
    differ = [f"--{name} {theirs}" for name, (theirs, ours) in wanted.items() if theirs != ours]
    if getattr(source_config, "model_type", None) != "gpt2" or differ:
        raise TempflowError(f"--init-from {folder}: a {getattr(source_config, 'model_type', '?')} model of another shape; "
                            f"pass {' '.join(differ) or 'a GPT-2 folder'} to match it")
    if source_config.n_positions < mine.n_positions or source_config.activation_function != mine.activation_function:
        raise TempflowError(f"--init-from {folder}: {source_config.n_positions} positions and "
                            f"{source_config.activation_function} activations, where this model needs "
                            f"{mine.n_positions} and {mine.activation_function}")
    try:
        source = GPT2Model.from_pretrained(folder)
    except Exception as err:  # missing or damaged weights
        raise TempflowError(f"--init-from {folder}: its weights do not load ({type(err).__name__}: {err})") from None
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("wte.")}
    weights["wpe.weight"] = weights["wpe.weight"][:mine.n_positions]
    missing, unexpected = model.transformer.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"wte.weight"}:
        raise TempflowError(f"--init-from {folder}: its weights do not fit ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected)")
    return {"path": str(folder), "layers": mine.n_layer, "width": mine.n_embd, "loaded": len(weights)}
