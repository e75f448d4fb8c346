"""sample_batch and SequenceSampler against naive per-row references and model.generate.sample_token."""

import math
from collections import Counter

import pytest
import torch

from model.generate import GenerationSettings, sample_token
from server.engine.sampling import SequenceSampler, _filtered_probs, apply_logit_processors, sample_batch
from server.engine.types import InvalidRequestError, RequestFailedError, SamplingParams

VOCAB = 300


def make(vocab=VOCAB, prompt=(1, 2, 3), choice_index=0, **params) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**params), list(prompt), vocab, choice_index)


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draw_many(sampler: SequenceSampler, logits: torch.Tensor, count: int) -> Counter:
    """Sample `count` tokens from one logits row [vocab]: batches whose rows all use this sampler
    (each row draws from its generator in turn)."""
    counts = Counter()
    for start in range(0, count, 100):
        rows = min(100, count - start)
        counts.update(result.token_id for result in sample_batch(logits.expand(rows, -1), [sampler] * rows))
    return counts


# ------------------------------------------------------------------ equivalence with the reference

REFERENCE_CASES = [
    dict(),  # temperature 1, no filtering
    dict(temperature=0),
    dict(top_k=20),
    dict(top_p=0.9),
    dict(top_p=0.999),  # flat tail: the cut lies past the partial candidates, full sort
    dict(temperature=0.7, top_k=50, top_p=0.8),
    dict(temperature=1.6, top_p=0.5),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_seeded_rows_draw_exactly_what_the_reference_sampler_draws(case):
    steps, vocab = 10, 1000
    logits = random_logits(steps, vocab, seed=1, scale=2.5)
    settings = GenerationSettings(**case)
    for seed in (0, 123):
        reference_generator = torch.Generator().manual_seed(seed)
        expected = [sample_token(logits[step], settings, reference_generator) for step in range(steps)]
        sampler = make(vocab, seed=seed, **case)
        neighbours = [make(vocab, seed=99, temperature=0.5, top_k=5), make(vocab, temperature=0), make(vocab, top_p=0.3)]
        got = []
        for step in range(steps):
            row = step % 4  # a different position in the batch each step
            batch_samplers = neighbours[:row] + [sampler] + neighbours[row:]
            batch = random_logits(4, vocab, seed=100 + step)
            batch[row] = logits[step]
            result = sample_batch(batch, batch_samplers)[row]
            sampler.append(result.token_id)
            got.append(result.token_id)
        assert got == expected


def test_bfloat16_logits_are_sampled_in_float32_like_the_reference():
    logits = random_logits(1, 1000, seed=3).bfloat16()
    expected = sample_token(logits[0], GenerationSettings(top_k=40), torch.Generator().manual_seed(5))
    assert sample_batch(logits, [make(1000, seed=5, top_k=40)])[0].token_id == expected


# ------------------------------------------------------------------ reproducibility and choices


def run_sequence(sampler: SequenceSampler, steps: int, batch_builder) -> list[int]:
    """Sample `steps` tokens for sampler, each step inside a batch that batch_builder makes."""
    tokens = []
    for step in range(steps):
        others = batch_builder(step)
        row = step % (len(others) + 1)
        samplers = others[:row] + [sampler] + others[row:]
        logits = random_logits(len(samplers), seed=1000 + step)
        logits[row] = random_logits(1, seed=step)[0]  # this sequence's own logits
        result = sample_batch(logits, samplers)[row]
        sampler.append(result.token_id)
        tokens.append(result.token_id)
    return tokens


FILTERS_AND_PENALTIES = dict(seed=11, top_p=0.8, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5)


@pytest.mark.parametrize("params", [dict(seed=11), FILTERS_AND_PENALTIES], ids=["default", "filters+penalties"])
def test_seeded_sequence_is_the_same_whatever_the_batch(params):
    alone = run_sequence(make(**params), 15, lambda step: [])
    crowded = run_sequence(
        make(**params),
        15,
        lambda step: [make(seed=step), make(temperature=0), make(top_k=3, seed=5), make(logit_bias={7: 5.0}),
                      make(top_p=0.2)][: step % 6],
    )
    assert alone == crowded
    assert len(set(alone)) > 3  # really random, not a constant


def test_n_choices_differ_but_each_reproduces():
    def choices():
        samplers = [make(seed=42, choice_index=i) for i in range(4)]
        return [run_sequence(sampler, 10, lambda step: []) for sampler in samplers]
    first = choices()
    assert len({tuple(tokens) for tokens in first}) == 4
    assert choices() == first
    assert run_sequence(make(seed=43), 10, lambda step: []) != first[0]


def test_unseeded_samplers_differ():
    runs = {tuple(run_sequence(make(), 10, lambda step: [])) for _ in range(3)}
    assert len(runs) == 3


# ------------------------------------------------------------------ each parameter's effect


def test_greedy_is_the_argmax_and_draws_no_randomness():
    logits = random_logits(6, seed=5)
    samplers = [make(temperature=0, seed=1) for _ in range(6)]
    results = sample_batch(logits, samplers)
    assert [r.token_id for r in results] == logits.argmax(dim=1).tolist()
    assert all(s.generator is None for s in samplers)  # no generator was ever needed


def test_tiny_temperatures_are_greedy():
    logits = random_logits(1, seed=6)
    assert sample_batch(logits, [make(temperature=1e-7)])[0].token_id == int(logits.argmax())


@pytest.mark.parametrize("seeded", [True, False])
def test_draws_follow_the_distribution(seeded):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    sampler = make(4, seed=3 if seeded else None)
    counts = draw_many(sampler, probs.log(), 4000)
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.03


@pytest.mark.parametrize("seeded", [True, False])
def test_top_k_restricts_the_support(seeded):
    logits = random_logits(1, 50, seed=7, scale=0.3)[0]  # flat: without top-k, all 50 show up
    drawn = draw_many(make(50, top_k=4, seed=1 if seeded else None), logits, 600)
    assert set(drawn) == set(logits.topk(4).indices.tolist())


@pytest.mark.parametrize("seeded", [True, False])
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(seeded):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    seed = 1 if seeded else None
    assert set(draw_many(make(4, top_p=0.75, seed=seed), logits, 400)) == {0, 1}
    assert set(draw_many(make(4, top_p=0.85, seed=seed), logits, 400)) == {0, 1, 2}
    assert set(draw_many(make(4, top_p=0.3, seed=seed), logits, 50)) == {0}
    uniform = torch.zeros(4)  # probabilities exactly 0.25: two tokens reach 0.5, a third is not needed
    assert len(draw_many(make(4, top_p=0.5, seed=seed), uniform, 200)) == 2


@pytest.mark.parametrize("seeded", [True, False])
def test_min_p_drops_tokens_far_below_the_best(seeded):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    seed = 1 if seeded else None
    assert set(draw_many(make(4, min_p=0.5, seed=seed), logits, 400)) == {0, 1}  # keep p >= 0.25
    assert set(draw_many(make(4, min_p=0.2, seed=seed), logits, 400)) == {0, 1, 2}  # keep p >= 0.1


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 0.0, -1.0])
    cold = draw_many(make(3, temperature=0.25, seed=1), logits, 500)
    hot = draw_many(make(3, temperature=4.0, seed=1), logits, 500)
    assert cold[0] > 480 and hot[2] > 100


