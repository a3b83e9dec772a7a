"""A small GPT: token + position embeddings, pre-norm attention/MLP blocks, a linear head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab: int = 256
    seq: int = 64
    layers: int = 2
    heads: int = 4
    dim: int = 128


class Attention(nn.Module):
    """Causal multi-head self-attention. The number of heads is read from q's width, so a
    tensor-parallel shard (heads/tp of them) and a head-pruned model need no other change."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.down = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.dim), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    """Token + position embeddings as one pipeline layer (holds the GPT's own modules)."""

    def __init__(self, tok: nn.Embedding, pos: nn.Embedding):
        super().__init__()
        self.tok, self.pos = tok, pos

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class Head(nn.Module):
    """Final norm + output projection as one pipeline layer."""

    def __init__(self, ln: nn.LayerNorm, head: nn.Linear):
        super().__init__()
        self.ln, self.head = ln, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.seq, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab)

    def pipeline_layers(self) -> list[nn.Module]:
        """The model as a sequence of layers, each feeding the next (DeepSpeed's
        PipelineModule takes this list): embeddings, every block, norm + head. The layers
        hold this model's own modules, so the weights are the same."""
        return [Embed(self.tok, self.pos), *self.blocks, Head(self.ln, self.head)]

    def tensor_parallel_plan(self, tp: int) -> dict[str, str]:
        """Megatron-style: q/k/v and the MLP's up projection split by output column, the
        attention and MLP output projections by input row; each rank keeps heads/tp heads."""
        if self.cfg.heads % tp:
            raise ValueError(f"{self.cfg.heads} attention heads do not split over {tp} tensor-parallel ranks")
        plan = {}
        for i in range(len(self.blocks)):
            for name in ("attn.q", "attn.k", "attn.v", "mlp.up"):
                plan[f"blocks.{i}.{name}"] = "colwise"
            for name in ("attn.proj", "mlp.down"):
                plan[f"blocks.{i}.{name}"] = "rowwise"
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A pipeline stage holds only some of these modules (the others are None): a later
        # stage gets the hidden states, an earlier one returns them.
        if self.tok is not None:
            x = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            if block is not None:
                x = block(x)
        if self.head is not None:
            x = self.head(self.ln(x))
        return x


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy of every position's logits against its next token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of a batch of token rows (inputs row[:-1], targets row[1:])."""
    return token_loss(model(tokens[:, :-1]), tokens[:, 1:])
