"""POSIX shared-memory segments of the data plane: files in /dev/shm named
`apex-serve.<pid>.<random hex>.<region>` (pid: the creating process), mode 0600, mapped shared.

Not multiprocessing.shared_memory: its resource tracker unlinks segments and warns at exit. The
creator unlinks on close; `remove_stale()` removes the segments of creators that are gone.
"""

import logging
import mmap
import os
import re
import secrets
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "apex-serve"
_NAME = re.compile(rf"^{re.escape(PREFIX)}\.(\d+)\.[0-9a-f]+\.[a-z_]+$")


def _pid_of(name: str) -> int:
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f"name: {name!r} is not an {PREFIX} segment name ({PREFIX}.<pid>.<hex>.<region>)")
    return int(match.group(1))


class Region:
    """One mapped segment. `buffer` is a uint8 view of the whole mapping; views of it must be
    dropped before close() for the mapping to go at once, otherwise it goes with the last view."""

    def __init__(self, name: str, memory: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.nbytes = len(memory)
        self.owner = owner  # created here: unlinked by close()
        self._memory: mmap.mmap | None = memory
        self.buffer: np.ndarray | None = np.frombuffer(memory, dtype=np.uint8)  # [nbytes]

    @property
    def path(self) -> Path:
        return SHM_DIR / self.name

    def unlink(self) -> None:
        """Removes the name (existing mappings stay valid); idempotent."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmaps (and unlinks when owned); idempotent."""
        if self.owner:
            self.unlink()
        self.buffer = None
        if self._memory is None:
            return
        try:
            self._memory.close()
        except BufferError:
            logger.debug("segment %s still has views; it is unmapped when the last one goes", self.name)
        self._memory = None


def _map(fd: int, nbytes: int, huge_pages: bool) -> mmap.mmap:
    memory = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


def create_region(region: str, nbytes: int, huge_pages: bool = False) -> Region:
    """A new zeroed segment for `region` (e.g. "kv"), its memory reserved now: OSError (ENOSPC)
    here rather than SIGBUS later when /dev/shm is too small."""
    if not re.fullmatch(r"[a-z_]+", region):
        raise ValueError(f"region: expected lowercase letters and '_', got {region!r}")
    if nbytes <= 0:
        raise ValueError(f"nbytes: must be positive, got {nbytes}")
    name = f"{PREFIX}.{os.getpid()}.{secrets.token_hex(6)}.{region}"
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        os.posix_fallocate(fd, 0, nbytes)
        memory = _map(fd, nbytes, huge_pages)
    except BaseException:
        (SHM_DIR / name).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return Region(name, memory, owner=True)


def open_region(name: str, nbytes: int, huge_pages: bool = False) -> Region:
    """Maps an existing segment created by another process; ValueError unless it holds nbytes."""
    _pid_of(name)
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise ValueError(f"{name}: segment holds {size} bytes, the layout needs {nbytes}")
        memory = _map(fd, nbytes, huge_pages)
    finally:
        os.close(fd)
    return Region(name, memory, owner=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Unlinks the segments whose creating process is gone; returns their names."""
    removed = []
    for path in sorted(SHM_DIR.glob(f"{PREFIX}.*")):
        try:
            pid = _pid_of(path.name)
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        logger.info("removed %d stale shared-memory segments: %s", len(removed), ", ".join(removed))
    return removed
