"""What every benchmark shares: where its JSON goes, and pinning the device and CPU-worker sides to their cores."""

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def write_result(path: str, result: object) -> Path:
    """The benchmark's result as indented JSON at path (folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", out)
    return out


def two_cores() -> tuple[int | None, int | None]:
    """(device core, CPU-worker core) of the cores this process may use (DESIGN §6); (None, None) with fewer than 2."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


def pinned(cpu: int | None) -> dict:
    """Popen arguments that pin the child to one cpu (None: not pinned)."""
    if cpu is None:
        return {}
    return {"preexec_fn": lambda: os.sched_setaffinity(0, {cpu})}
