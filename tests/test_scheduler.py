"""Scheduler with fake model outputs and no model (as vLLM's tests/v1/core)."""

from server.engine.kv_cache import KVCacheManager
from server.engine.scheduler import Scheduler, SchedulerConfig, Sequence, SequenceStatus
from server.engine.types import SamplingParams

BLOCK = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=64, max_seq_len=128, prefix_caching=True):
    kv = KVCacheManager(num_blocks, BLOCK, prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_seq_len, BLOCK), kv)


def make_seq(request_id, prompt_len, max_tokens=8, n=1, first_token=0, stop=()):
    prompt = list(range(first_token, first_token + prompt_len))
    return Sequence(request_id, prompt, prompt_len, SamplingParams(max_tokens=max_tokens, n=n), frozenset(stop))


def step(scheduler, token=7):
    """One step with a fake model that always samples `token`."""
    output = scheduler.schedule()
    sampled = {item.seq.seq_id: [token] * item.num_samples for item in output.scheduled if item.num_samples}
    events = scheduler.update_from_output(output, sampled)
    return output, events


def scheduled_tokens(output):
    return {item.seq.request_id + (f"/{item.seq.choice_index}" if item.seq.choice_index else ""): item.num_tokens
            for item in output.scheduled}


def test_long_prompt_is_chunked_under_the_budget_and_sampled_once_at_its_end():
    scheduler = make_scheduler(budget=32)
    seq = make_seq("a", 100)
    scheduler.add_sequence(seq)
    chunks, samples = [], []
    for _ in range(4):
        output, _ = step(scheduler)
        chunks.append(output.total_num_tokens)
        samples.append(output.scheduled[0].num_samples)
    assert chunks == [32, 32, 32, 4] and samples == [0, 0, 0, 1]
    assert output.scheduled[0].start_position == 96
    assert seq.token_ids[100:] == [7] and seq.num_computed_tokens == 100


def test_running_decodes_go_first_while_a_long_prompt_is_chunked():
    scheduler = make_scheduler(budget=16)
    short = make_seq("short", 3, max_tokens=20)
    scheduler.add_sequence(short)
    step(scheduler)  # prefill + first token
    scheduler.add_sequence(make_seq("long", 60))
    for _ in range(4):
        output, _ = step(scheduler)
        assert output.scheduled[0].seq is short and output.scheduled[0].num_tokens == 1
        assert scheduled_tokens(output) == {"short": 1, "long": 15}
    assert short.num_output_tokens == 5


def test_max_num_seqs_caps_the_running_batch():
    scheduler = make_scheduler(max_num_seqs=2)
    for index, name in enumerate("abc"):
        scheduler.add_sequence(make_seq(name, 5, max_tokens=2, first_token=100 * index))
    output, _ = step(scheduler)
    assert sorted(scheduled_tokens(output)) == ["a", "b"] and len(scheduler.waiting) == 1
    step(scheduler)  # a and b finish (2 tokens each)
    output, _ = step(scheduler)
    assert scheduled_tokens(output) == {"c": 5}


def test_stop_token_and_max_tokens_finish_and_free_blocks():
    scheduler = make_scheduler()
    stopper = make_seq("stopper", 5, max_tokens=10, stop=[7])
    limited = make_seq("limited", 5, max_tokens=3, first_token=50)
    scheduler.add_sequence(stopper)
    scheduler.add_sequence(limited)
    _, events = step(scheduler)
    by_request = {e.seq.request_id: e for e in events}
    assert by_request["stopper"].finish_reason == "stop" and by_request["stopper"].stopped_by_token
    assert by_request["limited"].finish_reason is None
    step(scheduler, token=1)
    _, events = step(scheduler, token=1)
    assert [(e.seq.request_id, e.finish_reason) for e in events] == [("limited", "length")]
    assert limited.num_output_tokens == 3 and not scheduler.has_work()
    assert scheduler.kv.num_used_blocks == 0