def naive_filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row, the reference's way: temperature, top-k, softmax, top-p by a full sort, min-p."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, params.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= params.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs.masked_fill(probs < probs.max() * params.min_p, 0)


def test_batched_filtering_matches_a_naive_per_row_reference():
    rng = torch.Generator().manual_seed(8)
    params = []
    for _ in range(24):
        pick = torch.rand(4, generator=rng).tolist()
        params.append(SamplingParams(
            temperature=[0.5, 1.0, 1.7][int(pick[0] * 3)],
            top_k=[0, 5, 200, 5000][int(pick[1] * 4)],
            top_p=[1.0, 0.95, 0.5, 0.999][int(pick[2] * 4)],
            min_p=[0.0, 0.1][int(pick[3] * 2)],
        ))
    logits = random_logits(24, 3000, seed=9, scale=2.0)
    logits[::3] *= 4  # some peaky rows (top-p decided within the candidates), some flat ones
    samplers = [SequenceSampler(p, [], 3000) for p in params]
    batched = _filtered_probs(logits, list(range(24)), samplers)
    for row, p in enumerate(params):
        assert torch.equal(batched[row], naive_filtered_probs(logits[row], p)), f"row {row}: {p}"


def test_top_k_ties_keep_every_tied_token_before_top_p():
    # Four tokens tie at the 2nd-largest logit: top-k keeps all of them, as the reference does,
    # so top-p must look past the k ranked tokens it reuses.
    logits = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0, 4.0]])
    params = SamplingParams(top_k=2, top_p=0.99)
    probs = _filtered_probs(logits, [0], [SequenceSampler(params, [], 7)])
    assert torch.equal(probs[0], naive_filtered_probs(logits[0], params))
    assert (probs[0] > 0).tolist() == [True, True, True, True, False, False, True]


# ------------------------------------------------------------------ penalties and logit_bias


def naive_processed(logits: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams) -> torch.Tensor:
    logits = logits.clone()
    for token in set(prompt) | set(output):
        value = logits[token].item()
        logits[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
    for token, count in Counter(output).items():
        logits[token] -= count * params.frequency_penalty + params.presence_penalty
    for token, bias in params.logit_bias.items():
        logits[token] += bias
    return logits


def test_penalties_and_bias_follow_the_exact_formulas():
    cases = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.7),
        dict(frequency_penalty=0.6),
        dict(presence_penalty=-1.5),
        dict(frequency_penalty=0.4, presence_penalty=0.9, repetition_penalty=1.2, logit_bias={5: -3.0, 250: 7.5}),
        dict(logit_bias={0: 100.0}),
        dict(),  # untouched
    ]
    logits = random_logits(len(cases), seed=10)
    prompt = [3, 3, 17, 40, 299]
    outputs = [[5, 5, 5, 17, 99, 250], [1], [7, 7, 8], [], [5, 6, 40, 40], [2], [4]]
    samplers = []
    for params, output in zip(cases, outputs):
        sampler = make(prompt=prompt, **params)
        for token in output:
            sampler.append(token)
        samplers.append(sampler)
    processed = apply_logit_processors(logits, samplers)
    for row, (params, output) in enumerate(zip(cases, outputs)):
        expected = naive_processed(logits[row], prompt, output, SamplingParams(**params))
        torch.testing.assert_close(processed[row], expected, rtol=0, atol=1e-6)
    assert not torch.equal(processed[:6], logits[:6])  # every case but the last changed something
    assert torch.equal(processed[6], logits[6])


