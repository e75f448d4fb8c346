"""Block pool, prefix cache, forks, and paged attention against dense SDPA."""

import pytest
import torch

from model.config import ModelConfig
from server.engine import kv_cache
from server.engine.kv_cache import (
    NULL_BLOCK_ID,
    BlockPool,
    KVCacheManager,
    PagedKVCache,
    SequenceChunk,
    extend_block_hashes,
    find_row_multiple,
    hash_block_tokens,
    reference_attention,
)


def hashes(token_ids, block_size=4):
    out = []
    extend_block_hashes(out, token_ids, block_size)
    return out


def test_hashes_chain_the_whole_prefix():
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    # Same block tokens after different prefixes: different keys.
    first, second = hashes([1, 2, 3, 4, 9, 9, 9, 9]), hashes([5, 6, 7, 8, 9, 9, 9, 9])
    assert first[1] != second[1]
    assert len(hashes(list(range(11)))) == 2  # partial blocks are not hashed


def test_pool_refcounts_and_never_hands_out_the_null_block():
    pool = BlockPool(5)
    blocks = pool.allocate(4)
    assert NULL_BLOCK_ID not in [b.block_id for b in blocks] and pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.touch(blocks[:2])
    pool.free(blocks)
    assert pool.num_free_blocks == 2 and [b.ref_count for b in blocks] == [1, 1, 0, 0]
    pool.free(blocks[:2])
    assert pool.num_free_blocks == 4


def test_free_queue_prefers_uncached_blocks_then_least_recently_freed_tail_first():
    pool = BlockPool(7)
    a, b = pool.allocate(3), pool.allocate(3)
    for index, block in enumerate(a + b[:2]):
        pool.register(block, bytes([index]))
    pool.free(a)  # cached, tail first: a[2], a[1], a[0]
    pool.free(b)  # b[2] is not cached: it goes to the front
    order = [block.block_id for block in pool.allocate(6)]
    assert order == [b[2].block_id, a[2].block_id, a[1].block_id, a[0].block_id, b[1].block_id, b[0].block_id]
    assert pool.cached_blocks == {}  # handing a cached block out evicts it


def test_prefix_hit_revives_a_free_cached_block():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    tokens = list(range(10))
    assert manager.allocate_slots(1, len(tokens))
    manager.register_full_blocks(1, hashes(tokens), num_computed_tokens=10)
    manager.free(1)
    assert manager.num_used_blocks == 0
    hits = manager.find_cached_prefix(tokens, hashes(tokens))
    assert len(hits) == 2
    assert manager.allocate_slots(2, 10, hits)
    assert manager.block_ids(2)[:2] == [block.block_id for block in hits]
    assert manager.num_used_blocks == 3


def test_prefix_hit_leaves_the_last_token_to_compute():
    manager = KVCacheManager(num_blocks=6, block_size=4)
    tokens = list(range(8))  # exactly two blocks
    manager.allocate_slots(1, 8)
    manager.register_full_blocks(1, hashes(tokens), 8)
    assert len(manager.find_cached_prefix(tokens, hashes(tokens))) == 1
    assert len(manager.find_cached_prefix(tokens + [99], hashes(tokens + [99]))) == 2


def test_allocation_fails_cleanly_when_short():
    manager = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable
    assert manager.allocate_slots(1, 8)
    assert not manager.allocate_slots(2, 8)
    assert manager.block_ids(2) == [] and manager.num_used_blocks == 2
    assert manager.allocate_slots(1, 12) and not manager.allocate_slots(1, 13)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.allocate_slots(1, 10)
    parent = manager.block_ids(1)
    copy = manager.fork(1, 2, num_tokens=10)
    child = manager.block_ids(2)
    assert child[:2] == parent[:2] and child[2] != parent[2]
    assert copy == (parent[2], child[2])
    assert [manager.pool.blocks[i].ref_count for i in parent] == [2, 2, 1]
    assert manager.fork(1, 3, num_tokens=8) is None  # block-aligned prompt: nothing to copy
    for seq_id in (1, 2, 3):
        manager.free(seq_id)
    assert manager.num_used_blocks == 0


def make_cache(dtype=torch.float32, row_multiple=1, n_kv_heads=2):
    config = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=64, vocab_size=64, max_seq_len=64)
    return config, PagedKVCache(config, num_blocks=16, block_size=4, dtype=dtype, row_multiple=row_multiple)


