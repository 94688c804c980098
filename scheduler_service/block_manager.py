"""KV block accounting: a free list of block ids. The worker owns the memory; this owns who holds which block."""

from collections import deque
from collections.abc import Iterable


class BlockManager:
    """A pool of num_blocks blocks of block_size tokens each; token position p lives in block p // block_size."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.block_size = block_size
        self._num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    def num_blocks_for(self, n_tokens: int) -> int:
        """Blocks that hold n_tokens tokens from position 0."""
        return -(-n_tokens // self.block_size)

    def allocate(self, n_tokens: int) -> list[int]:
        """Block ids for a sequence of n_tokens tokens, taken from the free list."""
        return self._take(self.num_blocks_for(n_tokens))

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the pool; all or none: a foreign, repeated or already free id raises ValueError."""
        ids = list(block_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"block_ids: {ids} repeats a block id")
        stray = [b for b in ids if b not in self._used]
        if stray:
            raise ValueError(f"block_ids: {stray} are free already or not in [0, {self._num_blocks})")
        self._used.difference_update(ids)
        self._free.extend(ids)

    def take_one(self) -> int:
        """One block id from the free list (a decode slot's next block)."""
        if not self._free:
            raise ValueError(f"asked for 1 block, 0 free of {self._num_blocks}")
        block = self._free.popleft()
        self._used.add(block)
        return block

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"asked for {n} blocks, {len(self._free)} free of {self._num_blocks}")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids
