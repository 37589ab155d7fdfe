"""Logging set-up: everything goes to stderr so that stdout stays for results (`--json`)."""

from __future__ import annotations

import logging
import os


def setup(verbose: int = 0) -> None:
    level = logging.WARNING - 10 * verbose if verbose else getattr(
        logging, os.environ.get("ADAPTWIN_LOG", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python is chatty at INFO (every connection and rebalance).
    logging.getLogger("kafka").setLevel(max(level, logging.WARNING))
