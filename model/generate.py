"""The reference generator: simple, slow and obviously correct.

One request at a time, a contiguous `DenseKVCache`, one token per forward
after the prompt. The batching engine is tested token for token against it.

Sampling order: temperature 0 means argmax; otherwise logits / temperature,
then top-k, then top-p (nucleus) on the remaining probabilities, then one draw
from an explicit `torch.Generator` seeded per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from model.decoder import DenseKVCache, Transformer
from model.errors import HearthError


@dataclass
class GenerationSettings:
    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise HearthError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise HearthError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise HearthError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise HearthError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_token(logits: Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> int:
    """logits: [vocab] (any float dtype) -> one token id."""
    logits = logits.float()
    if settings.temperature == 0:
        return int(logits.argmax())
    logits = logits / settings.temperature
    if 0 < settings.top_k < logits.numel():
        kth_largest = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        sorted_probs[mass_before >= settings.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[int]:
    """Yield generated token ids until max_tokens, a stop id, or the end of the context."""
    context = model.config.max_seq_len
    if not prompt_ids:
        raise HearthError("the prompt is empty")
    if len(prompt_ids) >= context:
        raise HearthError(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context} tokens")
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    cache = DenseKVCache(model.config, 1, context, dtype=model.embed.weight.dtype, device=device)
    tokens = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    for _ in range(min(settings.max_tokens, context - len(prompt_ids))):
        logits = model(tokens, positions, cache)[0, -1]
        token = sample_token(logits, settings, generator)
        if token in settings.stop_ids:
            return
        yield token
        tokens = torch.tensor([[token]], device=device)
        positions = positions[:, -1:] + 1
