"""What every benchmark shares: where its JSON and figures go, and how it reports the core a side is pinned to."""

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_result(path: str, result: object) -> Path:
    """The benchmark's result as indented JSON at path (folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", out)
    return out


def save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure laid out and written to path (folders created), then closed."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def one_core(cpus: set[int] | None) -> int | None:
    """The core of a side pinned to one core, as the results report it (None: not pinned)."""
    return None if cpus is None else min(cpus)
