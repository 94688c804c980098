"""The cpu_attention_worker's side of the data plane: creates the four shared-memory regions for a
spec, runs the C++ serving loop over them, and keeps the registry of regions by name (after
Triton's shared-memory registry: setup, status, unregister, teardown)."""

import errno
import logging

from apex_serve.errors import InvalidArgument, NotFound, ResourceExhausted
from cpu_attention_worker import _kernel, shm
from cpu_attention_worker.config import CpuAttentionConfig
from cpu_attention_worker.data_plane import REGIONS, DataPlaneSpec, RegionLayout, geometry, layout

logger = logging.getLogger(__name__)


def resolve_num_blocks(spec: DataPlaneSpec, kv_budget_bytes: int) -> DataPlaneSpec:
    """The spec with num_blocks set: as asked, or (0) as many as kv_budget_bytes holds."""
    if spec.num_blocks > 0:
        return spec
    num_blocks = kv_budget_bytes // spec.block_bytes
    if num_blocks < 1:
        raise InvalidArgument(
            "num_blocks", f"0 sizes the pool from kv_budget_bytes={kv_budget_bytes}, which is under one block "
            f"({spec.block_bytes} bytes: K and V of every layer)",
        )
    return spec.with_num_blocks(num_blocks)


class DataPlane:
    """Four mapped regions and the serving thread over them."""

    def __init__(self, requested: DataPlaneSpec, config: CpuAttentionConfig) -> None:
        self.requested = requested
        self.spec = resolve_num_blocks(requested, config.kv_budget_bytes)
        self.layout: dict[str, RegionLayout] = layout(self.spec)
        self.regions: dict[str, shm.Region] = {}
        try:
            for key in REGIONS:
                self.regions[key] = shm.create_region(key, self.layout[key].nbytes, huge_pages=key == "kv")
            buffers = [self.regions[key].buffer for key in REGIONS]
            self._loop: _kernel.ServingLoop | None = _kernel.ServingLoop(
                *buffers, geometry=geometry(self.spec), dtype=self.spec.kv_dtype,
                num_threads=config.num_threads, spin_us=config.spin_us,
            )
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOSPC:
                raise ResourceExhausted(f"/dev/shm has no room for the data plane of {self.spec}") from exc
            raise
        except BaseException:
            self.close()
            raise
        logger.info(
            "data plane up: %d CPU KV blocks (%.1f MiB), regions %s",
            self.spec.num_blocks, self.layout["kv"].nbytes / 2**20, ", ".join(r.name for r in self.regions.values()),
        )

    def matches(self, requested: DataPlaneSpec) -> bool:
        return requested in (self.requested, self.spec)

    def close(self) -> None:
        """Stops the serving thread, then unlinks and unmaps every region; idempotent."""
        loop, self._loop = getattr(self, "_loop", None), None
        if loop is not None:
            loop.stop()
            del loop  # releases the loop's hold on the region buffers
        for region in self.regions.values():
            region.close()
        self.regions.clear()


class DataPlaneRegistry:
    """The live data plane (at most one) and its registered regions by name."""

    def __init__(self, config: CpuAttentionConfig) -> None:
        self._config = config
        self._plane: DataPlane | None = None
        self._registered: dict[str, shm.Region] = {}

    @property
    def plane(self) -> DataPlane | None:
        return self._plane

    def setup(self, requested: DataPlaneSpec) -> DataPlane:
        """The data plane for the spec: the live one when it matches and no region of it was
        unregistered, otherwise a new one (the old one torn down first)."""
        plane = self._plane
        if plane is not None and plane.matches(requested) and len(self._registered) == len(REGIONS):
            return plane
        self.teardown()
        plane = DataPlane(requested, self._config)
        self._plane = plane
        self._registered = {region.name: region for region in plane.regions.values()}
        return plane

    def status(self, name: str | None = None) -> list[tuple[str, int]]:
        """(name, nbytes) of the registered regions, or of the one named; NotFound for an unknown name."""
        if name is None:
            return [(region.name, region.nbytes) for region in self._registered.values()]
        if name not in self._registered:
            raise NotFound(f"region {name!r} is not registered")
        return [(name, self._registered[name].nbytes)]

    def unregister(self, name: str) -> None:
        """Unlinks a region's name (mappings stay valid until teardown); NotFound for an unknown name."""
        region = self._registered.pop(name, None)
        if region is None:
            raise NotFound(f"region {name!r} is not registered")
        region.unlink()
        logger.info("unregistered region %s", name)

    def teardown(self) -> None:
        """Stops the serving loop and unlinks and unmaps every region; idempotent."""
        plane, self._plane = self._plane, None
        self._registered = {}
        if plane is not None:
            plane.close()
            logger.info("data plane torn down")
