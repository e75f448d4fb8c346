"""Per-request sampling for a batch of sequences: one logits row per sequence.

    samplers = [SequenceSampler(params, prompt_ids, vocab_size, choice_index=i) for i in range(params.n)]
    results = sample_batch(logits, samplers)      # logits: [num_rows, vocab]
    for sampler, result in zip(samplers, results):
        if isinstance(result, Exception): ...     # only this sequence fails
        else: sampler.append(result.token_id)

Design choices:
- Order of operations (vLLM/HF convention): repetition penalty (CTRL: divide positive,
  multiply negative logits of tokens seen in prompt or output), then frequency and presence
  penalties (OpenAI: output tokens only), then logit_bias, then greedy argmax or
  temperature -> top-k -> softmax -> top-p -> min-p -> one draw.
- Temperature, top-k and top-p follow `model.generate.sample_token` op for op (same
  comparisons, same dtypes), so a seeded request draws bit-identical tokens to the
  reference generator (`hearth generate`) fed the same logits.
- The draw of a seeded row depends on that row's own `torch.Generator` only, never on the
  rest of the batch: it is `torch.multinomial`'s own algorithm (argmax of p / q with
  q ~ Exp(1) drawn from the row's generator over the whole vocab), which is what makes it
  equal to the reference. That costs `vocab` random numbers per row (about 2 ms for 32000
  on a CPU core, microseconds on a GPU).
- An unseeded row has nothing to reproduce, so it takes the cheap exact draw instead: one
  uniform from its generator, then inverse-CDF over the batch (`cumsum` + `searchsorted`).
  Both draws sample the same distribution.
- Greedy rows (temperature < 1e-5, as in vLLM) are one batched argmax and draw nothing.
- Logprobs are the model's raw log-softmax (before penalties, bias, temperature and
  filtering), as vLLM reports by default: they describe the model, not the sampler settings.
- Structured outputs: a sequence whose params carry a grammar has its own matcher
  (server/engine/grammar.py); after penalties and bias, the tokens its grammar forbids
  get -inf in that row only, so greedy, seeded and unseeded draws, n > 1 and batch
  invariance work unchanged. `append` advances the matcher; a refused token surfaces as
  that row's failure at its next step.
- Failures stay in their row: NaN or infinite logits, a grammar's refusal, a logit_bias
  token outside the vocabulary (a sampler used without the engine's admission) come back as
  an exception in that row's slot; the other rows are sampled as if it were absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from server.engine.types import InvalidRequestError, RequestFailedError, SamplingParams, TokenLogprob

GREEDY_TEMPERATURE = 1e-5  # temperatures below this are treated as 0 (argmax): x / 1e-6 overflows
TOP_P_CANDIDATES = (64, 1024)  # top-p tries the top 64, then 1024 tokens; rows that need more sort the vocab
_MASK64 = (1 << 64) - 1


@dataclass
class SampleResult:
    token_id: int  # the chosen token
    logprob: TokenLogprob | None = None  # raw log-softmax of it + top alternatives; None unless params.logprobs is set


class SequenceSampler:
    """The sampling state of one sequence (one choice of a request): its generator and the
    token statistics the penalties need, kept sparse (O(distinct tokens), not O(vocab))."""

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, choice_index: int = 0
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.prompt_ids = prompt_ids  # only read (once) by the repetition penalty
        self.output_ids: list[int] = []  # generated tokens, in order
        # Choice 0 uses the request seed itself, so n=1 matches the reference generator;
        # other choices get unrelated streams derived from (seed, choice_index).
        base_seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.seed = _choice_seed(base_seed, choice_index)
        self.generator: torch.Generator | None = None  # created at the first draw, on the logits' device
        self._counted_ids = _GrowingArray(np.int64)  # distinct output tokens, in order of first appearance
        self._counts = _GrowingArray(np.float64)  # occurrences of each of _counted_ids in the output
        self._count_slot: dict[int, int] = {}  # token id -> its index in _counted_ids
        self._seen_ids: _GrowingArray | None = None  # distinct prompt + output tokens (repetition penalty only)
        self._seen: set[int] = set()  # the same, for O(1) membership
        self._bias: tuple[np.ndarray, np.ndarray] | None = None  # logit_bias as (token ids, values), once checked
        self.matcher = params.grammar.new_matcher() if params.grammar is not None else None  # its own grammar state

    @property
    def is_greedy(self) -> bool:
        return self.params.temperature < GREEDY_TEMPERATURE

    @property
    def is_seeded(self) -> bool:
        return self.params.seed is not None

    @property
    def has_logit_processors(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0 or bool(p.logit_bias)

    def append(self, token_id: int) -> None:
        """Record a generated token (the penalties count it from the next step on). O(1)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        self.output_ids.append(token_id)
        if self.matcher is not None:
            self.matcher.advance(token_id)
        slot = self._count_slot.setdefault(token_id, self._counted_ids.size)
        if slot == self._counted_ids.size:
            self._counted_ids.append(token_id)
            self._counts.append(0)
        self._counts.values()[slot] += 1
        if self._seen_ids is not None and token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids.append(token_id)

    def generator_on(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        elif self.generator.device != device:
            raise RequestFailedError(f"sampler generator is on {self.generator.device}, logits on {device}")
        return self.generator

    def repetition_edit(self) -> np.ndarray:
        """Tokens the repetition penalty applies to: every distinct token of prompt and output."""
        if self.params.repetition_penalty == 1.0:
            return _NO_IDS
        if self._seen_ids is None:  # first use: O(prompt) once, then O(1) per appended token
            self._seen = set(self.prompt_ids) | set(self.output_ids)
            if self._seen and not (0 <= min(self._seen) and max(self._seen) < self.vocab_size):
                raise InvalidRequestError("prompt", f"prompt token ids must be in [0, {self.vocab_size})")
            self._seen_ids = _GrowingArray(np.int64, sorted(self._seen))
        return self._seen_ids.values()

    def penalty_edit(self) -> tuple[np.ndarray, np.ndarray]:
        """(output tokens, what to subtract from their logits): count * frequency + presence."""
        frequency, presence = self.params.frequency_penalty, self.params.presence_penalty
        if frequency == 0 and presence == 0:
            return _NO_IDS, _NO_VALUES
        return self._counted_ids.values(), self._counts.values() * frequency + presence

    def bias_edit(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, what to add to their logits) from logit_bias (checked by SamplingParams and the engine)."""
        if not self.params.logit_bias:
            return _NO_IDS, _NO_VALUES
        if self._bias is None:
            bias = self.params.logit_bias
            token_ids = np.array(list(bias), dtype=np.int64)
            if token_ids.size and not (0 <= token_ids.min() and token_ids.max() < self.vocab_size):  # would edit another row
                raise InvalidRequestError.for_field("logit_bias", f"token ids must be in [0, {self.vocab_size})")
            self._bias = (token_ids, np.array(list(bias.values()), dtype=np.float64))
        return self._bias


class _GrowingArray:
    """A 1-D numpy array with amortised O(1) append (doubling), read as a view."""

    def __init__(self, dtype, initial: list | None = None) -> None:
        initial = initial or []
        self._buffer = np.zeros(max(16, 2 * len(initial)), dtype=dtype)
        self._buffer[: len(initial)] = initial
        self.size = len(initial)  # how many entries are in use

    def append(self, value) -> None:
        if self.size == len(self._buffer):
            self._buffer = np.concatenate([self._buffer, np.zeros_like(self._buffer)])
        self._buffer[self.size] = value
        self.size += 1

    def values(self) -> np.ndarray:
        return self._buffer[: self.size]


_NO_IDS = np.zeros(0, dtype=np.int64)
_NO_VALUES = np.zeros(0, dtype=np.float64)


def _choice_seed(seed: int, choice_index: int) -> int:
    if choice_index == 0:
        return seed
    # splitmix64 of (seed, choice): neighbouring seeds and choices get unrelated streams.
    x = (seed + (choice_index * 0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


# --------------------------------------------------------------------------- the batch


def sample_batch(logits: Tensor, samplers: list[SequenceSampler]) -> list[SampleResult | Exception]:
    """logits: [num_rows, vocab] (any float dtype; computed in float32), one row per sampler.

    Returns one SampleResult per row, or the exception that failed that row. Columns past the
    samplers' vocab_size (a padded embedding) are ignored.
    """
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(samplers)} samplers")
    vocab_size = min([s.vocab_size for s in samplers] + [logits.shape[1]])
    raw = logits.float()[:, :vocab_size]  # [rows, vocab]
    failures: dict[int, Exception] = {
        row: RequestFailedError(f"sampler vocab {s.vocab_size} does not match {vocab_size} logits columns")
        for row, s in enumerate(samplers)
        if s.vocab_size != vocab_size
    }
    processed = apply_grammar_masks(raw, apply_logit_processors(raw, samplers, failures), samplers, failures)
    alive = [row for row in range(len(samplers)) if row not in failures]
    greedy = [row for row in alive if samplers[row].is_greedy]
    random = [row for row in alive if not samplers[row].is_greedy]
    tokens: dict[int, int] = {}
    for rows, row_tokens in _isolate_rows(lambda rows: _greedy_tokens(processed, rows), greedy, failures):
        tokens.update(zip(rows, row_tokens))
    for rows, probs in _isolate_rows(lambda rows: _filtered_probs(processed, rows, samplers), random, failures):
        _draw_tokens(probs, rows, samplers, tokens, failures)
    logprobs = _logprobs(raw, tokens, samplers)
    return [failures.get(row) or SampleResult(tokens[row], logprobs.get(row)) for row in range(len(samplers))]


def apply_logit_processors(
    raw: Tensor, samplers: list[SequenceSampler], failures: dict[int, Exception] | None = None
) -> Tensor:
    """raw: [rows, vocab] float32 -> logits after repetition penalty, then frequency/presence
    penalties, then logit_bias, applied to all rows at once as sparse (row, token) edits.

    raw is left intact (the logprobs use it); rows whose settings are bad go into failures."""
    failures = {} if failures is None else failures
    vocab = raw.shape[1]
    repetition, penalty, bias = _Edits(vocab), _Edits(vocab), _Edits(vocab)
    for row, sampler in enumerate(samplers):
        if row in failures or not sampler.has_logit_processors:
            continue
        try:  # gather everything first, so a bad row leaves no half-applied edits
            seen, (penalised, amounts), (biased, values) = (
                sampler.repetition_edit(), sampler.penalty_edit(), sampler.bias_edit())
        except Exception as exc:  # noqa: BLE001 -- the row fails, the batch goes on
            failures[row] = exc
            continue
        repetition.add(row, seen, np.full(len(seen), sampler.params.repetition_penalty))
        penalty.add(row, penalised, amounts)
        bias.add(row, biased, values)
    if not (repetition.flat_index or penalty.flat_index or bias.flat_index):
        return raw
    processed = raw.clone(memory_format=torch.contiguous_format)
    flat = processed.view(-1)  # edits address it as row * vocab + token: 2-D fancy indexing is 30x slower
    if repetition.flat_index:  # CTRL: shrink towards zero, whatever the sign
        index, factors = repetition.tensors(raw.device)
        logits = flat.index_select(0, index)
        flat.index_copy_(0, index, torch.where(logits > 0, logits / factors, logits * factors))
    if penalty.flat_index:
        index, amounts = penalty.tensors(raw.device)
        flat.index_copy_(0, index, flat.index_select(0, index) - amounts)
    if bias.flat_index:
        index, values = bias.tensors(raw.device)
        flat.index_copy_(0, index, flat.index_select(0, index) + values)
    return processed


def apply_grammar_masks(
    raw: Tensor, processed: Tensor, samplers: list[SequenceSampler], failures: dict[int, Exception]
) -> Tensor:
    """-inf on the tokens each constrained row's grammar forbids (rows without a grammar untouched).

    raw is left intact (the logprobs use it); a row whose grammar fails goes into failures."""
    rows, masks = [], []
    for row, sampler in enumerate(samplers):
        if row in failures or sampler.matcher is None:
            continue
        try:
            masks.append(sampler.matcher.allowed())
            rows.append(row)
        except Exception as exc:  # noqa: BLE001 -- the row fails, the batch goes on
            failures[row] = exc
    if not rows:
        return processed
    forbidden = np.zeros(raw.shape, dtype=bool)  # one elementwise pass over the batch: rows without a grammar stay False
    for row, allowed in zip(rows, masks):
        np.logical_not(allowed, out=forbidden[row])
    if processed is raw:
        processed = raw.clone(memory_format=torch.contiguous_format)
    if processed.device.type == "cpu" and processed.is_contiguous():  # numpy: single-threaded, no OpenMP wake-ups
        np.copyto(processed.numpy(), np.float32(float("-inf")), where=forbidden)
        return processed
    return processed.masked_fill_(torch.from_numpy(forbidden).to(raw.device), float("-inf"))


class _Edits:
    """(row, token, value) triples for all rows: one gather and one scatter for the batch."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.flat_index: list[np.ndarray] = []  # per row: row * vocab_size + token ids
        self.values: list[np.ndarray] = []  # per row: the factor, amount or bias of each

    def add(self, row: int, token_ids: np.ndarray, values: np.ndarray) -> None:
        if len(token_ids):
            self.flat_index.append(token_ids + row * self.vocab_size)
            self.values.append(values)

    def tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        index = torch.from_numpy(np.concatenate(self.flat_index)).to(device)
        return index, torch.from_numpy(np.concatenate(self.values).astype(np.float32)).to(device)


def _isolate_rows(
    step: Callable[[list[int]], Any], rows: list[int], failures: dict[int, Exception]
) -> list[tuple[list[int], Any]]:
    """Run a batched, side-effect-free step on rows -> [(rows, its result)]. If it raises, rerun
    it row by row so that only the culprit fails (recorded in failures)."""
    if not rows:
        return []
    try:
        return [(rows, step(rows))]
    except Exception:  # noqa: BLE001
        groups = []
        for row in rows:
            try:
                groups.append(([row], step([row])))
            except Exception as exc:  # noqa: BLE001
                failures[row] = exc
        return groups


def _take(tensor: Tensor, rows: list[int]) -> Tensor:
    if rows == list(range(tensor.shape[0])):
        return tensor
    return tensor.index_select(0, torch.tensor(rows, device=tensor.device))


def _bad_logits_error() -> RequestFailedError:
    return RequestFailedError("sampling failed: the logits are NaN or infinite (numerical overflow in the model?)")


def _greedy_tokens(processed: Tensor, rows: list[int]) -> list[int]:
    best = _take(processed, rows).max(dim=1)  # max propagates NaN, so a NaN row has a NaN max
    if not bool((best.values > float("-inf")).all()):
        raise _bad_logits_error()
    return best.indices.tolist()


# ------------------------------------------------------------------ filtering (random rows)


def _filtered_probs(processed: Tensor, rows: list[int], samplers: list[SequenceSampler]) -> Tensor:
    """-> [rows, vocab] unnormalised probabilities after temperature, top-k, top-p and min-p."""
    params = [samplers[row].params for row in rows]
    logits = _divide_by_temperature(_take(processed, rows), [p.temperature for p in params])
    logits, top_k_order = _mask_top_k(logits, [p.top_k for p in params])
    probs = torch.softmax(logits, dim=-1).contiguous()  # this call's own buffer: filtered in place
    probs = _mask_top_p(probs, [p.top_p for p in params], top_k_order)
    probs = _mask_min_p(probs, [p.min_p for p in params])
    if not bool((probs.sum(dim=1) > 0).all()):  # False for NaN (from NaN or +inf logits)
        raise _bad_logits_error()
    return probs


def _divide_by_temperature(logits: Tensor, temperatures: list[float]) -> Tensor:
    # One division per distinct temperature, by a Python scalar exactly as the reference does
    # (on CUDA a tensor / scalar is a multiply by the reciprocal, not a true division).
    if all(t == 1.0 for t in temperatures):
        return logits  # x / 1.0 == x exactly
    if len(set(temperatures)) == 1:
        return logits / temperatures[0]
    scaled = torch.empty_like(logits, memory_format=torch.contiguous_format)
    for temperature in set(temperatures):
        rows = torch.tensor([i for i, t in enumerate(temperatures) if t == temperature], device=logits.device)
        scaled.index_copy_(0, rows, logits.index_select(0, rows) / temperature)
    return scaled


TopKOrder = tuple[list[int], Tensor]  # (rows with top-k, [those rows, max k] token ids by descending logit)


def _mask_top_k(logits: Tensor, top_ks: list[int]) -> tuple[Tensor, TopKOrder | None]:
    """Mask logits below each row's k-th largest (ties with it stay), as the reference does.

    Also returns the top-k token order, which top-p reuses instead of ranking the vocab again."""
    vocab = logits.shape[1]
    rows = [i for i, k in enumerate(top_ks) if 0 < k < vocab]
    if not rows:
        return logits, None
    ks = torch.tensor([top_ks[i] for i in rows], device=logits.device)
    subset = _take(logits, rows)
    top = torch.topk(subset, int(ks.max()))  # [rows, max k], descending
    kth_largest = top.values.gather(1, (ks - 1)[:, None])  # [rows, 1]
    masked = subset.masked_fill(subset < kth_largest, float("-inf"))
    if len(rows) < logits.shape[0]:
        masked = logits.index_copy(0, torch.tensor(rows, device=logits.device), masked)
    return masked, (rows, top.indices)


def _mask_top_p(probs: Tensor, top_ps: list[float], top_k_order: TopKOrder | None = None) -> Tensor:
    """Keep the smallest prefix (by descending probability) whose mass reaches top_p.

    The reference sorts the whole vocab. Any prefix of the ranking gives the same prefix sums,
    and a row whose cut falls within it is decided: so try the top-k order when there is one
    (beyond k the probabilities are 0), then growing partial top-k's, and fully sort only the
    rows (flat distributions) still undecided.
    """
    rows = [i for i, p in enumerate(top_ps) if p < 1]
    if not rows:
        return probs
    vocab = probs.shape[1]
    if top_k_order is not None:
        position = {row: index for index, row in enumerate(top_k_order[0])}
        known = [row for row in rows if row in position]
        if known:
            order = top_k_order[1].index_select(0, torch.tensor([position[row] for row in known], device=probs.device))
            undecided = _cut_top_p(probs, known, [top_ps[i] for i in known], order)
            rows = [row for row in rows if row not in position] + undecided
    for candidates in TOP_P_CANDIDATES:
        if not rows:
            break
        rows = _cut_top_p(probs, rows, [top_ps[i] for i in rows], min(candidates, vocab))
    if rows:
        _cut_top_p(probs, rows, [top_ps[i] for i in rows], vocab)
    return probs


def _cut_top_p(probs: Tensor, rows: list[int], top_ps: list[float], candidates: int | Tensor) -> list[int]:
    """Zero the top-p tail of probs[rows] in place, ranking either the top `candidates` tokens
    or the given token order [rows, n]; return the rows whose cut lies past the ranked ones."""
    vocab = probs.shape[1]
    subset = _take(probs, rows)
    if isinstance(candidates, Tensor):
        order, sorted_probs = candidates, subset.gather(1, candidates)
    elif candidates == vocab:
        sorted_probs, order = subset.sort(dim=1, descending=True)
    else:
        sorted_probs, order = subset.topk(candidates, dim=1)  # [rows, candidates], most likely first
    mass_before = sorted_probs.cumsum(dim=1) - sorted_probs
    top_p = torch.tensor(top_ps, dtype=probs.dtype, device=probs.device)[:, None]
    cut = mass_before >= top_p  # compared in float32, as the reference compares with a Python float
    decided = (cut[:, -1] | (order.shape[1] == vocab)).tolist()
    done = torch.tensor([i for i, d in enumerate(decided) if d], dtype=torch.long, device=probs.device)
    done_rows = torch.tensor(rows, device=probs.device).index_select(0, done)
    # Zero the decided rows, then write back the kept candidates: row * vocab + token.
    probs.index_fill_(0, done_rows, 0)
    flat_index = (done_rows[:, None] * vocab + order.index_select(0, done)).view(-1)
    kept = sorted_probs.index_select(0, done).masked_fill(cut.index_select(0, done), 0)
    probs.view(-1).index_copy_(0, flat_index, kept.view(-1))
    return [row for row, d in zip(rows, decided) if not d]


def _mask_min_p(probs: Tensor, min_ps: list[float]) -> Tensor:
    """Zero tokens whose probability is below min_p times the row's largest."""
    if all(p == 0 for p in min_ps):
        return probs
    min_p = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device)[:, None]
    threshold = probs.max(dim=1, keepdim=True).values * min_p  # [rows, 1]; 0 where min_p is off
    return probs.masked_fill_(probs < threshold, 0)