@pytest.mark.parametrize("row_multiple,n_kv_heads,max_query_rows", [(1, 2, 256), (4, 2, 256), (4, 4, 256), (4, 2, 4)])
def test_paged_attention_matches_dense_sdpa(row_multiple, n_kv_heads, max_query_rows, monkeypatch):
    """Two decodes and two prefill chunks (one continuing a cached prefix), scattered blocks."""
    monkeypatch.setattr(kv_cache, "MAX_QUERY_ROWS", max_query_rows)  # 4: long chunks attend in slices
    torch.manual_seed(0)
    config, cache = make_cache(row_multiple=row_multiple, n_kv_heads=n_kv_heads)
    H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
    # (context already cached, new tokens, block table)
    layout = [(6, 1, [3, 7]), (9, 1, [1, 2, 9]), (0, 5, [4, 5]), (5, 6, [10, 12, 14])]
    full_keys = [torch.randn(KV, c + n, hd) for c, n, _ in layout]
    full_values = [torch.randn(KV, c + n, hd) for c, n, _ in layout]
    layer = 1
    cache.zero_blocks([block for _, _, blocks in layout for block in blocks])  # as the block pool does on hand-out
    for (cached, _, blocks), keys, values in zip(layout, full_keys, full_values):
        for position in range(cached):  # what earlier steps left in the cache
            slot = blocks[position // 4] * 4 + position % 4
            cache.keys[layer, :, slot], cache.values[layer, :, slot] = keys[:, position], values[:, position]
    chunks = [SequenceChunk(c, n, blocks) for c, n, blocks in layout]
    num_rows = sum(n for _, n, _ in layout) + 3  # with padding rows
    cache.metadata = cache.build_metadata(chunks, num_rows)
    q = torch.randn(1, H, num_rows, hd)
    new_k = torch.zeros(1, KV, num_rows, hd)
    new_v = torch.zeros(1, KV, num_rows, hd)
    row = 0
    for (cached, new, _), keys, values in zip(layout, full_keys, full_values):
        new_k[0, :, row:row + new], new_v[0, :, row:row + new] = keys[:, cached:], values[:, cached:]
        row += new
    out = cache.attend(layer, q, new_k, new_v, positions=None)
    assert out.shape == q.shape
    row = 0
    for (cached, new, _), keys, values in zip(layout, full_keys, full_values):
        expected = reference_attention(q[0, :, row:row + new], keys, values, torch.arange(cached, cached + new))
        torch.testing.assert_close(out[0, :, row:row + new], expected, atol=1e-5, rtol=1e-5)
        row += new
    assert torch.equal(out[0, :, row:], torch.zeros(H, 3, hd))


def test_paged_attention_rows_do_not_depend_on_the_rest_of_the_batch():
    """Bitwise: a decode alone equals the same decode among others with longer contexts."""
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        config, cache = make_cache(dtype, row_multiple=find_row_multiple(dtype))
        cache.keys.normal_()
        cache.values.normal_()
        q = torch.randn(1, config.n_heads, 4, config.head_dim, dtype=dtype)
        new_k = torch.randn(1, config.n_kv_heads, 4, config.head_dim, dtype=dtype)
        new_v = torch.randn(1, config.n_kv_heads, 4, config.head_dim, dtype=dtype)
        own = SequenceChunk(5, 1, [2, 3])
        others = [SequenceChunk(13, 1, [4, 5, 6, 7]), SequenceChunk(2, 1, [8])]
        cache.metadata = cache.build_metadata([own], 4)
        alone = cache.attend(0, q, new_k, new_v, None)[0, :, 0]
        cache.metadata = cache.build_metadata([own] + others, 4)
        batched = cache.attend(0, q, new_k, new_v, None)[0, :, 0]
        assert torch.equal(alone, batched), dtype


def test_copy_blocks_copies_every_layer():
    _, cache = make_cache()
    cache.keys.normal_()
    cache.values.normal_()
    cache.copy_blocks([(3, 9)])
    assert torch.equal(cache.keys[:, :, 36:40], cache.keys[:, :, 12:16])
    assert torch.equal(cache.values[:, :, 36:40], cache.values[:, :, 12:16])


def test_prefill_chunks_are_grouped_by_similar_length():
    pieces = [(SequenceChunk(0, rows, [1]), index) for index, rows in enumerate([20, 21, 19, 200, 22, 3, 3])]
    groups = kv_cache.group_by_length(pieces)
    # Padding every member to the longest stays within 25% (+ 8 rows) of the real rows.
    assert [[chunk.num_rows for chunk, _ in group] for group in groups] == [[200], [22, 21, 20, 19, 3], [3]]
