"""The engine end to end on a tiny float32 model: exactness against the reference generator,
batch invariance, prefix caching, preemption, cancellation, sampling, errors."""

import asyncio
import copy
from dataclasses import dataclass, field

import pytest
import torch

from model import native
from model.checkpoint import load_checkpoint
from model.decoder import DenseKVCache
from model.generate import GenerationSettings, generate
from server.engine import Engine, EngineConfig
from server.engine.cpu_fast import FusedBlock, can_pack, pack_model
from server.engine.types import (
    ContextOverflowError,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    SamplingParams,
    Usage,
)


@dataclass
class Choice:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class Result:
    choices: dict[int, Choice]
    usage: Usage | None

    @property
    def tokens(self) -> list[int]:
        return self.choices[0].tokens


async def collect(engine, request_id, prompt, params) -> Result:
    choices: dict[int, Choice] = {}
    usage = None
    async for output in engine.generate(GenerationRequest(request_id, list(prompt), params)):
        for delta in output.deltas:
            choice = choices.setdefault(delta.index, Choice())
            choice.tokens += delta.token_ids
            choice.logprobs += [entry.logprob for entry in delta.logprobs or []]
            choice.text += delta.text
            choice.finish_reason = delta.finish_reason or choice.finish_reason
        usage = output.usage or usage
    return Result(choices, usage)


async def collect_all(engine, requests):
    """requests: [(prompt, params)] -> results, all submitted at once."""
    return await asyncio.gather(*(collect(engine, f"req-{i}", p, params) for i, (p, params) in enumerate(requests)))


def make_engine(path, **overrides) -> Engine:
    options = dict(dtype="float32", max_num_seqs=16, max_num_batched_tokens=64)
    engine = Engine.from_checkpoint(path, EngineConfig(**{**options, **overrides}))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_checkpoint(tiny_model_dir).model


def prompts(tokenizer, count):
    """Distinct prompts of growing lengths (about 4 to 100 tokens)."""
    words = "to be or not to be that is the question whether tis nobler in the mind to suffer".split() * 12
    return [tokenizer.encode(" ".join(words[i:i + 2 + 7 * i]), add_bos=True) for i in range(count)]


GREEDY = SamplingParams(max_tokens=24, temperature=0, logprobs=3)


def test_greedy_equals_the_reference_generator(engine, model, tokenizer):
    batch = prompts(tokenizer, 6)
    results = asyncio.run(collect_all(engine, [(p, GREEDY) for p in batch]))
    for prompt, result in zip(batch, results):
        settings = GenerationSettings(max_tokens=24, temperature=0, stop_ids=tuple(tokenizer.stop_ids))
        assert result.tokens == list(generate(model, prompt, settings))
        assert len(result.choices[0].logprobs) == len(result.tokens)


# bfloat16 is the serving dtype: on CPUs that run them, model/native.py's linears and paged attention.
EXACT_DTYPES = pytest.mark.parametrize("dtype", ["float32", "bfloat16"])


@EXACT_DTYPES
def test_a_request_alone_equals_it_among_eight_others(tiny_model_dir, tokenizer, dtype):
    """Bitwise: same tokens and logprobs whatever else shares the steps (and the token budget)."""
    engine = make_engine(tiny_model_dir, dtype=dtype, enable_prefix_caching=False, max_num_batched_tokens=48)
    try:
        target, *others = prompts(tokenizer, 9)[::-1]  # the longest prompt: chunked differently when crowded
        alone = asyncio.run(collect(engine, "alone", target, GREEDY))
        crowded = asyncio.run(collect_all(engine, [(p, GREEDY) for p in others[:4]] + [(target, GREEDY)]
                                          + [(p, GREEDY) for p in others[4:]]))
        assert crowded[4].choices[0] == alone.choices[0]
    finally:
        engine.shutdown()


