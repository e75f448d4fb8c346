"""CPU fast path: pre-packed matmuls, q/k/v and gate/up fused (quantized ones too).

Design choices:
- A decode step is a series of GEMVs over the weights, so its speed is weight
  bytes per second plus per-call overhead. PyTorch's default bf16 linear on CPU
  re-reads the plain [out, in] layout poorly (measured 2-10x slower than oneDNN
  on a weight packed once into its blocked layout, worst on the 32000-wide LM
  head), and every call costs ~15 us before it reads a byte.
- So, for a bf16 model on CPU, the worker swaps in modules that compute the
  same thing with fewer, packed matmuls: q, k and v as one matmul, gate and up
  as one, o, down and the LM head packed alone: 4 calls per layer instead of 7.
- The matmul is Hearth's native bf16 kernel where it runs (model/native.py:
  1.4-1.6x oneDNN for the 1-2 rows of a decode step, and every output row
  computed the same way whatever the row count, so batch invariance holds by
  construction), else oneDNN's. oneDNN's rows are not always independent of the
  row count: with K = 3072 (the `small` down projection) a row's low bits change
  with M. Results match the plain model's within bf16 rounding (tested), not bit
  for bit: the fp32 sums run in another order.
- On the native fp32 path (AVX2, NEON: model/native.py) the engine's body is
  fp32 and a linear whose fp32 weight holds bf16 values exactly (a bf16
  checkpoint loaded as fp32) is packed in bf16, read at half the bytes, with
  results equal to the fp32 matmul's up to the sum order; a weight that is truly
  fp32 (the exactness tests' models) stays an nn.Linear. There the SwiGLU is the
  native one too (`native.silu_mul`), so the modules and the one-call decoder
  agree bit for bit.
- int8 per-channel layers go to the native int8 kernel where it runs (2x
  `_weight_int8pack_mm` for a decode step's rows, batch invariant the same way),
  stacked and packed straight into its tiles; int4 layers with groups of a
  multiple of 32 to the native int4 kernel (1.2-2.4x `_weight_int4pack_mm_for_cpu`),
  the same way. Other quantized layers keep
  model/quant.py's kernels, but q/k/v and gate/up are stacked into one quantized
  matmul each (`QuantizedLinear.stacked`: each output column still reads only
  its own row, scales and zeros), so a quantized model also makes 4 calls per
  layer instead of 7.
- RMSNorm (25 calls a step, nine small ops each) becomes one native call where
  the kernel runs, with model.decoder.RMSNorm's steps and roundings.
- The fused modules keep model.decoder's call signatures, so `Transformer`
  runs them unchanged; their forward mirrors the original's few lines.
- When every layer ended up native (bf16, int8 per-channel or int4 weights, the paged
  cache's native attention), `NativeDecoder` runs all of a step's layers in one
  native call (model/csrc/decoder_layers.c) over the same packed weights: the
  same kernels in the same order, without ~12 Python-level calls a layer
  (~1.5 ms of a decode step). FusedBlock stays the path everywhere else.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import native
from model.decoder import MLP, Attention, Block, KVCache, RMSNorm, Transformer, apply_rope
from model.quant import QuantizedLinear
from model.quant_kernels import QuantizedWeight
from server.engine.kv_cache import PagedKVCache


def has_onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a model whose body runs in `dtype` on `device` gets the packed modules."""
    if device.type != "cpu":
        return False
    return dtype == native.activation_dtype() or (dtype == torch.bfloat16 and has_onednn_bf16())


def holds_bf16_values(weight: Tensor) -> bool:
    """An fp32 weight every element of which is a bf16 (a bf16 checkpoint loaded as fp32)."""
    return weight.dtype == torch.float32 and torch.equal(weight.to(torch.bfloat16).float(), weight)


