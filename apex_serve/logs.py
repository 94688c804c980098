"""Logging set-up, called by entry points only. APEX_LOG_LEVEL overrides the level."""

import logging
import os


def configure_logging(service: str) -> None:
    logging.basicConfig(
        level=os.environ.get("APEX_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
