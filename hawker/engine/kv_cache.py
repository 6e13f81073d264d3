"""Paged KV cache bookkeeping: block pool, block tables, prefix cache.

This module never touches tensors: it hands out block ids; the model runner
owns the storage. Full blocks are keyed by a hash chain over their tokens so
that a new request can reuse every cached full block of its prefix. Blocks
nobody references stay cached in an LRU free queue until the pool needs them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hawker.engine.request import Request

# A block's identity in the prefix cache: the previous block's key hash and
# this block's tokens. The dict compares the token tuples exactly, so only
# a 64-bit collision in the chained parent hash could alias two prefixes.
BlockKey = tuple[int, tuple[int, ...]]
_ROOT_HASH = 0


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
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        # Blocks with ref count 0, least recently used first. Cached blocks
        # stay here (reusable) until popped for a new allocation.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
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
        new_blocks = [self._pop_free() for _ in range(max(0, need))]
        self.block_tables[request.request_id] = [*table, *computed_blocks, *new_blocks]
        return True

    def free(self, request: Request) -> None:
        """Return every block of the request; tail blocks are evicted first."""
        table = self.block_tables.pop(request.request_id, [])
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed twice (request {request.request_id})")
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_keys[block] is None:
                    # Uncached blocks hold nothing reusable: hand them out first.
                    self.free_queue.move_to_end(block, last=False)

    def reset_prefix_cache(self) -> None:
        for key, block in list(self.cached.items()):
            if self.ref_counts[block] == 0:
                del self.cached[key]
                self.block_keys[block] = None

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
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        key = self.block_keys[block]
        if key is not None:  # evict the least recently used cached block
            del self.cached[key]
            self.block_keys[block] = None
        self.ref_counts[block] = 1
        return block

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