@EXACT_DTYPES
def test_prefix_cached_equals_uncached(tiny_model_dir, tokenizer, dtype):
    system = tokenizer.encode("You are a helpful assistant who answers in verse. " * 3, add_bos=True)
    turn = system + tokenizer.encode(" Who is the prince of Denmark?")
    cached_engine = make_engine(tiny_model_dir, dtype=dtype)
    plain_engine = make_engine(tiny_model_dir, dtype=dtype, enable_prefix_caching=False)
    try:
        asyncio.run(collect(cached_engine, "warm", system + tokenizer.encode(" Hello"), GREEDY))
        cached = asyncio.run(collect(cached_engine, "turn", turn, GREEDY))
        plain = asyncio.run(collect(plain_engine, "turn", turn, GREEDY))
        assert cached.usage.cached_tokens == len(system) // 16 * 16 > 0
        assert plain.usage.cached_tokens == 0
        assert cached.choices[0] == plain.choices[0]
        assert cached_engine.stats().prefix_cache_hit_tokens >= cached.usage.cached_tokens
    finally:
        cached_engine.shutdown()
        plain_engine.shutdown()


@EXACT_DTYPES
def test_preempted_and_resumed_equals_uninterrupted(tiny_model_dir, tokenizer, dtype):
    """The resumed request recomputes its generated tokens as a prompt: a prefill row must give the
    same bits as the decode row it replaces."""
    # 18 blocks of 16 tokens for four requests growing to 100-150 tokens each: preemption is certain.
    small_pool = make_engine(tiny_model_dir, dtype=dtype, kv_cache_blocks=18, enable_prefix_caching=False)
    try:
        params = SamplingParams(max_tokens=60, temperature=0, logprobs=0, ignore_eos=True)
        batch = prompts(tokenizer, 8)[4:]
        squeezed = asyncio.run(collect_all(small_pool, [(p, params) for p in batch]))
        assert small_pool.scheduler.num_preemptions > 0
        roomy = make_engine(tiny_model_dir, dtype=dtype)
        try:
            for prompt, result in zip(batch, squeezed):
                assert asyncio.run(collect(roomy, "solo", prompt, params)).choices[0] == result.choices[0]
        finally:
            roomy.shutdown()
        assert small_pool.stats().kv_blocks_used == 0
    finally:
        small_pool.shutdown()


def test_cancelled_requests_free_every_block(engine, tokenizer):
    async def start_and_leave(index, prompt):
        params = SamplingParams(max_tokens=140, temperature=0, ignore_eos=True)
        stream = engine.generate(GenerationRequest(f"leaver-{index}", prompt, params))
        async for _ in stream:
            break  # the client goes away after its first output
        await stream.aclose()

    async def scenario():
        await asyncio.gather(*(start_and_leave(i, p) for i, p in enumerate(prompts(tokenizer, 6))))
        for _ in range(200):  # aborts apply at the start of the next step
            if engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(scenario())
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.num_usable_blocks


def test_seeded_sampling_reproduces_under_different_batch_mixes(engine, tokenizer):
    batch = prompts(tokenizer, 6)
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = asyncio.run(collect(engine, "seeded", batch[2], seeded))
    neighbours = [(p, SamplingParams(max_tokens=12, temperature=1.0, seed=i)) for i, p in enumerate(batch)]
    mixed = asyncio.run(collect_all(engine, neighbours[:3] + [(batch[2], seeded)] + neighbours[3:]))
    assert mixed[3].tokens == alone.tokens
    other_seed = asyncio.run(collect(engine, "other", batch[2], SamplingParams(max_tokens=20, temperature=0.9, seed=99)))
    assert other_seed.tokens != alone.tokens


def test_n_choices_share_the_prompt_and_choice_zero_matches_n_equals_one(engine, tokenizer):
    prompt = prompts(tokenizer, 5)[4]
    single = asyncio.run(collect(engine, "single", prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)))
    multi = asyncio.run(collect(engine, "multi", prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=3, ignore_eos=True)))
    assert sorted(multi.choices) == [0, 1, 2]
    assert multi.choices[0].tokens == single.tokens
    assert multi.choices[1].tokens != multi.choices[2].tokens
    assert all(c.finish_reason == "length" and len(c.tokens) == 10 for c in multi.choices.values())
    assert multi.usage.completion_tokens == 30 and multi.usage.prompt_tokens == len(prompt)