# ------------------------------------------------------------------------------ the draw


def _draw_tokens(
    probs: Tensor, rows: list[int], samplers: list[SequenceSampler], tokens: dict[int, int], failures: dict[int, Exception]
) -> None:
    """probs: [rows, vocab]. Seeded rows draw like the reference; unseeded rows draw cheaply."""
    generators: dict[int, torch.Generator] = {}
    for index, row in enumerate(rows):
        # Seeded: on the logits' device, as the reference does; unseeded: the uniform comes from the CPU.
        device = probs.device if samplers[row].is_seeded else torch.device("cpu")
        try:
            generators[index] = samplers[row].generator_on(device)
        except Exception as exc:  # noqa: BLE001 -- e.g. logits moved to another device mid-request
            failures[rows[index]] = exc
    seeded = [i for i in generators if samplers[rows[i]].is_seeded]
    unseeded = [i for i in generators if not samplers[rows[i]].is_seeded]
    for indices, draw in ((seeded, _draw_exponential_race), (unseeded, _draw_inverse_cdf)):
        if indices:
            chosen = draw(_take(probs, indices), [generators[i] for i in indices])
            tokens.update((rows[i], token) for i, token in zip(indices, chosen))


def _draw_exponential_race(probs: Tensor, generators: list[torch.Generator]) -> list[int]:
    """torch.multinomial(p, 1) exactly: argmax(p / q), q ~ Exp(1) from each row's own generator."""
    noise = torch.empty_like(probs)  # [rows, vocab]
    for index, generator in enumerate(generators):
        noise[index].exponential_(generator=generator)
    return (probs / noise).argmax(dim=1).tolist()


