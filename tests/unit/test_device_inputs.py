"""One host-to-device copy for a step's inputs (gpu_worker.device_inputs): the packed bytes read back as the tensors
they were, and a whole sub-batch's layout reaches a device (here the meta device, which records copies but holds no
data) through a single copy."""

import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from apex_serve.types import Placement, SamplingParams
from gpu_worker.device_inputs import ALIGN, pack, to_device_together, unpack
from gpu_worker.step_batch import RequestState, layout_sub_batch, schedule


class Copies(TorchDispatchMode):
    """Counts the copies made to the meta device under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: object, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if str(func.overloadpacket) in ("aten._to_copy", "aten.copy_") and isinstance(out, torch.Tensor) \
                and out.device.type == "meta":
            self.calls[str(func.overloadpacket)] += 1
        return out


def test_packed_tensors_read_back_in_their_dtypes_shapes_and_values() -> None:
    tensors = [torch.arange(5, dtype=torch.long), torch.tensor([[True, False, True]]),
               torch.arange(7, dtype=torch.int32), torch.tensor([], dtype=torch.long),
               torch.arange(6, dtype=torch.long).reshape(2, 3)]
    host, spans = pack(tensors)
    assert all(start % ALIGN == 0 for start, _ in spans)
    back = unpack(host.clone(), tensors, spans)
    for got, want in zip(back, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_on_the_cpu_device_the_tensors_are_used_as_they_are() -> None:
    tensors = [torch.arange(3), torch.ones(2, 2, dtype=torch.long)]
    assert all(a is b for a, b in zip(to_device_together(tensors, torch.device("cpu")), tensors))


def test_a_sub_batch_with_prefills_chunks_and_decodes_reaches_the_device_in_one_copy() -> None:
    greedy = SamplingParams(temperature=0.0)
    requests = {
        "prefill": RequestState(list(range(10)), 10, greedy, [0, 1, 2], Placement.GPU),
        "chunk": RequestState(list(range(20)), 20, greedy, [3, 4, 5, 6, 7], Placement.GPU, num_computed_tokens=8),
        "decode": RequestState(list(range(9)), 6, greedy, [8, 9, 10], Placement.GPU, num_computed_tokens=8),
        "cpu": RequestState(list(range(7)), 5, greedy, [0, 1], Placement.CPU, num_computed_tokens=6),
    }
    scheduled = [schedule("prefill", requests["prefill"], 0, True), schedule("chunk", requests["chunk"], 8, False),
                 schedule("decode", requests["decode"], 0, False), schedule("cpu", requests["cpu"], 0, False)]
    with Copies() as copies:
        batch = layout_sub_batch(0, scheduled, requests, 4, 8, torch.device("meta"))
    assert sum(copies.calls.values()) == 1, copies.calls
    meta = batch.device_metadata
    assert batch.input_ids.device.type == "meta" and batch.input_ids.shape == (10 + 8 + 1 + 1,)
    assert meta.decode_block_tables.shape == (1, 3) and meta.context_tables[1].shape == (2,)
    assert meta.decode_mask.device.type == "meta" and 1 in meta.chunk_masks
