"""The golden executor's cache of unpacked int4 weights: served while its sources live unchanged, within its budget."""

from __future__ import annotations

import torch

from qlower import pack, references
from qlower.unpack_cache import UnpackCache


def _made(cache: UnpackCache, source: torch.Tensor) -> tuple[torch.Tensor, list]:
    calls = []
    value = cache.get("k", (source,), (), lambda: (calls.append(1), source.to(torch.float32) * 2)[1])
    return value, calls


def test_served_while_the_source_lives_unchanged():
    cache = UnpackCache(1 << 20)
    source = torch.arange(8, dtype=torch.uint8)
    first, made = _made(cache, source)
    again, made_again = _made(cache, source)
    assert made == [1] and made_again == [] and again is first and cache.hits == 1
    source.add_(1)  # written in place: never served stale
    fresh, made = _made(cache, source)
    assert made == [1] and torch.equal(fresh, source.to(torch.float32) * 2)


def test_dropped_when_the_source_is_freed():
    cache = UnpackCache(1 << 20)
    source = torch.ones(1000, dtype=torch.uint8)
    _made(cache, source)
    assert cache.used == 4000
    del source
    assert cache.used == 0 and not cache._entries


def test_nothing_kept_beyond_the_budget():
    cache = UnpackCache(5000)
    a, b = torch.ones(1000, dtype=torch.uint8), torch.ones(1000, dtype=torch.uint8)
    _made(cache, a)
    _, made = _made(cache, b)  # would need 8000 bytes: made, not kept
    assert cache.used == 4000 and _made(cache, b)[1] == [1] and _made(cache, a)[1] == []


def test_cached_linear_is_the_uncached_bit_for_bit(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    n, k, group = 12, 64, 32
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(k // group, n, generator=gen)  # stored transposed, as the VkGraph holds them
    packed = pack.pack_int4(q)
    x = torch.randn(1, 1, k, generator=gen)
    monkeypatch.setattr(references, "CACHE", UnpackCache(0))
    uncached = references.linear_q4gsw(x, packed, scales, group)
    expected = references.linear_qga4w_int(x, q, scales.t(), group).reshape(1, 1, n)
    monkeypatch.setattr(references, "CACHE", UnpackCache(1 << 20))
    first, second = references.linear_q4gsw(x, packed, scales, group), references.linear_q4gsw(x, packed, scales, group)
    assert references.CACHE.hits == 1
    assert torch.equal(uncached, expected) and torch.equal(first, uncached) and torch.equal(second, uncached)


def test_embedding_unpacks_only_the_looked_up_rows_and_gets_the_whole_tables_values():
    gen = torch.Generator().manual_seed(1)
    vocab, dim, group = 37, 64, 32
    q = torch.randint(-8, 8, (vocab, dim), generator=gen, dtype=torch.int8)
    scales = torch.rand(vocab, dim // group, generator=gen)
    packed = pack.pack_int4(q)
    indices = torch.tensor([[3, 36, 0, 3]])
    table = (q.to(torch.float32).reshape(vocab, -1, group) * scales.unsqueeze(-1)).reshape(vocab, dim)
    got = references.embedding_q4gsw(packed, scales, group, indices, is_linear_weight=True)
    assert got.shape == (1, 4, dim) and torch.equal(got, torch.nn.functional.embedding(indices, table))
