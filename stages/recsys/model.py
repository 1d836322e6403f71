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

import torch
from torch import Tensor, nn

from stages.errors import TempflowError


@dataclass
class RecModelConfig:
    """The transformer's shape. Every field is also a ``tempflow rec pretrain`` option."""

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
        for name in ("layers", "heads", "width", "context"):
            if getattr(self, name) < 1:
                raise TempflowError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if self.width % self.heads:
            raise TempflowError(f"--width {self.width} must be a multiple of --heads {self.heads}")
        if self.context > 1024:
            raise TempflowError(f"--context {self.context} is above GPT-2's 1024 positions")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise TempflowError(f"--dropout must lie in [0, 1) (got {self.dropout})")


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