def test_context_end_finishes_with_length():
    scheduler = make_scheduler(max_seq_len=8)
    seq = make_seq("a", 6, max_tokens=100)
    scheduler.add_sequence(seq)
    step(scheduler)
    _, events = step(scheduler)
    assert events[0].finish_reason == "length" and seq.num_tokens == 8


def test_pool_exhaustion_preempts_the_newest_and_it_resumes_by_recompute():
    # 6 usable blocks of 4 tokens; two sequences of 8-token prompts growing to 16 tokens each.
    scheduler = make_scheduler(num_blocks=7, prefix_caching=False)
    old, new = make_seq("old", 8, max_tokens=8), make_seq("new", 8, max_tokens=8, first_token=100)
    scheduler.add_sequence(old)
    scheduler.add_sequence(new)
    preempted_at = None
    for index in range(40):
        output, _ = step(scheduler, token=index)
        if output.preempted and preempted_at is None:
            preempted_at = index
            assert output.preempted == [new]
            assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
            assert scheduler.waiting[0] is new
            generated_before = list(new.token_ids[8:])
        if not scheduler.has_work():
            break
    assert preempted_at is not None
    assert old.num_output_tokens == 8 and new.num_output_tokens == 8
    assert new.token_ids[8:8 + len(generated_before)] == generated_before  # kept its tokens, recomputed them
    assert scheduler.num_preemptions >= 1 and scheduler.kv.num_used_blocks == 0


def test_resumed_sequence_prefills_prompt_and_generated_tokens_together():
    scheduler = make_scheduler(num_blocks=7, prefix_caching=False)
    old, new = make_seq("old", 8, max_tokens=8), make_seq("new", 8, max_tokens=8, first_token=100)
    scheduler.add_sequence(old)
    scheduler.add_sequence(new)
    while True:
        output, _ = step(scheduler)
        if output.preempted:
            break
    while True:
        output, _ = step(scheduler)
        resumed = [item for item in output.scheduled if item.seq is new]
        if resumed:
            break
    # (the step then appended one more token)
    assert resumed[0].start_position == 0 and resumed[0].num_tokens == new.num_tokens - 1 and resumed[0].num_samples == 1


def test_prefix_cache_hit_skips_cached_blocks_and_reports_cached_tokens():
    scheduler = make_scheduler()
    first = make_seq("first", 10, max_tokens=1)
    scheduler.add_sequence(first)
    step(scheduler)
    assert first.is_finished and first.num_cached_tokens == 0
    second = make_seq("second", 14, max_tokens=1)  # same first 10 tokens, then more
    scheduler.add_sequence(second)
    output, _ = step(scheduler)
    assert second.num_cached_tokens == 8  # two full blocks of the shared 10 tokens
    assert output.scheduled[0].start_position == 8 and output.scheduled[0].num_tokens == 6
    assert scheduler.prefix_cache_hit_tokens == 8


def test_prefix_caching_off_computes_everything():
    scheduler = make_scheduler(prefix_caching=False)
    for name in ("a", "b"):
        seq = make_seq(name, 10, max_tokens=1)
        scheduler.add_sequence(seq)
        output, _ = step(scheduler)
        assert output.scheduled[0].num_tokens == 10 and seq.num_cached_tokens == 0


def test_identical_prompts_admitted_together_both_compute_then_share_later():
    scheduler = make_scheduler()
    a, b = make_seq("a", 9, max_tokens=1), make_seq("b", 9, max_tokens=1)
    scheduler.add_sequence(a)
    scheduler.add_sequence(b)
    output, _ = step(scheduler)
    assert scheduled_tokens(output) == {"a": 9, "b": 9}  # nothing was cached yet when they were admitted
    c = make_seq("c", 9, max_tokens=1)
    scheduler.add_sequence(c)
    step(scheduler)
    assert c.num_cached_tokens == 8


