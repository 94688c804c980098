"""KV block accounting of both pools (DESIGN §1): the accelerator's and the cpu_attention_worker's. A request's KV
lives wholly in one pool; it grows one slot per decoded token and moves between the pools by swaps."""

from apex_serve.types import Placement, SwapData
from scheduler_service.block_manager import BlockManager
from scheduler_service.request import Request


class KVManager:
    """Who holds which block of which pool; the workers own the memory."""

    def __init__(self, gpu_blocks: int, cpu_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._pools = {Placement.GPU: BlockManager(gpu_blocks, block_size)}
        if cpu_blocks:
            self._pools[Placement.CPU] = BlockManager(cpu_blocks, block_size)
        self._peak_blocks = {placement: 0 for placement in self._pools}  # its requests' blocks at their peak, summed

    def reserved(self, placement: Placement) -> int:
        """Blocks the pool's requests may still take before they reach their peak."""
        pool = self._pools.get(placement)
        if pool is None:
            return 0
        return self._peak_blocks[placement] - (pool.num_total_blocks - pool.num_free_blocks)

    def _track(self, request: Request, sign: int) -> None:
        self._peak_blocks[request.placement] += sign * max(self.blocks_for(request.peak_tokens),
                                                           len(request.block_ids))

    def num_free(self, placement: Placement) -> int:
        pool = self._pools.get(placement)
        return 0 if pool is None else pool.num_free_blocks

    def num_total(self, placement: Placement) -> int:
        pool = self._pools.get(placement)
        return 0 if pool is None else pool.num_total_blocks

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_allocate(self, placement: Placement, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) <= self.num_free(placement)

    def allocate(self, request: Request, placement: Placement, n_tokens: int) -> None:
        """Blocks for the request's first n_tokens tokens in `placement`; it must hold none."""
        if request.block_ids:
            raise ValueError(f"{request.request_id}: holds {len(request.block_ids)} blocks already")
        request.block_ids = self._pools[placement].allocate(n_tokens)
        request.placement = placement
        self._track(request, 1)

    def needs_block(self, request: Request) -> bool:
        """Whether decoding its next token (KV slot kv_len) takes a new block."""
        return request.num_tokens > len(request.block_ids) * self.block_size

    def grow(self, request: Request) -> list[int]:
        """The new block (or none) for the slot of its next token, from its own pool."""
        if not self.needs_block(request):
            return []
        new = self._pools[request.placement].allocate(1)
        request.block_ids.extend(new)
        return new

    def can_swap(self, request: Request) -> bool:
        return request.placement.other in self._pools and self.can_allocate(request.placement.other, request.kv_len)

    def swap(self, request: Request) -> SwapData:
        """Move its cached tokens' blocks to the other pool; the source blocks are free once the swap is planned."""
        target = request.placement.other
        new = self._pools[target].allocate(request.kv_len)
        self._pools[request.placement].free(request.block_ids)
        self._track(request, -1)
        request.block_ids, request.placement = new, target
        self._track(request, 1)
        return SwapData(request.request_id, tuple(new))

    def free(self, request: Request) -> None:
        self._pools[request.placement].free(request.block_ids)
        self._track(request, -1)
        request.block_ids = []