def is_plain_bf16_linear(module: nn.Module) -> bool:
    """A bias-free linear with bf16 weights, or, on the native fp32 path, fp32 weights holding bf16 values."""
    if type(module) is not nn.Linear or module.bias is not None:
        return False
    weight = module.weight
    if weight.dtype == torch.bfloat16:
        return native.activation_dtype() == torch.bfloat16 or has_onednn_bf16()
    return native.is_fp32_path() and native.linear_bf16_kernel() is not None and holds_bf16_values(weight.detach())


class PackedLinear(nn.Module):
    """y = x @ W.T for a bias-free bf16 weight (several stacked by rows), packed once.

    With the native kernel (model/native.py) the weight is packed into its
    tiles (bf16 on both paths; on the fp32 path the weight is an fp32 one holding
    bf16 values); without it (another CPU, no C compiler, HEARTH_NATIVE_KERNELS=0),
    into oneDNN's blocked layout. `kernel` says which.
    """

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        weight = torch.cat([linear.weight.detach() for linear in linears])  # [sum of out, in]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # Plain attributes, not parameters or buffers: nothing trains or saves them.
        if native.linear_bf16_kernel() is not None and weight.dtype == native.activation_dtype():
            self.kernel, self.packed_weight = "native", native.pack_bf16_weight(weight)
        else:  # an opaque MKLDNN tensor
            self.kernel, self.packed_weight = "onednn", torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "native":
            return native.linear_bf16(x, self.packed_weight, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")


def is_native_int8(module: nn.Module) -> bool:
    """An int8 layer the native int8 kernel can take (unless pinned to the reference): one scale per
    row, or, on the fp32 path, per group of an even size."""
    if type(module) is not QuantizedLinear or module.spec.method != "int8" or module.kernel != "auto":
        return False
    group_size = module.spec.group_size
    grouping_fits = group_size is None or (native.is_fp32_path() and group_size % 2 == 0)
    return grouping_fits and module.scales.device.type == "cpu" and native.linear_int8_kernel() is not None


class PackedInt8Linear(nn.Module):
    """y = x @ (codes * scales).T for int8 per-channel layers (several stacked by rows), in the
    native int8 kernel's tiles. It replaces the QuantizedLinears in the engine, so their weights
    are held once, in the tiled layout only (nothing here is saved)."""

    def __init__(self, *layers: QuantizedLinear, weights: list[QuantizedWeight] | None = None):
        super().__init__()
        weights = weights or [layer.quantized_weight() for layer in layers]
        codes = torch.cat([w.data for w in weights])  # [sum of out, in]
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.group_size = weights[0].group_size or 0  # 0: one scale per output row
        self.packed = native.pack_int8_weight(codes, torch.cat([w.scales for w in weights]))

    def forward(self, x: Tensor) -> Tensor:
        return native.linear_int8(x, self.packed, self.out_features, self.group_size)


def is_native_int4(module: nn.Module) -> bool:
    """An int4 layer the native int4 kernel can take: group size a multiple of 32 (unless pinned to the reference)."""
    return (type(module) is QuantizedLinear and module.spec.method == "int4" and module.spec.group_size is not None
            and module.spec.group_size % 32 == 0 and module.kernel == "auto" and module.scales.device.type == "cpu"
            and native.linear_int4_kernel() is not None)


class PackedInt4Linear(nn.Module):
    """y = x @ W.T for int4 layers of one group size (several stacked by rows), W = (q - 8) * scale + zero
    per group, in the native int4 kernel's tiles; held once, in that layout only (nothing here is saved)."""

    def __init__(self, *layers: QuantizedLinear, weights: list[QuantizedWeight] | None = None):
        super().__init__()
        from model.quant_kernels import unpack_nibbles

        weights = weights or [layer.quantized_weight() for layer in layers]
        codes = torch.cat([unpack_nibbles(w.data) for w in weights])  # [sum of out, in] uint8
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.group_size = weights[0].group_size
        self.packed = native.pack_int4_weight(codes, torch.cat([w.scales for w in weights]),
                                              torch.cat([w.zeros for w in weights]))

    def forward(self, x: Tensor) -> Tensor:
        return native.linear_int4(x, self.packed, self.out_features, self.group_size)


def fused_linear(*linears: nn.Module) -> nn.Module | None:
    """One module computing `linears` (same input) stacked by rows, or None when they cannot be fused:
    plain bf16 linears become one packed matmul (native or oneDNN), int8 per-channel ones one native
    int8 matmul where it runs, other quantized ones of one method and group size one quantized
    matmul (`QuantizedLinear.stacked`, exact per output column)."""
    if all(is_plain_bf16_linear(m) for m in linears):
        return PackedLinear(*linears)
    if all(is_native_int8(m) for m in linears) and len({(m.spec, m.in_features) for m in linears}) == 1:
        return PackedInt8Linear(*linears)
    if all(is_native_int4(m) for m in linears) and len({(m.spec, m.in_features) for m in linears}) == 1:
        return PackedInt4Linear(*linears)
    if all(type(m) is QuantizedLinear for m in linears) and len({(m.spec, m.in_features) for m in linears}) == 1:
        return linears[0] if len(linears) == 1 else QuantizedLinear.stacked(*linears)
    return None


class FusedAttention(nn.Module):
    """model.decoder.Attention with q, k, v computed by one matmul. On the engine's paged cache with
    the native kernels (bf16), rotary, the cache write and attention are two native calls."""

    def __init__(self, attention: Attention, qkv: nn.Module, o: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.qkv, self.o = qkv, o

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor,
                cache: KVCache | None, layer: int) -> Tensor:
        batch, seq_len, _ = x.shape
        heads, kv_heads = self.n_heads, self.n_kv_heads
        if getattr(cache, "uses_native_kernel", False) and batch == 1 and rope[0].dtype == native.activation_dtype():
            cos, sin = (t[0, 0] for t in rope)  # [1, 1, T, hd] -> [T, hd]
            out = cache.attend_qkv(layer, self.qkv.forward(x[0]), cos, sin, heads)  # [T, H * hd]
            return self.o.forward(out)[None]
        # [B, T, (H + 2 KV) * hd] -> [B, T, H + 2 KV, hd]; rotate q and k heads in one go
        qkv = self.qkv(x).view(batch, seq_len, heads + 2 * kv_heads, self.head_dim)
        cos, sin = (t.transpose(1, 2) for t in rope)  # [B, 1, T, hd] -> [B, T, 1, hd]
        qk = apply_rope(qkv[:, :, :heads + kv_heads], cos, sin)
        # [B, T, heads, hd] -> [B, heads, T, hd] (views)
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
        v = qkv[:, :, heads + kv_heads:].transpose(1, 2)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        else:
            out = cache.attend(layer, q, k, v, positions)
        # [B, H, T, hd] -> [B, T, H*hd]
        return self.o(out.transpose(1, 2).reshape(batch, seq_len, -1))


class FusedMLP(nn.Module):
    """model.decoder.MLP (SwiGLU) with gate and up computed by one matmul; on the native fp32 path
    with the native SwiGLU (the one-call decoder's, so both give the same bits)."""

    def __init__(self, mlp: MLP, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.ffn_dim = mlp.gate.out_features
        self.gate_up, self.down = gate_up, down
        on_cpu = all(t.device.type == "cpu" for t in (*mlp.parameters(), *mlp.buffers()))
        self.native_swiglu = on_cpu and native.is_fp32_path() and self.ffn_dim % 8 == 0 and native.silu_mul_kernel() is not None

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up.forward(x)
        if self.native_swiglu and gate_up.dtype == torch.float32:
            return self.down.forward(native.silu_mul(gate_up, self.ffn_dim))
        gate, up = gate_up.split(self.ffn_dim, dim=-1)
        return self.down.forward(F.silu(gate) * up)


class NativeRMSNorm(nn.Module):
    """model.decoder.RMSNorm in one native call (same steps and roundings, its own sum order)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight.detach().contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return native.rms_norm(x, self.weight, self.eps)


def can_use_native_norm(module: nn.Module) -> bool:
    if type(module) is not RMSNorm:
        return False
    weight = module.weight
    return (weight.dtype == native.activation_dtype() and weight.device.type == "cpu" and weight.shape[0] % 16 == 0
            and native.rms_norm_kernel() is not None)


class FusedBlock(nn.Module):
    """model.decoder.Block over the fused modules, calling their `forward` directly.

    Why: nn.Module.__call__ costs ~1.2 us over `forward` (hook bookkeeping; bench_decode_step.py
    --part calls) and a decode step made ~110 such calls; nothing registers hooks on the engine's
    swapped-in modules. The fused attention and
    MLP call their matmuls' `forward` directly too.
    """

    def __init__(self, block: Block):
        super().__init__()
        self.layer = block.layer
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = block.attn_norm, block.attn, block.mlp_norm, block.mlp

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor, cache: KVCache | None) -> Tensor:
        x = x + self.attn.forward(self.attn_norm.forward(x), rope, positions, cache, self.layer)
        return x + self.mlp.forward(self.mlp_norm.forward(x))


def tied_quantized_head(model: nn.Module) -> nn.Module | None:
    """A native matmul over the stored codes of a quantized embedding that the LM head is tied to
    (GGUF files store token_embd Q8_0 or Q4_x), or None. Why: the embedding is dequantized at load
    (into the body's dtype: fp32 on the fp32 path, values no bf16 holds), and a float LM head would
    read 2-4 bytes a weight every step where the codes take about one (int8) or 0.6 (int4)."""
    embed, head = getattr(model, "embed", None), getattr(model, "lm_head", None)
    stored = getattr(embed, "stored", None)
    if stored is None or type(head) is not nn.Linear or head.weight is not embed.weight or stored.data.device.type != "cpu":
        return None
    group_size = stored.group_size
    if stored.method == "int8" and native.linear_int8_kernel() is not None and (
            group_size is None or (native.is_fp32_path() and group_size % 2 == 0)):
        return PackedInt8Linear(weights=[stored])
    if stored.method == "int4" and native.linear_int4_kernel() is not None and group_size % 32 == 0:
        return PackedInt4Linear(weights=[stored])
    return None


def pack_model(model: nn.Module) -> int:
    """Swap in the fused, packed modules wherever the layers are plain bf16 -> packed matmuls made."""
    head = tied_quantized_head(model)
    if head is not None:
        model.lm_head = head
    count = int(head is not None)
    for name, child in list(model.named_children()):
        replacement = packed_replacement(child)
        if replacement is None:
            count += pack_model(child)
            if type(child) is Block and isinstance(child.attn, FusedAttention) and isinstance(child.mlp, FusedMLP):
                setattr(model, name, FusedBlock(child))
        else:
            setattr(model, name, replacement)
            count += sum(1 for m in replacement.modules()
                         if isinstance(m, (PackedLinear, PackedInt8Linear, PackedInt4Linear, QuantizedLinear)))
    return count


def packed_replacement(module: nn.Module) -> nn.Module | None:
    if type(module) is Attention:
        qkv, o = fused_linear(module.q, module.k, module.v), fused_linear(module.o)
        return FusedAttention(module, qkv, o) if qkv is not None and o is not None else None
    if type(module) is MLP:
        gate_up, down = fused_linear(module.gate, module.up), fused_linear(module.down)
        return FusedMLP(module, gate_up, down) if gate_up is not None and down is not None else None
    if is_plain_bf16_linear(module):
        return PackedLinear(module)
    if is_native_int8(module):  # a quantized LM head
        return PackedInt8Linear(module)
    if is_native_int4(module):
        return PackedInt4Linear(module)
    if can_use_native_norm(module):
        return NativeRMSNorm(module)
    return None


def native_linear_weights(module: nn.Module) -> native.LinearWeights | None:
    """A native packed matmul as csrc/decoder_layers.c takes it, or None for any other kind."""
    if type(module) is PackedLinear and module.kernel == "native":
        return native.LinearWeights(native.BF16_KIND, module.out_features, module.in_features,
                                    module.packed_weight.data_ptr(), None)
    if type(module) is PackedInt8Linear:
        tiles, scales = module.packed
        return native.LinearWeights(native.INT8_KIND, module.out_features, module.in_features, tiles.data_ptr(),
                                    scales.data_ptr(), module.group_size)
    if type(module) is PackedInt4Linear:
        return native.LinearWeights(native.INT4_KIND, module.out_features, module.in_features,
                                    module.packed.data_ptr(), None, module.group_size)
    return None


def native_layer_weights(block: nn.Module, keys: Tensor, values: Tensor, eps: float) -> native.LayerWeights | None:
    """A FusedBlock whose norms and matmuls are all native, as csrc/decoder_layers.c takes it, or None."""
    if type(block) is not FusedBlock or type(block.attn) is not FusedAttention or type(block.mlp) is not FusedMLP:
        return None
    norms = (block.attn_norm, block.mlp_norm)
    if any(type(norm) is not NativeRMSNorm or norm.eps != eps for norm in norms):
        return None
    linears = [native_linear_weights(m) for m in (block.attn.qkv, block.attn.o, block.mlp.gate_up, block.mlp.down)]
    if any(linear is None for linear in linears):
        return None
    return native.LayerWeights(norms[0].weight.data_ptr(), norms[1].weight.data_ptr(), *linears,
                               keys.data_ptr(), values.data_ptr())


class NativeDecoder:
    """All the decoder layers of a step in one native call (model/csrc/decoder_layers.c).

    It holds pointers into the packed model's weights and the cache's KV tensors, which both
    live as long as the worker; `build` returns None unless every layer is native.
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, layers: ctypes.Array):
        self.model, self.cache, self.layers = model, cache, layers
        config = model.config
        # cos and sin of every position, once: model.rope's values (elementwise, so the same bits as
        # computing a step's positions), ~40 us a step saved; the engine admits no position beyond
        with torch.inference_mode():
            cos, sin = model.rope(torch.arange(config.max_seq_len)[None])  # [1, 1, max_seq_len, hd]
        self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()
        self.shape = dict(dim=config.dim, ffn_dim=config.ffn_dim, kv_head_stride=cache.keys.stride(1),
                          n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
                          block_size=cache.block_size, norm_eps=config.norm_eps, attention_scale=cache.scale)

    @classmethod
    def build(cls, model: Transformer, cache: PagedKVCache) -> NativeDecoder | None:
        config = model.config
        if (not getattr(cache, "uses_native_kernel", False) or config.dim % 16 or config.ffn_dim % 16
                or native.decoder_layers_kernel() is None):
            return None
        layers = [native_layer_weights(block, cache.keys[i], cache.values[i], config.norm_eps)
                  for i, block in enumerate(model.layers)]
        if any(layer is None for layer in layers):
            return None
        return cls(model, cache, (native.LayerWeights * len(layers))(*layers))

    def hidden_states(self, tokens: Tensor, positions: Tensor, lora_groups: ctypes.Array | None = None) -> Tensor:
        """tokens, positions: [N] -> final-normed hidden states [N, dim], rows as `cache.metadata` lays them out;
        `lora_groups` (server/engine/lora.py's LoRAStep.native_groups): the step's adapters and their rows."""
        x = self.model.embed(tokens).to(native.activation_dtype()).contiguous()  # [N, dim], updated in place
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)  # [N, hd]
        meta = self.cache.metadata
        rows = meta.native
        step = native.StepShape(**self.shape, cos=cos.data_ptr(), sin=sin.data_ptr(),
                                slots=meta.slot_mapping.data_ptr(), block_ids=rows.block_ids.data_ptr(),
                                table_offsets=rows.table_offsets.data_ptr(), positions=rows.positions.data_ptr(),
                                lora_groups=ctypes.addressof(lora_groups) if lora_groups else None,
                                num_lora_groups=len(lora_groups) if lora_groups else 0)
        native.decoder_layers(x, self.layers, step)
        return self.model.norm.forward(x)
