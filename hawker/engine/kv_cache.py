"""Paged KV cache bookkeeping: block pool, block tables, prefix cache.

This module never touches tensors: it hands out block ids; the model runner
owns the storage. Full blocks are keyed by a hash chain over their tokens so
that a new request can reuse every cached full block of its prefix. Blocks
nobody references stay cached in an LRU free queue until the pool needs them.

Placement: a request's blocks are handed out in runs of consecutive ids
where the pool allows, and the free blocks after its last one are softly
reserved for its growth, because the CPU attention kernels read a
sequence's blocks in table order and read them ~17 % faster when they lie
next to each other in memory (benchmarks/NOTES.md, session 19). A
reservation never refuses an allocation: when nothing else is free, any
request may take a reserved block. ``HAWKER_KV_RUNS=0`` turns placement
off (blocks then come from the free queue's front, as before).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hawker.engine.request import Request
from hawker.switches import switch_on

# A block's identity in the prefix cache: the previous block's key hash and
# this block's tokens. The dict compares the token tuples exactly, so only
# a 64-bit collision in the chained parent hash could alias two prefixes.
BlockKey = tuple[int, tuple[int, ...]]
_ROOT_HASH = 0

# At most this many free blocks past a request's last one are kept for its
# growth (512 tokens at the default block size): enough for most outputs in
# one run, few enough that many requests' reservations fit in the pool.
MAX_RESERVED_BLOCKS = 32
# Reservations together stay under 1/8 of the pool. Where the pool is full of
# cached prefixes a reservation is made by evicting the oldest ones early, so
# this bounds what placement costs the prefix cache.
RESERVED_POOL_FRACTION = 8
KV_RUNS_VARIABLE = "HAWKER_KV_RUNS"


def kv_runs_on() -> bool:
    """``HAWKER_KV_RUNS``: 1 (the default) or 0; another value is a ValueError."""
    return switch_on(KV_RUNS_VARIABLE)


def _chain_keys(
    token_ids: Sequence[int], block_size: int, first_block: int, parent: int, num_tokens: int | None = None
) -> Iterator[BlockKey]:
    """Keys of the full blocks of the first ``num_tokens`` (default all) from ``first_block`` on.

    ``parent`` is the hash of the key before ``first_block``.
    """
    end = len(token_ids) if num_tokens is None else num_tokens
    for i in range(first_block, end // block_size):
        key = (parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        yield key
        parent = hash(key)


def prefix_block_keys(token_ids: Sequence[int], block_size: int) -> list[BlockKey]:
    """The prefix-cache keys of every full block of ``token_ids``, in order.

    The same hash chain the cache itself uses, so anyone holding the keys of
    a prompt (a data-parallel router) can ask several caches about it
    without hashing it once per cache. ``hash(key)`` is the block's chain hash.
    """
    return list(_chain_keys(token_ids, block_size, 0, _ROOT_HASH))


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, place_in_runs: bool = True
    ) -> None:
        """``place_in_runs``: a request's blocks in runs of consecutive ids (module docstring); else any free."""
        self.num_blocks = num_blocks
        self.place_in_runs = place_in_runs
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        # Blocks with ref count 0, least recently used first. Cached blocks
        # stay here (reusable) until popped for a new allocation.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # 1 where a block is free, caches nothing and is reserved for nobody:
        # where new runs are placed (bytes.find finds a run in C).
        self.open_blocks = bytearray(b"\x01") * num_blocks
        # Free blocks kept for a request's growth, and each request's, in order.
        self.reserved_for: dict[int, str] = {}
        self.reservations: dict[str, list[int]] = {}
        self.block_tables: dict[str, list[int]] = {}
        self.stats = PrefixCacheStats()
        # Parent hash of every chain's first block; changes when cached KV goes stale.
        self.root_hash = _ROOT_HASH

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_of(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    # ------------------------------------------------------------ prefix cache
    def update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` to cover every full block of its tokens."""
        hashes = request.block_hashes
        if request.hash_root is None:
            request.hash_root = self.root_hash
        parent = hashes[-1] if hashes else request.hash_root
        # Pending tokens (overlap scheduling) are not known yet: their blocks wait.
        for key in _chain_keys(request.token_ids, self.block_size, len(hashes), parent, request.num_known_tokens):
            hashes.append(hash(key))

    def _key(self, request: Request, index: int) -> BlockKey:
        bs = self.block_size
        assert request.hash_root is not None, "update_block_hashes sets the root first"
        parent = request.block_hashes[index - 1] if index else request.hash_root
        return parent, tuple(request.token_ids[index * bs : (index + 1) * bs])

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks covering the longest prefix, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return []
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: list[int] = []
        for i in range(min(max_blocks, len(request.block_hashes))):
            block = self.cached.get(self._key(request, i))
            if block is None:
                break
            found.append(block)
        return found

    def num_cached_leading_blocks(self, keys: Sequence[BlockKey]) -> int:
        """How many of the leading ``keys`` (from ``prefix_block_keys``) are in the prefix cache.

        Read-only: no LRU move, no ref count, no hit statistics, so a router
        may ask every replica about every prompt. It may run on another thread
        than the one stepping the engine: each dict lookup is atomic, and a
        slightly stale answer only makes a routing choice slightly worse.
        """
        count = 0
        for key in keys:
            if key not in self.cached:
                break
            count += 1
        return count

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queried_tokens += num_tokens
        self.stats.hit_tokens += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        self.update_block_hashes(request)
        table = self.block_tables.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(table), len(request.block_hashes))
        for i in range(num_full):
            block = table[i]
            if self.block_keys[block] is not None:
                continue
            key = self._key(request, i)
            if key in self.cached:
                continue  # the same content already lives in another block
            self.block_keys[block] = key
            self.cached[key] = block

    # -------------------------------------------------------------- allocation
    def allocate(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Give the request blocks for ``num_computed_tokens + num_new_tokens``.

        ``computed_blocks`` (prefix-cache hits or a sibling's prompt blocks)
        are prepended to a new request's table. Returns False and changes
        nothing when the pool cannot cover the request.
        """
        table = self.block_tables.get(request.request_id, [])
        have = len(table) + len(computed_blocks)
        num_cached_tokens = len(computed_blocks) * self.block_size
        total = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        need = self.blocks_needed(total) - have
        revived = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        if need > self.num_free_blocks - revived:
            return False
        for block in computed_blocks:
            self._take(block)
        table = [*table, *computed_blocks]
        if need > 0:
            table.extend(self._place(request.request_id, table, need, self._growth_blocks(request, len(table) + need)))
        self.block_tables[request.request_id] = table
        return True

    def _growth_blocks(self, request: Request, have: int) -> int:
        """Blocks worth reserving past ``have``: the request's longest possible length, capped."""
        longest = self.blocks_needed(request.num_prompt_tokens + request.max_tokens)
        budget = self.num_blocks // RESERVED_POOL_FRACTION
        share = budget // (len(self.block_tables) + 1)
        unclaimed = budget - len(self.reserved_for) + len(self.reservations.get(request.request_id, ()))
        return max(0, min(longest - have, MAX_RESERVED_BLOCKS, share, unclaimed))

    def _place(self, request_id: str, table: list[int], count: int, growth: int) -> list[int]:
        """``count`` free blocks for the request whose table is ``table``, each after the last where possible."""
        blocks: list[int] = []
        last = table[-1] if table else None
        while len(blocks) < count:
            if not self.place_in_runs:
                block = next(iter(self.free_queue))  # uncached blocks first, then the LRU cached one
            elif last is not None and self._is_successor_free(last + 1, request_id):
                block = last + 1
            else:
                # A new run: what was reserved after the old tail no longer follows the table.
                self._release_reservations(request_id)
                start = self._find_run(count - len(blocks), growth)
                if start is None:  # too little open space: the oldest cached blocks were next to go anyway
                    self._evict_oldest(count - len(blocks) + growth - self.open_blocks.count(1))
                    start = self._find_run(count - len(blocks), growth)
                block = start if start is not None else self._fallback_block()
            key = self.block_keys[block]
            if key is not None:  # evict the least recently used cached block
                del self.cached[key]
                self.block_keys[block] = None
            self._claim(block)
            blocks.append(block)
            last = block
        if self.place_in_runs:
            self._reserve_after(request_id, last, growth)
        return blocks

    def _is_successor_free(self, block: int, request_id: str) -> bool:
        """Whether ``block`` is free, caches nothing and is reserved for nobody else."""
        if block >= self.num_blocks or self.ref_counts[block] or self.block_keys[block] is not None:
            return False
        return self.reserved_for.get(block, request_id) == request_id

    def _find_run(self, count: int, growth: int) -> int | None:
        """Start of the first open run of ``count + growth`` blocks, else of ``count``, else None."""
        for length in dict.fromkeys((count + growth, count)):
            start = self.open_blocks.find(b"\x01" * length)
            if start >= 0:
                return start
        return None

    def _evict_oldest(self, count: int) -> None:
        """Drop the ``count`` least recently used free cached blocks from the cache, leaving them open.

        Evicted in LRU order, as allocation would evict them block by block,
        but at once, so that a finished request's blocks come back as a run.
        """
        victims: list[int] = []
        for block in self.free_queue:
            if len(victims) >= count:
                break
            if self.block_keys[block] is not None:
                victims.append(block)
        for block in victims:
            key = self.block_keys[block]
            assert key is not None
            del self.cached[key]
            self.block_keys[block] = None
            self.open_blocks[block] = 1

    def _fallback_block(self) -> int:
        """Any free block: an open one, then another request's reserved one, then the LRU cached one."""
        block = self.open_blocks.find(1)
        if block >= 0:
            return block
        if self.reserved_for:
            return next(iter(self.reserved_for))
        return next(iter(self.free_queue))

    def _reserve_after(self, request_id: str, last: int | None, growth: int) -> None:
        """Reserve the open blocks right after ``last`` for the request, up to ``growth`` of them."""
        if last is None:
            return
        reserved = self.reservations.setdefault(request_id, [])
        for block in range(last + 1, min(last + 1 + growth, self.num_blocks)):
            if self.reserved_for.get(block) == request_id:
                continue
            if not self.open_blocks[block]:
                break
            self.open_blocks[block] = 0
            self.reserved_for[block] = request_id
            reserved.append(block)

    def _release_reservations(self, request_id: str) -> None:
        """Hand the request's reserved blocks back to everyone."""
        for block in self.reservations.pop(request_id, ()):  # a taken block left its owner's list (_claim)
            del self.reserved_for[block]
            self.open_blocks[block] = 1

    def free(self, request: Request) -> None:
        """Return every block of the request; tail blocks are evicted first."""
        table = self.block_tables.pop(request.request_id, [])
        self._release_reservations(request.request_id)
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed twice (request {request.request_id})")
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_keys[block] is None:
                    # Uncached blocks hold nothing reusable: hand them out first.
                    self.free_queue.move_to_end(block, last=False)
                    self.open_blocks[block] = 1

    def reset_prefix_cache(self) -> None:
        for key, block in list(self.cached.items()):
            if self.ref_counts[block] == 0:
                del self.cached[key]
                self.block_keys[block] = None
                self.open_blocks[block] = 1

    def invalidate_prefix_cache(self) -> None:
        """Never match any block cached so far again (the KV it holds was computed with old weights).

        Free cached blocks are dropped; blocks still in use stay registered
        under the old root hash, like the chains of the requests running now,
        so no request that arrives later can reach them.
        """
        self.reset_prefix_cache()
        self.root_hash = hash((self.root_hash, "next"))

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._claim(block)
        else:
            self.ref_counts[block] += 1

    def _claim(self, block: int) -> None:
        """Take a free block for one owner: out of the free queue, the prefix cache and any reservation."""
        del self.free_queue[block]
        self.ref_counts[block] = 1
        self.open_blocks[block] = 0
        owner = self.reserved_for.pop(block, None)
        if owner is not None:
            self.reservations[owner].remove(block)

    # --------------------------------------------------------------- checking
    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's books do not balance."""
        counts = [0] * self.num_blocks
        for table in self.block_tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "ref counts disagree with block tables"
        free = set(self.free_queue)
        assert len(free) == len(self.free_queue)
        for block in range(self.num_blocks):
            assert (block in free) == (self.ref_counts[block] == 0), f"block {block} free-list mismatch"
        for key, block in self.cached.items():
            assert self.block_keys[block] == key, f"cached block {block} key mismatch"
        for block in range(self.num_blocks):
            clean_free = block in free and self.block_keys[block] is None
            reserved = block in self.reserved_for
            assert not reserved or clean_free, f"reserved block {block} is in use or cached"
            assert self.open_blocks[block] == (clean_free and not reserved), f"block {block} open-map mismatch"
        for owner, blocks in self.reservations.items():
            assert owner in self.block_tables, f"request {owner} holds reservations but no blocks"
            assert all(self.reserved_for.get(block) == owner for block in blocks), f"{owner}'s reservations disagree"
        assert sum(len(blocks) for blocks in self.reservations.values()) == len(self.reserved_for)