def test_penalty_state_updates_incrementally():
    sampler = make(prompt=[], frequency_penalty=1.0)
    logits = torch.zeros(1, VOCAB)
    for step in range(1, 4):
        sampler.append(9)
        assert apply_logit_processors(logits, [sampler])[0, 9].item() == -step


def test_frequency_penalty_stops_greedy_repetition():
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    plain, penalised = make(10, temperature=0), make(10, temperature=0, frequency_penalty=2.0)
    for _ in range(3):
        for sampler in (plain, penalised):
            sampler.append(sample_batch(logits, [sampler])[0].token_id)
    assert plain.output_ids == [3, 3, 3]
    assert penalised.output_ids[0] == 3 and penalised.output_ids[1] != 3


@pytest.mark.parametrize("params", [dict(temperature=0), dict(seed=1), dict()], ids=["greedy", "seeded", "unseeded"])
def test_logit_bias_forces_a_token(params):
    logits = random_logits(1, seed=11)
    forced = int(logits.argmin())
    sampler = make(logit_bias={forced: 100.0}, **params)
    assert set(draw_many(sampler, logits[0], 30)) == {forced}


# ------------------------------------------------------------------ logprobs


def test_logprobs_are_the_raw_log_softmax_with_a_sorted_top_list():
    logits = random_logits(3, seed=12)
    samplers = [make(logprobs=5, seed=1, temperature=0.5, logit_bias={4: 3.0}), make(logprobs=0, temperature=0), make()]
    results = sample_batch(logits, samplers)
    log_softmax = torch.log_softmax(logits, dim=-1)
    first = results[0].logprob
    assert first.token_id == results[0].token_id
    assert math.isclose(first.logprob, log_softmax[0, first.token_id].item(), abs_tol=1e-6)
    assert [t for t, _ in first.top] == log_softmax[0].topk(5).indices.tolist()
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)
    for token, value in first.top:
        assert math.isclose(value, log_softmax[0, token].item(), abs_tol=1e-6)
    second = results[1].logprob
    assert second.top == [] and math.isclose(second.logprob, log_softmax[1].max().item(), abs_tol=1e-6)
    assert results[2].logprob is None


# ------------------------------------------------------------------ failures stay in their row


def test_a_failing_row_fails_only_itself():
    logits = random_logits(6, seed=13)
    logits[1, 7] = float("nan")
    logits[4, 2] = float("inf")

    def samplers():
        return [
            make(seed=1),
            make(seed=2),  # NaN logits
            make(logit_bias={VOCAB + 5: 1.0}),  # token id out of range
            make(temperature=0, seed=5),
            make(seed=3, top_k=10),  # +inf logit
            make(seed=4, temperature=0.8),
        ]

    results = sample_batch(logits, samplers())
    assert isinstance(results[1], RequestFailedError) and "NaN" in str(results[1])
    assert isinstance(results[2], InvalidRequestError) and results[2].param == "logit_bias"
    assert isinstance(results[4], RequestFailedError)
    healthy = [0, 3, 5]
    alone = sample_batch(logits[healthy], [samplers()[row] for row in healthy])
    assert [results[row].token_id for row in healthy] == [r.token_id for r in alone]


def test_greedy_rows_with_nan_fail_alone():
    logits = random_logits(3, seed=14)
    logits[0] = float("nan")
    results = sample_batch(logits, [make(temperature=0) for _ in range(3)])
    assert isinstance(results[0], RequestFailedError)
    assert [r.token_id for r in results[1:]] == logits[1:].argmax(dim=1).tolist()


def test_padded_vocabulary_columns_are_never_sampled():
    logits = torch.full((2, VOCAB + 20), -5.0)
    logits[:, VOCAB:] = 50.0  # padding columns of the embedding
    results = sample_batch(logits, [make(temperature=0), make(seed=1)])
    assert all(r.token_id < VOCAB for r in results)


def test_append_rejects_tokens_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make().append(VOCAB)


def test_inverse_cdf_draw_at_the_top_of_the_range_picks_the_last_possible_token(monkeypatch):
    # u * total can round up to total; the draw must then land on the last token with p > 0,
    # never on a zero-probability tail token.
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.ones(1))
    logits = torch.tensor([[1.0, 2.0, 0.5, -50.0, -60.0]])
    assert sample_batch(logits, [make(5, top_k=3)])[0].token_id == 2
