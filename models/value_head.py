"""Value head V_phi: one shallow causal Transformer block + an MLP to a scalar.

It reads the policy backbone's final-layer hidden states (detached or not: the
caller decides) and returns a value at every position. V(s) of a prefix state s
is the value at the position of the last token of s: the prompt's last token for
the root, the l-th generated SID token for depth l.

Design:

* pre-norm block (LayerNorm -> causal multi-head self-attention -> residual,
  LayerNorm -> GELU FFN -> residual), then LayerNorm -> MLP -> scalar. No
  positional encoding of its own: the backbone's states already carry position
  (RoPE), and causal attention fixes the order.
* left padding: a key is visible if it is not padding and not in the future;
  every query also sees itself, so padded rows never produce NaN, and their
  values are set to 0.
* two paths over one set of weights, like GR's ``forward`` / ``cached_forward``:
  ``forward`` (training, all positions at once) and ``kv`` + ``step`` (VED: the
  keys/values of the prompt are computed once, those of each tree node once,
  and a node's value is one query over its prompt + path keys). The tests pin
  ``step`` to ``forward``.
* the output layer has a small normal init (not zero), so every parameter gets a
  gradient from the first TD step.

Saved in checkpoints as ``extras["value_head"] = head.state_dict()`` with
``asdict(head.config)`` in the manifest under ``"value_head"``;
``ValueHead(ValueHeadConfig(**manifest["value_head"]))`` rebuilds it;
``load_value_head`` does so for trainer, evaluation and service alike (an SFT
checkpoint has none: the caller says whether that is an error).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.policy import Policy


@dataclass(frozen=True)
class ValueHeadConfig:
    hidden_size: int  # the backbone's hidden size (input width)
    num_heads: int = 4
    ffn_size: int = 0  # 0: 4 * hidden_size
    mlp_hidden: int = 0  # width of the output MLP; 0: hidden_size
    dropout: float = 0.0  # on the attention and FFN outputs (training only)

    def __post_init__(self) -> None:
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads must divide hidden_size ({self.hidden_size}), got {self.num_heads}")
        if self.ffn_size < 0 or self.mlp_hidden < 0:
            raise ValueError("ffn_size and mlp_hidden must be >= 0 (0 picks the default)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # resolve the defaults so the stored config is explicit
        object.__setattr__(self, "ffn_size", self.ffn_size or 4 * self.hidden_size)
        object.__setattr__(self, "mlp_hidden", self.mlp_hidden or self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class ValueHead(nn.Module):
    """One shallow causal Transformer block over the backbone's final hidden states + an MLP to a scalar."""

    def __init__(self, config: ValueHeadConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.attn_norm = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.ffn_norm = nn.LayerNorm(h)
        self.ffn = nn.Sequential(nn.Linear(h, config.ffn_size), nn.GELU(), nn.Linear(config.ffn_size, h))
        self.out_norm = nn.LayerNorm(h)
        self.mlp = nn.Sequential(nn.Linear(h, config.mlp_hidden), nn.GELU(), nn.Linear(config.mlp_hidden, 1))
        self.drop = nn.Dropout(config.dropout)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, S, H) -> (N, heads, S, head_dim)."""
        n, s, _ = x.shape
        return x.view(n, s, self.config.num_heads, self.config.head_dim).transpose(1, 2)

    def _finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual, FFN and output MLP: x, attended (..., H) -> value (...)."""
        x = x + self.drop(self.attn_out(attended))
        x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return self.mlp(self.out_norm(x)).squeeze(-1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values at every position: hidden (N, T, H), attention_mask (N, T) -> (N, T); 0 at padding."""
        n, t, h = hidden.shape
        q, k, v = (self._heads(z) for z in self.qkv(self.attn_norm(hidden)).split(h, dim=-1))  # (N, heads, T, d)
        valid = attention_mask.bool()  # (N, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril()  # (T, T)
        eye = torch.eye(t, dtype=torch.bool, device=hidden.device)
        allowed = (causal & valid[:, None, :]) | eye  # (N, T, T) query x key
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (N, heads, T, d)
        values = self._finish(hidden, attended.transpose(1, 2).reshape(n, t, h))  # (N, T)
        return values.masked_fill(~valid, 0.0)

    def qkv_heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention queries, keys and values of positions: hidden (N, S, H) -> three (N, heads, S, head_dim)."""
        q, k, v = self.qkv(self.attn_norm(hidden)).split(self.config.hidden_size, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def kv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention keys and values of positions: hidden (N, S, H) -> two (N, heads, S, head_dim).

        A position's key/value depend on its own hidden state only, so they are
        computed once per prompt position and once per tree node.
        """
        return self.qkv_heads(hidden)[1:]

    def step(
        self,
        hidden: torch.Tensor,  # (N, H) state at the query position
        keys: torch.Tensor,  # (N, heads, S, head_dim) keys of the visible positions, the query's own included
        values: torch.Tensor,  # (N, heads, S, head_dim)
        key_mask: torch.Tensor,  # (N, S) 1 where the key is visible
        query: torch.Tensor | None = None,  # (N, heads, 1, head_dim) from ``qkv_heads(hidden[:, None])``, if known
    ) -> torch.Tensor:
        """Value at one position from cached keys/values: (N,). Equals ``forward(...)[:, t]``."""
        n, h = hidden.shape
        q = self.qkv_heads(hidden[:, None])[0] if query is None else query  # (N, heads, 1, d)
        mask = key_mask.bool()[:, None, None, :]  # (N, 1, 1, S)
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (N, heads, 1, d)
        return self._finish(hidden, attended.reshape(n, h))


def value_head_for(
    policy: Policy, num_heads: int = 4, ffn_size: int = 0, mlp_hidden: int = 0, dropout: float = 0.0
) -> ValueHead:
    """A freshly initialised value head sized for ``policy``'s backbone, on its device."""
    hidden = int(policy.model.config.hidden_size)
    config = ValueHeadConfig(hidden, num_heads, ffn_size, mlp_hidden, dropout)
    return ValueHead(config).to(policy.device)


def value_head_manifest(head: ValueHead) -> dict[str, Any]:
    """What a checkpoint's manifest stores under ``"value_head"`` to rebuild ``head``."""
    return asdict(head.config)


@overload
def load_value_head(
    checkpoint: LoadedCheckpoint, device: str | torch.device = ..., required: Literal[True] = ...
) -> ValueHead: ...


@overload
def load_value_head(
    checkpoint: LoadedCheckpoint, device: str | torch.device = ..., required: bool = ...
) -> ValueHead | None: ...


def load_value_head(
    checkpoint: LoadedCheckpoint, device: str | torch.device = "cpu", required: bool = True
) -> ValueHead | None:
    """The checkpoint's value head in eval mode; when it has none, a ``CheckpointError`` if ``required``,
    else None. Weights that do not fit the stored config are always a ``CheckpointError``."""
    state = checkpoint.extras.get("value_head")
    if state is None:
        if not required:
            return None
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has no value head (only `vstar rl --algo vstar` writes one); "
            "use --decoder beam or a V-STAR checkpoint"
        )
    config = checkpoint.manifest.get("value_head")
    if config is None:
        raise CheckpointError(f"checkpoint {checkpoint.path}: value_head weights without manifest['value_head']")
    try:
        head = ValueHead(ValueHeadConfig(**config))
        head.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {checkpoint.path}: value_head.safetensors does not fit manifest['value_head']: {e}"
        ) from None
    return head.to(device).eval()
