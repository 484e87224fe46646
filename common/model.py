"""The recommender: item tower over frozen BERT states, causal user tower, dot-product scores.

Every trainable layer sees the example index as its input's first dimension, so Opacus's
per-sample gradients are per training example (see notes/privacy.md): a batch of B examples
with K items each stays (B, K, ...) all the way through, never (B*K, ...).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from common.backbone import mean_pool
from common.config import Config

NEG_INF = -1e9  # additive mask value; finite so fully masked rows stay NaN-free


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, H) -> (B, K, H)
        return x + self.dropout(self.up(F.gelu(self.down(self.norm(x)))))


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
            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.dropout,
                target_modules=["query", "value"],
            )
            # Injected after the blocks exist and sit on their device (opacus#820).
            inject_adapter_in_model(lora, self.blocks)
        self.adapter = Bottleneck(hidden_size, cfg.bottleneck_dim, cfg.dropout)
        self.proj = nn.Linear(hidden_size, cfg.model_dim)
        self.id_embedding = (
            nn.Embedding(num_items, cfg.model_dim) if cfg.item_id_embedding else None
        )
        if self.id_embedding is not None:
            nn.init.zeros_(self.id_embedding.weight)  # text first; ids learn the residual

    def pooled(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled item states after the adapted blocks: (B, K, T, H) | (B, K, H) -> (B, K, H)."""
        if not self.k:
            return states
        b, n, t, h = states.shape
        x = states.reshape(b, n * t, h)  # (B, K*T, H): one sequence per example
        # Block-diagonal attention: a token sees the real tokens of its own item only.
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

    def head(self, pooled: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Adapter, projection and id embedding: (B, K, H), (B, K) -> (B, K, D)."""
        v = self.proj(self.adapter(pooled))
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
    """A causal transformer over the last L item vectors; the user is the last position."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.positions = nn.Embedding(cfg.history_len, cfg.model_dim)
        self.blocks = nn.ModuleList(
            UserBlock(cfg.model_dim, cfg.user_heads, cfg.dropout) for _ in range(cfg.user_layers)
        )
        self.norm = nn.LayerNorm(cfg.model_dim)

    def forward(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L, D) item vectors, left-padded; (B, L) bool -> (B, D) user vectors."""
        b, t, _ = items.shape
        pos = torch.arange(t, device=items.device).expand(b, t)  # (B, L)
        x = items + self.positions(pos)
        # masks built in float, then compared: ONNX Runtime has no boolean EyeLike or Trilu
        ones = torch.ones(t, t, device=items.device)
        causal = ones.tril() > 0
        allowed = causal[None] & valid[:, None, :]  # (B, L, L)
        allowed = allowed | (torch.eye(t, device=items.device) > 0)[None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x[:, -1])  # left padding: the newest item is always last


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

    def forward(
        self,
        history: torch.Tensor,  # (B, L) item ids, left-padded with -1
        history_pooled: torch.Tensor,  # (B, L, H) pooled states of the history items
        candidates: torch.Tensor,  # (B, C) item ids: the target first, then its negatives
        candidate_states: torch.Tensor,  # (B, C, T, H) | (B, C, H)
        candidate_mask: torch.Tensor | None,  # (B, C, T) | None
    ) -> torch.Tensor:
        """Logits of each example's candidates: (B, C)."""
        valid = history >= 0
        hist = self.items.head(history_pooled, history.clamp(min=0))  # (B, L, D)
        c = self.items(candidate_states, candidate_mask, candidates)  # (B, C, D)
        return self._logits(hist, valid, c)

    def forward_shared(
        self,
        history: torch.Tensor,  # (B, L), left-padded with -1
        candidates: torch.Tensor,  # (B, C)
        table: torch.Tensor,  # (N, H) pooled states of every item, frozen for the round
        states: torch.Tensor,  # (N, T, H) | (N, H) item states entering the adapted blocks
        mask: torch.Tensor | None,  # (N, T) | None
    ) -> torch.Tensor:
        """Logits (B, C) with each distinct item of the batch encoded once.

        Much faster, but rows are items, not examples: for non-private training only.
        """
        ids, inverse = torch.unique(candidates, return_inverse=True)  # (U,), (B, C)
        if self.items.k:
            pooled = self.items.pooled(states[ids][:, None], mask[ids][:, None])[:, 0]  # (U, H)
        else:
            pooled = states[ids]
        c = self.items.head(pooled[None], ids[None])[0][inverse]  # (B, C, D)
        valid = history >= 0
        hist_ids, hist_inverse = torch.unique(history.clamp(min=0), return_inverse=True)
        hist = self.items.head(table[hist_ids][None], hist_ids[None])[0][hist_inverse]
        return self._logits(hist, valid, c)

    def _logits(self, hist: torch.Tensor, valid: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        hist = hist * valid.unsqueeze(-1).to(hist.dtype)  # (B, L, D), padding zeroed
        u = self.user(hist, valid)  # (B, D)
        return torch.einsum("bd,bcd->bc", u, c)  # (B, C)