def test_stop_strings_are_never_emitted_and_stop_ids_end_the_choice(engine, tokenizer):
    prompt = prompts(tokenizer, 4)[3]
    free = asyncio.run(collect(engine, "free", prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)))
    text = free.choices[0].text
    assert free.choices[0].finish_reason == "length" and len(text) > 12
    stop = text[8:12]
    stopped = asyncio.run(collect(engine, "stopped", prompt, SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True)))
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    stop_id = free.tokens[5]
    by_id = asyncio.run(collect(engine, "by-id", prompt, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id])))
    assert by_id.tokens == free.tokens[: free.tokens.index(stop_id)]
    assert by_id.choices[0].finish_reason == "stop"


def test_usage_record(engine, tokenizer):
    prompt = prompts(tokenizer, 3)[2]
    result = asyncio.run(collect(engine, "usage", prompt, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)))
    usage = result.usage
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 7
    assert min(usage.queue_time, usage.prefill_time, usage.decode_time) >= 0
    assert result.choices[0].finish_reason == "length"


def test_a_failing_sample_fails_only_its_request(engine, tokenizer, monkeypatch):
    from server.engine.sampling import SequenceSampler

    def broken_bias(self):
        raise ValueError("logit_bias: the sampler broke")

    monkeypatch.setattr(SequenceSampler, "bias_edit", broken_bias)  # only the poisoned request has a bias
    batch = prompts(tokenizer, 3)
    params = SamplingParams(max_tokens=8, temperature=0)
    poisoned = SamplingParams(max_tokens=8, temperature=0, logit_bias={5: 1.0})

    async def scenario():
        outcomes = await asyncio.gather(collect(engine, "good-0", batch[0], params), collect(engine, "bad", batch[1], poisoned),
                                        collect(engine, "good-2", batch[2], params), return_exceptions=True)
        return outcomes

    good_0, bad, good_2 = asyncio.run(scenario())
    assert isinstance(bad, RequestFailedError) and "logit_bias" in str(bad)
    assert good_0.tokens == asyncio.run(collect(engine, "again-0", batch[0], params)).tokens
    assert len(good_2.tokens) > 0
    assert engine.stats().kv_blocks_used == 0


def test_admission_errors(tiny_model_dir, engine, tokenizer):
    prompt = prompts(tokenizer, 1)[0]
    with pytest.raises(ContextOverflowError) as overflow:
        asyncio.run(collect(engine, "long", prompt, SamplingParams(max_tokens=300)))
    assert overflow.value.limit == 256 and overflow.value.requested == len(prompt) + 300
    assert "256" in str(overflow.value) and str(len(prompt) + 300) in str(overflow.value)
    with pytest.raises(InvalidRequestError, match="top_p"):
        asyncio.run(collect(engine, "bad", prompt, SamplingParams(top_p=0)))
    with pytest.raises(InvalidRequestError, match="prompt"):
        asyncio.run(collect(engine, "empty", [], SamplingParams()))
    with pytest.raises(InvalidRequestError, match="prompt"):
        asyncio.run(collect(engine, "oov", [1, 10_000], SamplingParams()))


