"""Logging for the runtime: warnings print once per job (rank 0), not once per rank."""
import logging
import os

logger = logging.getLogger("dsinfer")


def warn(msg: str, *args) -> None:
    if os.environ.get("RANK", "0") == "0":
        logger.warning(msg, *args)


def info(msg: str, *args) -> None:
    if os.environ.get("RANK", "0") == "0":
        logger.info(msg, *args)
