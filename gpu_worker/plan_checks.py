"""Checks that a StepPlan can run on this worker's state, raising InvalidArgument (or FailedPrecondition) that names
the field, the request and the limit. Nothing is changed until every check has passed."""

from apex_serve.errors import FailedPrecondition, InvalidArgument
from apex_serve.types import ExecutionMode, Placement, StepPlan
from gpu_worker.step_batch import RequestState


class PlanChecker:
    def __init__(
        self,
        vocab_size: int,
        max_model_len: int,
        block_size: int,
        pool_blocks: dict[Placement, int],
        max_cpu_rows: int,
    ) -> None:
        self.max_cpu_rows = max_cpu_rows  # CPU decode rows one sub-batch can stage
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.pool_blocks = pool_blocks  # blocks of each pool; 0 CPU blocks: no cpu_attention_worker

    def check(self, plan: StepPlan, requests: dict[str, RequestState]) -> None:
        """Validate the plan against the state after its frees and swaps."""
        placements = {rid: r.placement for rid, r in requests.items() if rid not in plan.freed_request_ids}
        self._check_swaps(plan, requests, placements)
        max_sub_batch = 1 if plan.mode is ExecutionMode.ASYM_PIPELINE else 0
        seen: set[str] = set()
        cpu_rows = [0, 0]
        for new in plan.new_requests:
            rid = new.request_id
            self._once(rid, seen, "new_requests")
            self._check_sub_batch(rid, new.sub_batch, max_sub_batch)
            if not new.token_ids:
                raise InvalidArgument("token_ids", f"request {rid!r} has no tokens")
            if not 0 <= new.num_output_tokens < len(new.token_ids):
                raise InvalidArgument(
                    "num_output_tokens", f"request {rid!r}: {new.num_output_tokens} of {len(new.token_ids)} tokens"
                )
            if not all(0 <= t < self.vocab_size for t in new.token_ids):
                raise InvalidArgument("token_ids", f"request {rid!r} has a token id outside [0, {self.vocab_size})")
            if not 0 <= new.num_scheduled_tokens <= len(new.token_ids):
                raise InvalidArgument("num_scheduled_tokens", f"request {rid!r}: {new.num_scheduled_tokens} is outside "
                                      f"[0, {len(new.token_ids)}] (its tokens; 0: all)")
            self._check_pool(rid, new.placement)
            self._check_blocks(rid, new.placement, list(new.block_ids), len(new.token_ids) - 1)
        for cached in plan.cached_requests:
            rid = cached.request_id
            self._once(rid, seen, "cached_requests")
            self._check_sub_batch(rid, cached.sub_batch, max_sub_batch)
            request = requests.get(rid)
            if request is None or rid not in placements:
                raise InvalidArgument("cached_requests", f"request {rid!r} is not known to the worker")
            placement = placements[rid]
            last_position = self._check_chunk(rid, request, cached.num_scheduled_tokens)
            blocks = self._blocks_after_swaps(plan, request, rid) + list(cached.new_block_ids)
            self._check_blocks(rid, placement, blocks, last_position)
            if cached.num_scheduled_tokens:
                continue  # a chunk: a prefill row, on the accelerator whatever its placement
            if placement is Placement.CPU and plan.mode is ExecutionMode.GPU_ONLY:
                raise InvalidArgument("mode", f"request {rid!r} decodes on the CPU, which a GPU_ONLY step cannot run")
            if placement is Placement.CPU:
                cpu_rows[cached.sub_batch] += 1
                if cpu_rows[cached.sub_batch] > self.max_cpu_rows:
                    raise InvalidArgument("cached_requests", f"sub-batch {cached.sub_batch} has more CPU decode rows "
                                          f"than cpu_max_rows {self.max_cpu_rows}")

    @staticmethod
    def _check_chunk(rid: str, request: RequestState, num_scheduled_tokens: int) -> int:
        """The last position a cached request computes: its chunk's (num_scheduled_tokens > 0, only while it is
        prefilling and within its tokens) or its decode row's (0, only once prefilled)."""
        computed, total = request.num_computed_tokens, len(request.token_ids)
        if num_scheduled_tokens == 0:
            if request.prefilling:
                raise InvalidArgument("num_scheduled_tokens", f"request {rid!r} is still prefilling ({computed} of "
                                      f"{total} tokens computed): 0 (a decode row) needs a prefilled request")
            return total - 1
        if not request.prefilling:
            raise InvalidArgument("num_scheduled_tokens", f"request {rid!r} is not prefilling ({computed} of {total} "
                                  f"tokens computed): {num_scheduled_tokens} must be 0 (a decode row)")
        if not 0 < num_scheduled_tokens <= total - computed:
            raise InvalidArgument("num_scheduled_tokens", f"request {rid!r}: {num_scheduled_tokens} is outside "
                                  f"[1, {total - computed}] (its tokens left to prefill)")
        return computed + num_scheduled_tokens - 1

    def _check_swaps(
        self, plan: StepPlan, requests: dict[str, RequestState], placements: dict[str, Placement]
    ) -> None:
        swapped: set[str] = set()
        directions = (("swap_out", plan.swap_out, Placement.GPU), ("swap_in", plan.swap_in, Placement.CPU))
        for field, swaps, source in directions:
            for swap in swaps:
                rid = swap.request_id
                self._once(rid, swapped, field)
                if rid not in placements:
                    raise InvalidArgument(field, f"request {rid!r} is not known to the worker")
                if placements[rid] is not source:
                    raise InvalidArgument(field, f"request {rid!r} is not in the {source.value} pool")
                request = requests[rid]
                if request.prefilling:
                    raise InvalidArgument(field, f"request {rid!r} is still prefilling ({request.num_computed_tokens} "
                                          f"of {len(request.token_ids)} tokens computed): swap it once prefilled")
                self._check_pool(rid, source.other)
                self._check_blocks(rid, source.other, list(swap.block_ids), requests[rid].num_cached_tokens - 1)
                placements[rid] = source.other

    @staticmethod
    def _blocks_after_swaps(plan: StepPlan, request: RequestState, rid: str) -> list[int]:
        for swap in (*plan.swap_out, *plan.swap_in):
            if swap.request_id == rid:
                return list(swap.block_ids)
        return list(request.block_ids)

    @staticmethod
    def _once(rid: str, seen: set[str], field: str) -> None:
        if rid in seen:
            raise InvalidArgument(field, f"request {rid!r} is scheduled twice")
        seen.add(rid)

    @staticmethod
    def _check_sub_batch(rid: str, sub_batch: int, limit: int) -> None:
        if not 0 <= sub_batch <= limit:
            raise InvalidArgument("sub_batch", f"request {rid!r}: {sub_batch} is outside [0, {limit}] for this mode")

    def _check_pool(self, rid: str, placement: Placement) -> None:
        if self.pool_blocks[placement] == 0:
            raise FailedPrecondition(f"placement: request {rid!r} is placed on the CPU, but no cpu_attention_worker "
                                     "is attached to this gpu_worker (set cpu_worker_address)")

    def _check_blocks(self, rid: str, placement: Placement, block_ids: list[int], last_position: int) -> None:
        if last_position >= self.max_model_len:
            raise InvalidArgument(
                "max_model_len", f"request {rid!r} reaches position {last_position} >= {self.max_model_len}"
            )
        needed = max(last_position, 0) // self.block_size + 1
        if len(block_ids) < needed:
            raise InvalidArgument(
                "block_ids", f"request {rid!r} has {len(block_ids)} blocks, position {last_position} needs {needed}"
            )
        limit = self.pool_blocks[placement]
        if not all(0 <= b < limit for b in block_ids[:needed]):
            raise InvalidArgument(
                "block_ids", f"request {rid!r} has a block id outside [0, {limit}) of the {placement.value} pool"
            )


def cpu_pool_use(plan: StepPlan, requests: dict[str, RequestState]) -> str:
    """How plan uses the CPU pool (a CPU placement, a CPU decode row or chunk, a swap), or "" when it does not."""
    for new in plan.new_requests:
        if new.placement is Placement.CPU:
            return f"request {new.request_id!r} is placed on the CPU"
    for cached in plan.cached_requests:
        request = requests.get(cached.request_id)
        if request is not None and request.placement is Placement.CPU:
            return f"request {cached.request_id!r} is in the CPU pool"
    swaps = (*plan.swap_out, *plan.swap_in)
    return f"request {swaps[0].request_id!r} is swapped" if swaps else ""