def test_n_choices_fork_from_the_prompt_sharing_its_full_blocks():
    scheduler = make_scheduler()
    parent = make_seq("req", 10, max_tokens=3, n=3)
    scheduler.add_sequence(parent)
    output = scheduler.schedule()
    assert output.scheduled[0].num_samples == 3
    parent_blocks = list(output.scheduled[0].block_ids)
    events = scheduler.update_from_output(output, {parent.seq_id: [1, 2, 3]})
    assert [(e.seq.choice_index, e.token_id, e.sample_index) for e in events] == [(0, 1, 0), (1, 2, 1), (2, 3, 2)]
    children = scheduler.seqs_by_request["req"][1:]
    for child in children:
        blocks = scheduler.kv.block_ids(child.seq_id)
        assert blocks[:2] == parent_blocks[:2] and blocks[2] != parent_blocks[2]
        assert child.num_computed_tokens == 10 and child.token_ids[10:] == [child.choice_index + 1]
    assert [scheduler.kv.pool.blocks[b].ref_count for b in parent_blocks] == [3, 3, 1]
    output, _ = step(scheduler)
    assert sorted(output.blocks_to_copy) == sorted((parent_blocks[2], scheduler.kv.block_ids(c.seq_id)[2]) for c in children)
    assert scheduled_tokens(output) == {"req": 1, "req/1": 1, "req/2": 1}
    step(scheduler)
    assert not scheduler.has_work() and scheduler.kv.num_used_blocks == 0


def test_n_choices_reserve_running_slots():
    scheduler = make_scheduler(max_num_seqs=4)
    scheduler.add_sequence(make_seq("two", 5, max_tokens=4, n=2))
    scheduler.add_sequence(make_seq("three", 5, max_tokens=4, n=3, first_token=50))
    output, _ = step(scheduler)
    assert scheduled_tokens(output) == {"two": 5}  # 2 + 3 choices would not fit in 4 slots
    assert len(scheduler.running) == 2


def test_abort_frees_blocks_and_skips_pending_outputs():
    scheduler = make_scheduler()
    seq = make_seq("a", 10, max_tokens=50)
    scheduler.add_sequence(seq)
    step(scheduler)
    output = scheduler.schedule()
    scheduler.abort_request("a")
    assert scheduler.update_from_output(output, {seq.seq_id: [1]}) == []
    assert scheduler.kv.num_used_blocks == 0 and not scheduler.has_work()
    assert seq.num_output_tokens == 1


def test_waiting_request_that_does_not_fit_waits_fifo():
    scheduler = make_scheduler(num_blocks=5, budget=64)  # 4 usable blocks = 16 tokens
    big, small = make_seq("big", 14, max_tokens=2), make_seq("small", 2, max_tokens=2, first_token=50)
    scheduler.add_sequence(big)
    step(scheduler)
    scheduler.add_sequence(make_seq("huge", 15, max_tokens=1, first_token=80))
    scheduler.add_sequence(small)
    output, _ = step(scheduler)
    assert scheduled_tokens(output) == {"big": 1}  # huge does not fit; small waits behind it
    assert [s.request_id for s in scheduler.waiting] == ["huge", "small"]


def test_a_fork_with_no_block_for_its_copy_waits_and_recomputes():
    scheduler = make_scheduler(num_blocks=4)  # 3 usable blocks: the 10-token prompt takes all three
    parent = make_seq("req", 10, max_tokens=2, n=2)
    scheduler.add_sequence(parent)
    output = scheduler.schedule()
    events = scheduler.update_from_output(output, {parent.seq_id: [1, 2]})
    child = events[1].seq
    assert child.choice_index == 1 and child.status is SequenceStatus.WAITING and child.token_ids[10:] == [2]
    assert scheduler.kv.block_ids(child.seq_id) == []
    for _ in range(4):
        step(scheduler)
    assert parent.is_finished and child.is_finished and child.num_output_tokens == 2
    assert scheduler.kv.num_used_blocks == 0
