"""The one log line shape of every tokenbus process: "2026-11-29T04:40:00.123Z component LEVEL message"."""

from __future__ import annotations

import logging
import sys
import time


def configure(component: str, level: int = logging.INFO) -> None:
    logging.Formatter.converter = time.gmtime
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format=f"%(asctime)s.%(msecs)03dZ {component} %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        force=True,
    )
