"""A training-time forward pass for the decoder: same weights, fewer and larger kernels.

`TrainingTransformer` is a `Transformer` (same parameters, same state dict,
same checkpoints) whose forward, for the training case only (whole
sequences from position 0, no KV cache), is rearranged for speed:

- q, k and v come from one matmul against the concatenated weights, gate and
  up from another: three and two GEMMs become one each, and under autocast
  the normed activations are cast to bf16 once instead of five times.
- cos/sin of the rotary embedding are computed once per sequence length and
  reused by every layer and step.

Each block still runs through its own module call (`FusedBlock.forward`), so
module hooks fire per block: FSDP's `fully_shard(block)` gathers a block's
weights there. Every other case (a cache, explicit positions) falls back to the
reference `Transformer.forward`, and tests check the two agree to float rounding,
gradients included. The savings are in the per-op overhead that dominates
eager CPU training of small models; the maths is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.decoder import Block, KVCache, Transformer, apply_rope


class FusedBlock(Block):
    """A decoder block whose training forward (no positions, no cache) is fused."""

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor | None,
                cache: KVCache | None) -> Tensor:
        if positions is not None or cache is not None:
            return super().forward(x, rope, positions, cache)
        cos, sin = rope
        x = x + _fused_attention(self, self.attn_norm(x), cos, sin)
        return x + _fused_mlp(self, self.mlp_norm(x))


class TrainingTransformer(Transformer):
    """The decoder with a fused forward for training (see module docstring)."""

    block_class = FusedBlock

    def __init__(self, config):
        super().__init__(config)
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        if positions is not None or cache is not None:
            return super().forward(tokens, positions, cache)
        return self.lm_head(self._fused_hidden_states(tokens))

    def loss_hidden_states(self, tokens: Tensor) -> Tensor:
        return self._fused_hidden_states(tokens)

    def _rope_table(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin for positions 0..seq_len-1: [1, 1, T, head_dim], cached (they never change)."""
        dtype = self.embed.weight.dtype
        key = (seq_len, device, dtype)
        if key not in self._rope_cache:
            positions = torch.arange(seq_len, device=device)[None]
            self._rope_cache[key] = tuple(t.detach() for t in self.rope(positions))
        return self._rope_cache[key]

    def _fused_hidden_states(self, tokens: Tensor) -> Tensor:
        seq_len = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self._rope_table(seq_len, tokens.device)
        for block in self.layers:
            x = block(x, (cos, sin), None, None)
        return self.norm(x)


def _fused_attention(block: Block, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    attn = block.attn
    batch, seq_len, _ = x.shape
    q_width, kv_width = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    qkv = F.linear(x, torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))  # [B, T, q + 2 kv]
    q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
    # [B, T, H*hd] -> [B, H, T, hd]
    q = q.view(batch, seq_len, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = k.view(batch, seq_len, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = v.view(batch, seq_len, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.n_kv_heads != attn.n_heads)
    # [B, H, T, hd] -> [B, T, H*hd]
    return attn.o(out.transpose(1, 2).reshape(batch, seq_len, -1))


def _fused_mlp(block: Block, x: Tensor) -> Tensor:
    mlp = block.mlp
    gate, up = F.linear(x, torch.cat([mlp.gate.weight, mlp.up.weight])).chunk(2, dim=-1)
    return mlp.down(F.silu(gate) * up)
