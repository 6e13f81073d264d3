"""Where the KV cache manager puts a request's blocks: in runs of consecutive ids where the pool allows.

The CPU attention kernels read a sequence's blocks in table order and read them faster when they lie next
to each other, so growth should continue the table's run; but a reservation for growth must never make an
allocation fail that the pool's free blocks could cover, nor change what the prefix cache evicts.
"""

from __future__ import annotations

import itertools
import random

from hawker.engine.kv_cache import MAX_RESERVED_BLOCKS, KVCacheManager
from hawker.engine.request import Request
from hawker.sampling_params import SamplingParams

BLOCK = 4


def request(request_id: str, prompt_len: int, max_tokens: int, first_token: int = 0) -> Request:
    prompt = [first_token + i for i in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), max_tokens, 0)


def grow(kv: KVCacheManager, req: Request, tokens: int) -> None:
    """What the scheduler does for a decoding request: room for ``tokens`` more, then they are computed."""
    assert kv.allocate(req, tokens)
    req.num_computed_tokens += tokens
    req.token_ids.extend([1] * tokens)


def is_one_run(table: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(table))


def test_interleaved_growth_keeps_each_table_one_run() -> None:
    kv = KVCacheManager(num_blocks=1024, block_size=BLOCK, enable_prefix_caching=False)
    early = request("early", prompt_len=3 * BLOCK, max_tokens=1)
    assert kv.allocate(early, early.num_tokens)
    requests = [request(f"r{i}", prompt_len=10 + 3 * i, max_tokens=40) for i in range(4)]
    for req in requests:  # prompts prefilled one after another, as a step's batch is
        assert kv.allocate(req, req.num_tokens)
        req.num_computed_tokens = req.num_tokens
    kv.free(early)  # an open hole before every run: growth must still continue each table's run
    for _ in range(40):  # then every request decodes a token a step
        for req in requests:
            grow(kv, req, 1)
        kv.check_invariants()
    for req in requests:
        assert is_one_run(kv.blocks_of(req.request_id)), kv.blocks_of(req.request_id)


def test_reservations_never_refuse_what_the_pool_can_cover() -> None:
    kv = KVCacheManager(num_blocks=160, block_size=BLOCK)
    holder = request("holder", prompt_len=BLOCK, max_tokens=100 * BLOCK)
    assert kv.allocate(holder, BLOCK)
    assert kv.reservations["holder"] == list(range(1, 21)), "an eighth of the pool, after its block"
    # Every other block is free, so a request needing all of them gets them.
    other = request("other", prompt_len=159 * BLOCK, max_tokens=1)
    assert kv.allocate(other, other.num_tokens)
    assert sorted(kv.blocks_of("other")) == list(range(1, 160))
    assert not kv.reserved_for and kv.num_free_blocks == 0
    kv.check_invariants()
    kv.free(other)
    kv.free(holder)
    kv.check_invariants()
    assert kv.num_free_blocks == 160 and not kv.reserved_for and not kv.reservations


def test_a_new_request_starts_after_earlier_reservations() -> None:
    kv = KVCacheManager(num_blocks=400, block_size=BLOCK)
    first = request("first", prompt_len=2 * BLOCK, max_tokens=10 * BLOCK)
    assert kv.allocate(first, first.num_tokens)
    second = request("second", prompt_len=2 * BLOCK, max_tokens=BLOCK)
    assert kv.allocate(second, second.num_tokens)
    assert kv.blocks_of("first") == [0, 1]
    assert kv.blocks_of("second")[0] == 2 + 10, "the first request's 10 growth blocks stay ahead of it"
    kv.free(first)
    kv.check_invariants()
    assert kv.open_blocks[2:12] == b"\x01" * 10, "a finished request's reservations are released"


def test_growth_reservation_is_capped() -> None:
    kv = KVCacheManager(num_blocks=1000, block_size=BLOCK)
    long_output = request("long", prompt_len=BLOCK, max_tokens=10_000)
    assert kv.allocate(long_output, BLOCK)
    assert len(kv.reservations["long"]) == MAX_RESERVED_BLOCKS
    # With many requests holding blocks, each reserves less: all together stay under an eighth of the pool.
    for i in range(40):
        assert kv.allocate(request(f"r{i}", prompt_len=BLOCK, max_tokens=10_000), BLOCK)
    assert len(kv.reserved_for) <= 1000 // 8


def test_placement_keeps_the_books_under_random_traffic() -> None:
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    running: dict[str, Request] = {}
    for step in range(600):
        if running and rng.random() < 0.2:
            kv.free(running.pop(rng.choice(sorted(running))))
        elif rng.random() < 0.3:
            req = request(f"r{step}", rng.randint(1, 30), rng.randint(1, 60), first_token=rng.randint(0, 3))
            if kv.allocate(req, req.num_tokens):
                req.num_computed_tokens = req.num_tokens
                kv.cache_full_blocks(req)
                running[req.request_id] = req
        for req in list(running.values()):
            if kv.allocate(req, 1):
                req.num_computed_tokens += 1
                req.token_ids.append(1)
                kv.cache_full_blocks(req)
        kv.check_invariants()
    for req in running.values():
        kv.free(req)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and not kv.reserved_for


def test_off_switch_hands_out_the_free_queue_front() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False, place_in_runs=False)
    first, second = request("a", BLOCK, 10 * BLOCK), request("b", BLOCK, 10 * BLOCK)
    for req in (first, second):
        assert kv.allocate(req, BLOCK)
        req.num_computed_tokens = BLOCK
    grow(kv, first, BLOCK)
    assert kv.blocks_of("a") == [0, 2] and kv.blocks_of("b") == [1] and not kv.reserved_for
    kv.check_invariants()


def test_a_pool_full_of_cached_prefixes_still_hands_out_runs_oldest_evicted_first() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    for i in range(8):  # 8 finished requests of 8 full blocks each: every block cached, none open
        req = request(f"old{i}", prompt_len=8 * BLOCK, max_tokens=1, first_token=100 * i)
        assert kv.allocate(req, req.num_tokens)
        req.num_computed_tokens = req.num_tokens
        kv.cache_full_blocks(req)
        kv.free(req)
    assert len(kv.cached) == 64 and not any(kv.open_blocks)
    new = request("new", prompt_len=3 * BLOCK, max_tokens=1, first_token=7)
    assert kv.allocate(new, new.num_tokens)
    assert is_one_run(sorted(kv.blocks_of("new"))) and is_one_run(kv.blocks_of("new"))
    kv.check_invariants()
    # Only the oldest request lost blocks, its tail; every later one is whole.
    for i in range(8):
        probe = request(f"probe{i}", prompt_len=8 * BLOCK + 1, max_tokens=1, first_token=100 * i)
        assert len(kv.find_cached_prefix(probe)) == (4 if i == 0 else 8), i  # the tail goes first
