"""KV block accounting of both pools (DESIGN §1): the accelerator's and the cpu_attention_worker's. A request's KV
lives wholly in one pool; it grows one slot per decoded token and moves between the pools by swaps."""

from apex_serve.types import Placement, SwapData
from scheduler_service.block_manager import BlockManager
from scheduler_service.request import Request


class KVManager:
    """Who holds which block of which pool; the workers own the memory. (The pools are looked up by identity, not in a
    dict: hashing an Enum member runs Python code, and this is on every iteration's path.)"""

    def __init__(self, gpu_blocks: int, cpu_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._gpu = BlockManager(gpu_blocks, block_size)
        self._cpu = BlockManager(cpu_blocks, block_size) if cpu_blocks else None
        self._gpu_peak_blocks = 0  # the pool's requests' blocks at their peak, summed
        self._cpu_peak_blocks = 0

    def set_cpu_pool(self, num_blocks: int) -> None:
        """A new CPU pool of num_blocks blocks, all free (0: no CPU pool, nothing can be placed there); only while no
        request holds a CPU block."""
        if self._cpu is not None and self._cpu.num_free_blocks < self._cpu.num_total_blocks:
            raise ValueError(f"the CPU pool: {self._cpu.num_total_blocks - self._cpu.num_free_blocks} blocks are held")
        self._cpu = BlockManager(num_blocks, self.block_size) if num_blocks else None
        self._cpu_peak_blocks = 0

    def _pool(self, placement: Placement) -> BlockManager | None:
        return self._gpu if placement is Placement.GPU else self._cpu

    def reserved(self, placement: Placement) -> int:
        """Blocks the pool's requests may still take before they reach their peak."""
        pool = self._pool(placement)
        if pool is None:
            return 0
        peak = self._gpu_peak_blocks if placement is Placement.GPU else self._cpu_peak_blocks
        return peak - (pool.num_total_blocks - pool.num_free_blocks)

    def _track(self, request: Request, sign: int) -> None:
        blocks = sign * max(self.blocks_for(request.peak_tokens), len(request.block_ids))
        if request.placement is Placement.GPU:
            self._gpu_peak_blocks += blocks
        else:
            self._cpu_peak_blocks += blocks

    def num_free(self, placement: Placement) -> int:
        pool = self._pool(placement)
        return 0 if pool is None else pool.num_free_blocks

    def num_total(self, placement: Placement) -> int:
        pool = self._pool(placement)
        return 0 if pool is None else pool.num_total_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_allocate(self, placement: Placement, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) <= self.num_free(placement)

    def allocate(self, request: Request, placement: Placement, n_tokens: int) -> None:
        """Blocks for the request's first n_tokens tokens in `placement`; it must hold none."""
        if request.block_ids:
            raise ValueError(f"{request.request_id}: holds {len(request.block_ids)} blocks already")
        request.block_ids = self._existing(placement).allocate(n_tokens)
        request.kv_slots = len(request.block_ids) * self.block_size
        request.placement = placement
        self._track(request, 1)

    def grow(self, request: Request) -> list[int]:
        """The new block (or none) for the slot of its next token (KV slot kv_len), from its own pool."""
        if request.num_tokens <= request.kv_slots:
            return []
        block = self._existing(request.placement).take_one()
        request.block_ids.append(block)
        request.kv_slots += self.block_size
        return [block]

    def swap(self, request: Request) -> SwapData:
        """Move its cached tokens' blocks to the other pool; the source blocks are free once the swap is planned."""
        target = request.placement.other
        new = self._existing(target).allocate(request.kv_len)
        self._existing(request.placement).free(request.block_ids)
        self._track(request, -1)
        request.block_ids, request.placement = new, target
        request.kv_slots = len(new) * self.block_size
        self._track(request, 1)
        return SwapData(request.request_id, tuple(new))

    def free(self, request: Request) -> None:
        self._existing(request.placement).free(request.block_ids)
        self._track(request, -1)
        request.block_ids = []
        request.kv_slots = 0

    def _existing(self, placement: Placement) -> BlockManager:
        pool = self._pool(placement)
        if pool is None:
            raise ValueError(f"placement: there is no {placement.value} pool")
        return pool
