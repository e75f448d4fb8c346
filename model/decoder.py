"""The Llama-style decoder, written from scratch.

Token embedding -> N x [RMSNorm -> grouped-query attention with rotary
embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head.

Design choices:
- Weight layout and the rotary convention (rotate-half, as Hugging Face's
  Llama) match `transformers.LlamaForCausalLM`, so import/export is a rename,
  never a permutation.
- The forward pass takes explicit `positions` ([B, T]) and an optional
  `cache`. Without a cache it is plain causal attention (training, eval).
  With one, every attention layer hands its new q/k/v to
  `cache.attend(layer, q, k, v, positions)`, which stores k/v wherever it keeps
  them and returns the attention output. The model knows nothing of how the
  cache is laid out: the reference generator uses `DenseKVCache` below, the
  serving engine a paged pool, and rows of one batch may sit at different
  positions.
- `hidden_states()` stops before the LM head so a caller that needs logits at
  a few positions only (the engine, after a prefill chunk) does not pay for a
  [T, vocab] matmul.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


class KVCache(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Store k/v of the new tokens and attend to everything cached so far.

        q: [B, n_heads, T, head_dim]; k, v: [B, n_kv_heads, T, head_dim] (rotary
        already applied); positions: [B, T]. Returns [B, n_heads, T, head_dim].
        """
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype: bf16 variance loses too much.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    """inv_freq[i] = theta^(-2i/head_dim), with Llama-3 scaling when configured."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3: leave high frequencies alone, divide low ones by `factor`,
    # interpolate smoothly in between (by wavelength).
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, T, head_dim]; cos/sin: [B, 1, T, head_dim]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor,
                cache: KVCache | None, layer: int) -> Tensor:
        batch, seq_len, _ = x.shape
        # [B, T, H*hd] -> [B, H, T, hd]
        q = self.q(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            out = cache.attend(layer, q, k, v, positions)
        # [B, H, T, hd] -> [B, T, H*hd]
        return self.o(out.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor, cache: KVCache | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, positions, cache, self.layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    block_class: type[Block] = Block  # subclasses may swap in a Block with another forward (same weights)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(self.block_class(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin for each position, computed in fp32 then cast: [B, 1, T, head_dim]."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """tokens, positions: [B, T] -> final-normed hidden states [B, T, dim]."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed(tokens)
        rope = self.rope(positions)
        for block in self.layers:
            x = block(x, rope, positions, cache)
        return self.norm(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """tokens, positions: [B, T] -> logits [B, T, vocab_size]."""
        return self.lm_head(self.hidden_states(tokens, positions, cache))

    def loss_hidden_states(self, tokens: Tensor) -> Tensor:
        """Training's hidden states [B, T, dim] for rows starting at position 0 (no cache)."""
        return self.hidden_states(tokens)

    def init_weights(self, seed: int | None = None) -> "Transformer":
        """GPT-2-style init: N(0, 0.02), residual outputs scaled by 1/sqrt(2*n_layers)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                std = residual_std if name.endswith(("o.weight", "down.weight")) else 0.02
                with torch.no_grad():
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        return self


class DenseKVCache:
    """The simplest correct cache: contiguous [layers, B, kv_heads, max_len, hd] tensors.

    Rows are written at their own positions, so rows may sit at different
    positions (left-aligned prompts of different lengths, padded on the right).
    Used by the reference generator; the serving engine has its own paged cache.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.grouped = config.n_kv_heads != config.n_heads

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        batch, kv_heads, seq_len, head_dim = k.shape
        index = positions[:, None, :, None].expand(batch, kv_heads, seq_len, head_dim)
        self.keys[layer].scatter_(2, index, k.to(self.keys.dtype))
        self.values[layer].scatter_(2, index, v.to(self.values.dtype))
        num_keys = int(positions.max()) + 1
        key_positions = torch.arange(num_keys, device=q.device)
        # mask[b, 0, t, j]: key j is visible to query t of row b when j <= its position.
        mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
        keys = self.keys[layer, :, :, :num_keys].to(q.dtype)
        values = self.values[layer, :, :, :num_keys].to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.grouped)