def test_queue_overflow_is_a_distinct_error(tiny_model_dir, tokenizer):
    engine = Engine.from_checkpoint(tiny_model_dir, EngineConfig(dtype="float32", max_num_seqs=2, max_waiting=1))
    params = SamplingParams(max_tokens=3, temperature=0)

    async def scenario():
        # Not started yet: nothing is admitted, so the bound is exact: 2 free slots + 1 waiting.
        first = [asyncio.ensure_future(collect(engine, f"q{i}", [1, 2, 3 + i], params)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert engine.stats().num_waiting == 1  # two go to the free slots at the next step
        with pytest.raises(QueueFullError) as refused:
            await collect(engine, "overflow", [1, 2, 3], params)
        # The message counts what the limit counts, as hearth_num_requests_waiting does (was "3 requests waiting").
        assert "(1 waiting for a free slot, limit 1: --max-waiting)" in str(refused.value)
        engine.start()
        return await asyncio.gather(*first)

    try:
        results = asyncio.run(scenario())
        assert all(len(r.tokens) == 3 for r in results)
    finally:
        engine.shutdown()


def test_the_event_loop_stays_responsive_while_the_engine_computes(engine, tokenizer):
    async def scenario():
        ticks = 0
        task = asyncio.ensure_future(collect(engine, "busy", prompts(tokenizer, 6)[5],
                                             SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)))
        while not task.done():
            await asyncio.sleep(0.002)
            ticks += 1
        return ticks, await task

    ticks, result = asyncio.run(scenario())
    assert len(result.tokens) == 150 and ticks >= 10


def test_bfloat16_engine_is_batch_invariant_too(tiny_model_dir, tokenizer):
    """The serving dtype: packed oneDNN linears and the paged attention keep rows independent."""
    engine = make_engine(tiny_model_dir, dtype="bfloat16", enable_prefix_caching=False, max_num_batched_tokens=48)
    try:
        assert engine.worker.num_packed_matmuls == (2 * 4 + 1 if can_pack(torch.bfloat16, torch.device("cpu")) else 0)
        if native.activation_dtype() == torch.bfloat16 and native.decoder_layers_kernel() is not None:
            # then its layers run in one native call a step
            assert engine.worker.native_decoder is not None
        target, *others = prompts(tokenizer, 6)[::-1]
        alone = asyncio.run(collect(engine, "alone", target, GREEDY))
        crowded = asyncio.run(collect_all(engine, [(p, GREEDY) for p in others] + [(target, GREEDY)]))
        assert crowded[-1].choices[0] == alone.choices[0]
    finally:
        engine.shutdown()


def assert_close_to_bf16_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within a few bf16 ulps: the packed matmuls sum in fp32 in another order than nn.Linear."""
    difference = (actual.float() - expected.float()).abs()
    assert difference.max() <= 4 * 2**-8 * expected.float().abs().max(), difference.max()


def test_packed_fused_model_matches_the_plain_one(tiny_model_dir):
    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bf16 on this CPU: the engine keeps nn.Linear")
    plain = load_checkpoint(tiny_model_dir, dtype=torch.bfloat16).model
    packed = copy.deepcopy(plain)
    assert pack_model(packed) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the (tied) LM head
    assert all(isinstance(layer, FusedBlock) for layer in packed.layers)
    tokens = torch.randint(0, plain.config.vocab_size, (1, 37))
    with torch.inference_mode():
        for rows in (1, 5, 37):
            assert_close_to_bf16_rounding(packed(tokens[:, :rows]), plain(tokens[:, :rows]))
        # With a KV cache (the path the engine takes): a prompt, then single-token steps.
        caches = [DenseKVCache(m.config, 1, 64, dtype=torch.bfloat16) for m in (plain, packed)]
        for start, end in ((0, 30), (30, 31), (31, 32)):
            positions = torch.arange(start, end)[None]
            logits = [m(tokens[:, start:end], positions, c) for m, c in zip((plain, packed), caches)]
            assert_close_to_bf16_rounding(logits[1], logits[0])


@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32), ("int8", 32)])
def test_stacked_quantized_layers_match_separate_ones(tiny_model_dir, tmp_path, method, group_size):
    """The engine stacks quantized q/k/v and gate/up into one matmul each: exact per output column
    through model/quant.py's kernels; int8 per channel and int4 go to the native kernels where they
    run (their own fp32 order), int8 in groups stays on model/quant.py's."""
    from model.quant import QuantizedLinear, quantize_checkpoint
    from server.engine.cpu_fast import PackedInt4Linear, PackedInt8Linear

    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("no oneDNN bf16 on this CPU: the engine keeps the model as loaded")
    folder = quantize_checkpoint(tiny_model_dir, tmp_path / method, method, group_size).out
    plain = load_checkpoint(folder).model
    stacked = copy.deepcopy(plain)
    assert pack_model(stacked) == 2 * 4 + 1  # qkv, o, gate_up, down per layer, and the (tied, bf16) LM head
    native_kernel = {("int8", None): native.linear_int8_kernel, ("int4", 32): native.linear_int4_kernel}.get(
        (method, group_size), lambda: None)() is not None
    native_class = PackedInt8Linear if method == "int8" else PackedInt4Linear
    assert isinstance(stacked.layers[0].attn.qkv, native_class if native_kernel else QuantizedLinear)
    tokens = torch.randint(0, plain.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # hidden states: the bf16 LM head is packed, so not bit for bit
        for rows in (1, 5, 37):
            hidden = [model.hidden_states(tokens[:, :rows]) for model in (stacked, plain)]
            if native_kernel:
                assert_close_to_bf16_rounding(*hidden)
            else:
                assert torch.equal(*hidden)


def test_int8_checkpoint_runs_and_stays_batch_invariant(tiny_model_dir, tokenizer, tmp_path):
    from model.quant import quantize_checkpoint

    quantized = quantize_checkpoint(tiny_model_dir, tmp_path / "int8", "int8").out
    engine = make_engine(quantized, dtype="bfloat16", enable_prefix_caching=False)
    try:
        target, *others = prompts(tokenizer, 5)[::-1]
        alone = asyncio.run(collect(engine, "alone", target, GREEDY))
        crowded = asyncio.run(collect_all(engine, [(p, GREEDY) for p in others] + [(target, GREEDY)]))
        assert len(alone.tokens) > 0 and crowded[-1].choices[0] == alone.choices[0]
    finally:
        engine.shutdown()


def test_stale_garbage_in_freed_blocks_never_leaks_into_a_new_request(tiny_model_dir, model, tokenizer):
    """A masked key still multiplies its value by 0: blocks are zeroed when handed out, so NaN
    left behind by an earlier request (a numerical blow-up) cannot poison the next one."""
    engine = make_engine(tiny_model_dir)
    try:
        block = engine.config.block_size
        for cache in (engine.worker.cache.keys, engine.worker.cache.values):
            cache[:, :, block:] = float("nan")  # everything but the null block
        prompt = prompts(tokenizer, 3)[2]
        result = asyncio.run(collect(engine, "clean", prompt, GREEDY))
        settings = GenerationSettings(max_tokens=24, temperature=0, stop_ids=tuple(tokenizer.stop_ids))
        assert result.tokens == list(generate(model, prompt, settings))
        assert all(lp == lp for lp in result.choices[0].logprobs)  # no NaN
    finally:
        engine.shutdown()


def test_run_in_fresh_thread_returns_results_and_reraises_errors_from_a_thread_that_has_exited():
    import threading

    from server.engine.engine import run_in_fresh_thread

    seen: list[threading.Thread] = []

    def work(value: int) -> int:
        seen.append(threading.current_thread())
        return value * 2

    assert run_in_fresh_thread(work, 21) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        run_in_fresh_thread(fail)


def test_two_engines_step_on_one_thread_and_it_ends_with_the_last(tiny_model_dir, tokenizer, monkeypatch):
    """Several models, one OpenMP team: every engine's steps run on the process's one engine thread
    (server/engine/step_loop.py), which exits when the last engine shuts down."""
    import threading

    from server.engine import step_loop

    monkeypatch.setattr(step_loop, "SHARED", step_loop.StepLoop())  # this test's engines alone on it
    engines = [make_engine(tiny_model_dir) for _ in range(2)]
    seen: list[threading.Thread] = []
    for engine in engines:
        execute = engine.worker.execute
        engine.worker.execute = lambda output, execute=execute: (seen.append(threading.current_thread()),
                                                                 execute(output))[1]
    try:
        prompt = prompts(tokenizer, 1)[0]
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

        async def both():
            return await asyncio.gather(*(collect(engine, f"r{i}", prompt, params) for i, engine in enumerate(engines)))

        first, second = asyncio.run(both())
        assert first.tokens == second.tokens and len(first.tokens) == 4
        assert len(set(seen)) == 1 and seen[0] is step_loop.SHARED.thread
    finally:
        for engine in engines:
            engine.shutdown()
    seen[0].join(timeout=5)
    assert not seen[0].is_alive() and step_loop.SHARED.thread is None
