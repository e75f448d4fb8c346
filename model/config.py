"""Model configuration: one dataclass, named presets, JSON round trip.

Design choices:
- `ModelConfig` holds only the architecture. Derived fields (`head_dim`,
  `n_kv_heads` when left out) are filled in `__post_init__`, which also
  validates, so an impossible config fails at construction with a message
  naming the field instead of deep inside a matmul.
- Presets fix the shape; the vocabulary size always comes from the tokenizer.
- `to_dict`/`from_dict` go through JSON-safe types only (config.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from model.errors import ConfigError


@dataclass
class RopeScaling:
    """Llama-3-style RoPE frequency scaling (long-context extension)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    ffn_dim: int = 3072  # hidden width of the SwiGLU MLP
    vocab_size: int = 32000
    max_seq_len: int = 512  # context length in tokens
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"model config: n_heads={self.n_heads} does not divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model config: n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("head_dim")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"model config: {exc}") from None

    def num_params(self, include_embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        body = self.n_layers * per_layer + self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return body + (embeddings if include_embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None, *, adapter_params: int = 0,
                        trainable_params: int | None = None) -> int:
        """Training FLOPs per token: forward 2N, input gradients 2N, weight gradients 2 per trainable
        weight, plus attention scores. Full training is the usual 6N; a frozen base with an adapter
        (LoRA: `adapter_params` trainable weights on top) skips the base's weight gradients, so it is
        4N + 6 * adapter. The LM head is counted at every position."""
        seq_len = seq_len or self.max_seq_len
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.dim + adapter_params
        trainable = matmul_params if trainable_params is None else min(trainable_params, matmul_params)
        attention = 12 * self.n_layers * self.dim * seq_len
        return 4 * matmul_params + 2 * trainable + attention


# The design table. vocab_size is a placeholder: it comes from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256, tie_embeddings=True),
    "mini": dict(dim=384, n_layers=6, n_heads=6, ffn_dim=1024, max_seq_len=512, tie_embeddings=True),
    "small": dict(dim=768, n_layers=12, n_heads=12, ffn_dim=3072, max_seq_len=512),
    "medium": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, max_seq_len=1024),
    "large": dict(dim=2048, n_layers=32, n_heads=32, ffn_dim=8192, max_seq_len=2048),
}