def _draw_inverse_cdf(probs: Tensor, generators: list[torch.Generator]) -> list[int]:
    """One uniform per row from its own (CPU) generator; the first token whose CDF exceeds it."""
    uniforms = torch.cat([torch.rand(1, generator=generator) for generator in generators])
    # In place: probs is this call's own buffer, and one fewer [rows, vocab] allocation per step
    # matters (fresh pages cost more than the cumsum on a VM).
    cdf = probs.cumsum_(dim=1)  # [rows, vocab]; a zero-probability token never strictly raises it
    totals = cdf[:, -1:]
    chosen = torch.searchsorted(cdf, uniforms.to(probs.device)[:, None] * totals, right=True)[:, 0].tolist()
    for index, token in enumerate(chosen):
        if token >= probs.shape[1]:  # u * total rounded up to total: the last token with p > 0,
            chosen[index] = int(torch.searchsorted(cdf[index], totals[index]))  # where the CDF first reaches it
    return chosen


# ------------------------------------------------------------------------------ logprobs


def _logprobs(raw: Tensor, tokens: dict[int, int], samplers: list[SequenceSampler]) -> dict[int, TokenLogprob]:
    rows = [row for row in tokens if samplers[row].params.logprobs is not None]
    if not rows:
        return {}
    logits = _take(raw, rows)  # [rows, vocab]
    # log_softmax = logit - logsumexp: one reduction, no [rows, vocab] result to allocate.
    log_normalizer = torch.logsumexp(logits, dim=1, keepdim=True)  # [rows, 1]
    chosen_ids = torch.tensor([tokens[row] for row in rows], device=raw.device)
    chosen = (logits.gather(1, chosen_ids[:, None]) - log_normalizer)[:, 0].tolist()
    num_top = min(max(samplers[row].params.logprobs for row in rows), raw.shape[1])
    top_values, top_ids = [[]] * len(rows), [[]] * len(rows)
    if num_top:
        top = logits.topk(num_top, dim=1)  # sorted, most likely first
        top_values, top_ids = (top.values - log_normalizer).tolist(), top.indices.tolist()
    results = {}
    for index, row in enumerate(rows):
        k = samplers[row].params.logprobs
        results[row] = TokenLogprob(tokens[row], chosen[index], list(zip(top_ids[index][:k], top_values[index][:k])))
    return results
