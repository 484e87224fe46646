"""The recommender: item tower over frozen BERT states, causal user tower, dot-product scores.

Two ways to compute item vectors, both exact:

- per record (`ItemTower.pooled` on (B, K, T, H), `Recommender.forward`): every trainable
  layer sees the record as its input's first dimension, so Opacus's per-sample gradients are
  per record (see notes/privacy.md): a batch of B records with K items each stays
  (B, K, ...) all the way through, never (B*K, ...);
- shared (`ItemTower.encode` on (M, T, H), `ItemTower.head` on (M, H)): each distinct item
  once per batch or for the whole catalog, as non-private training and inference use it.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from common.backbone import mean_pool
from common.config import Config

if TYPE_CHECKING:  # peft costs seconds to import: only where LoRA is used (adapter-k > 0)
    from peft import LoraConfig

NEG_INF = -1e9  # additive mask value; finite so fully masked rows stay NaN-free
LORA_TARGETS = ["query", "value"]


def lora_config(cfg: Config, *, base_model: str = "", num_layers: int = 0) -> LoraConfig:
    """The LoRA settings of the adapted blocks (one place: the model and its saved form).

    No LoRA dropout (and the copied blocks' own dropout is switched off): the adapted blocks
    must be deterministic, so that the catalog table a training step reads equals what a later
    backward pass through the blocks recomputes. With the backbone's `num_layers`, the config
    names the backbone's top `adapter-k` layers, as peft needs it to load the adapter onto the
    whole backbone (`PeftModel.from_pretrained`); without, it targets every block it is given.
    """
    from peft import LoraConfig

    top = list(range(num_layers - cfg.adapter_k, num_layers)) if num_layers else None
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        base_model_name_or_path=base_model or None,
        layers_to_transform=top,
        layers_pattern="layer" if top else None,
    )


class Bottleneck(nn.Module):
    """Residual bottleneck adapter (Houlsby-style) over pooled item states."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)  # starts as the identity
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        # dropout on the narrow hidden layer: over a whole catalog it costs H/hidden x less
        return x + self.up(self.dropout(F.gelu(self.down(self.norm(x)))))


class ItemTower(nn.Module):
    """Adapted top-k BERT blocks (LoRA) -> mean pool -> bottleneck -> projection (+ item id)."""

    def __init__(
        self, cfg: Config, *, hidden_size: int, num_items: int, blocks: list[nn.Module] | None
    ):
        super().__init__()
        self.k = cfg.adapter_k
        if self.k:
            if not blocks or len(blocks) != self.k:
                raise ValueError(f"adapter-k={self.k} needs exactly {self.k} backbone blocks.")
            self.blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks)
            self.blocks.requires_grad_(False)
            for module in self.blocks.modules():  # deterministic in train mode too (see above)
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
            from peft import inject_adapter_in_model

            # Injected after the blocks exist and sit on their device (opacus#820).
            inject_adapter_in_model(lora_config(cfg), self.blocks)
        self.text = cfg.item_text
        if self.text:
            self.adapter = Bottleneck(hidden_size, cfg.bottleneck_dim, cfg.dropout)
            self.proj = nn.Linear(hidden_size, cfg.model_dim)
        self.id_embedding = (
            nn.Embedding(num_items, cfg.model_dim) if cfg.item_id_embedding else None
        )
        if self.id_embedding is not None and self.text:
            nn.init.zeros_(self.id_embedding.weight)  # text first; ids learn the residual
        elif self.id_embedding is not None:  # the id-only baseline: ids alone, BERT-style init
            nn.init.normal_(self.id_embedding.weight, std=0.02)

    def pooled(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per record: (B, K, T, H) | (B, K, H) -> (B, K, H), items of a record packed in one
        sequence with block-diagonal attention (a token sees its own item's real tokens)."""
        if not self.k:
            return states
        b, n, t, h = states.shape
        x = states.reshape(b, n * t, h)  # (B, K*T, H): one sequence per record
        item_of = torch.arange(n, device=x.device).repeat_interleave(t)  # (K*T,)
        same_item = item_of[:, None] == item_of[None, :]  # (K*T, K*T)
        real = mask.reshape(b, 1, n * t)  # (B, 1, K*T)
        allowed = same_item[None] & real  # (B, K*T, K*T)
        allowed = allowed | torch.eye(n * t, dtype=torch.bool, device=x.device)[None]
        additive = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        additive = additive.masked_fill(~allowed, NEG_INF)[:, None]  # (B, 1, K*T, K*T)
        for block in self.blocks:
            x = block(x, attention_mask=additive)
        return mean_pool(x.reshape(b, n, t, h), mask)  # (B, K, H)

    def encode(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Shared: each item its own sequence through the adapted blocks, (M, T, H) -> (M, H)."""
        if not self.k:
            raise ValueError("encode() needs adapted blocks (adapter-k > 0).")
        additive = torch.zeros(mask.shape, dtype=states.dtype, device=states.device)
        additive = additive.masked_fill(~mask, NEG_INF)[:, None, None]  # (M, 1, 1, T)
        x = states
        for block in self.blocks:
            x = block(x, attention_mask=additive)
        return mean_pool(x, mask)

    def head(self, pooled: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Adapter, projection and id embedding: (..., H), (...) -> (..., D).

        A new item (an id past the embedding's rows) gets its text's vector alone; without text
        (the id-only baseline) it gets the zero vector: such a model cannot tell new items apart.
        """
        if self.text:
            v = self.proj(self.adapter(pooled))
        else:
            v = pooled.new_zeros(*pooled.shape[:-1], self.id_embedding.embedding_dim)
        if self.id_embedding is not None:
            known = item_ids < self.id_embedding.num_embeddings  # new items: text alone
            ids = torch.where(known, item_ids, torch.zeros_like(item_ids))
            v = v + self.id_embedding(ids) * known.unsqueeze(-1).to(v.dtype)
        return v

    def forward(
        self, states: torch.Tensor, mask: torch.Tensor | None, item_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.head(self.pooled(states, mask), item_ids)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from plain Linear layers (Opacus-friendly)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, L, D)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)  # (B, h, L, L)
        att = self.dropout(att.masked_fill(~allowed[:, None], NEG_INF).softmax(-1))
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class UserBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), allowed))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class UserTower(nn.Module):
    """A causal transformer over item vectors; position i predicts the item after item i.

    Positions count from the first real item, so a left-padded history and the same history
    inside a longer sequence give the same state: one causal pass over a sequence yields every
    prefix's user vector (training), and the last position is the user (inference).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.positions = nn.Embedding(cfg.history_len, cfg.model_dim)
        self.blocks = nn.ModuleList(
            UserBlock(cfg.model_dim, cfg.user_heads, cfg.dropout) for _ in range(cfg.user_layers)
        )
        self.norm = nn.LayerNorm(cfg.model_dim)

    def encode(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) item vectors, left-padded; (B, L) bool -> (B, L, D), one state per prefix."""
        b, t, _ = items.shape
        # masks built in float, then compared: ONNX Runtime has no boolean EyeLike or Trilu
        real = valid.to(items.dtype)  # (B, L)
        pos = (real.cumsum(1) - 1.0).clamp(min=0.0).long()  # (B, L): index among real items
        x = items + self.positions(pos)
        ones = torch.ones(t, t, device=items.device)
        causal = ones.tril() > 0
        allowed = causal[None] & valid[:, None, :]  # (B, L, L)
        allowed = allowed | (torch.eye(t, device=items.device) > 0)[None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def forward(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) left-padded item vectors, (B, L) bool -> (B, D) user vectors."""
        return self.encode(items, valid)[:, -1]  # left padding: the newest item is last


class Recommender(nn.Module):
    """Scores items for a user as the dot product of user and item vectors."""

    def __init__(
        self,
        cfg: Config,
        *,
        hidden_size: int,
        num_items: int,
        blocks: list[nn.Module] | None = None,
    ):
        super().__init__()
        self.items = ItemTower(cfg, hidden_size=hidden_size, num_items=num_items, blocks=blocks)
        self.user = UserTower(cfg)

    def user_states(self, history: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Every prefix's user vector: (B, L, D) item vectors, (B, L) bool -> (B, L, D)."""
        history = history * valid.unsqueeze(-1).to(history.dtype)  # padding zeroed
        return self.user.encode(history, valid)

    def forward(
        self,
        inputs: torch.Tensor,  # (B, L) item ids, left-padded with -1
        input_index: torch.Tensor,  # (B, L) column of each input among the candidates
        candidates: torch.Tensor,  # (B, C) item ids of each record (its own items first)
        candidate_states: torch.Tensor,  # (B, C, T, H) | (B, C, H)
        candidate_mask: torch.Tensor | None,  # (B, C, T) | None
    ) -> torch.Tensor:
        """Per record: logits (B, L, C) of every position against the record's candidates."""
        c = self.items(candidate_states, candidate_mask, candidates)  # (B, C, D)
        valid = inputs >= 0
        history = torch.gather(
            c, 1, input_index.clamp(min=0)[..., None].expand(-1, -1, c.shape[-1])
        )
        u = self.user_states(history, valid)  # (B, L, D)
        return torch.einsum("bld,bcd->blc", u, c)  # (B, L, C)
