"""BlockManager: a free list of KV block ids with strict ownership checks."""

import pytest

from scheduler_service.block_manager import BlockManager


def test_allocate_takes_ceil_of_tokens_over_block_size_distinct_ids() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    a = bm.allocate(9)  # 3 blocks
    b = bm.allocate(4)  # 1 block
    assert len(a) == 3 and len(b) == 1
    assert len(set(a + b)) == 4
    assert all(0 <= i < 10 for i in a + b)
    assert bm.num_free_blocks == 6 and bm.num_total_blocks == 10


def test_allocate_zero_tokens_takes_no_block() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.allocate(0) == []
    assert bm.num_free_blocks == 2


def test_allocate_beyond_free_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(ValueError):
        bm.allocate(9)
    assert bm.num_free_blocks == 2


def test_free_returns_blocks_for_reuse() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    ids = bm.allocate(8)
    bm.free(ids)
    assert bm.num_free_blocks == 2
    assert sorted(bm.allocate(8)) == sorted(ids)


def test_double_free_raises() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    ids = bm.allocate(4)
    bm.free(ids)
    with pytest.raises(ValueError, match="block_ids"):
        bm.free(ids)
    assert bm.num_free_blocks == 2


@pytest.mark.parametrize("block_id", [-1, 2, 99])
def test_free_of_foreign_id_raises(block_id: int) -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(8)
    with pytest.raises(ValueError, match="block_ids"):
        bm.free([block_id])
    assert bm.num_free_blocks == 0


def test_free_of_never_allocated_id_raises() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="block_ids"):
        bm.free([0])


def test_free_with_repeated_id_raises_and_frees_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    ids = bm.allocate(12)
    with pytest.raises(ValueError, match="repeats"):
        bm.free([ids[0], ids[1], ids[0]])
    assert bm.num_free_blocks == 0
    bm.free(ids)
    assert bm.num_free_blocks == 3


def test_free_with_one_bad_id_frees_none_of_the_others() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    ids = bm.allocate(8)
    (spare,) = {0, 1, 2} - set(ids)
    with pytest.raises(ValueError):
        bm.free(ids + [spare])
    assert bm.num_free_blocks == 1


@pytest.mark.parametrize(("num_blocks", "block_size", "field"), [(0, 4, "num_blocks"), (4, 0, "block_size")])
def test_bad_sizes_raise_naming_the_field(num_blocks: int, block_size: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BlockManager(num_blocks, block_size)
