"""Which row counts decode graphs are captured at, and that a bucket is captured once per sub-batch slot, two pieces
per layer, on its first use (the graphed path's tokens are checked in tests/services/test_hybrid_execution.py)."""

from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_worker.config import GpuWorkerConfig
from gpu_worker.decode_graphs import DecodeGraphs, buckets
from gpu_worker.model_runner import ModelRunner


@pytest.mark.parametrize(("max_rows", "sizes"), [
    (64, (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)),
    (5, (1, 2, 4, 5)),
    (20, (1, 2, 4, 8, 16, 20)),
    (1, (1,)),
    (0, ()),
])
def test_buckets_double_to_8_then_step_by_8_and_end_at_the_limit(max_rows: int, sizes: tuple[int, ...]) -> None:
    assert buckets(max_rows) == sizes


def test_a_bucket_is_captured_per_slot_on_first_use_two_pieces_per_layer_and_replayed_after(
    default_model_dir: Path,
) -> None:
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(default_model_dir), device="cpu", num_kv_blocks=8))
    layers = len(runner.weights.layers)
    captured = []

    def capture(work: Callable[[], None]) -> Callable[[], None]:  # counts, as cuda_capture would capture
        captured.append(work)
        return work

    graphs = DecodeGraphs(runner.weights, 8, capture)
    assert graphs.layers_for(3).rows == 4 and len(captured) == 2 * layers
    assert graphs.layers_for(4).rows == 4 and len(captured) == 2 * layers, "a used bucket was captured again"
    assert graphs.layers_for(5).rows == 8 and len(captured) == 4 * layers
    assert graphs.layers_for(9) is None
    assert graphs.replays == {4: 2, 8: 1}
    other = graphs.layers_for(3, slot=1)
    assert len(captured) == 6 * layers and other is not graphs.layers_for(3, slot=0), "sub-batches share buffers"


def test_a_negative_graph_limit_is_refused(default_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="cuda_graph_max_rows: must be >= 0"):
        GpuWorkerConfig(model_dir=str(default_model_dir), cuda_graph_max_rows=-1)
