"""`deltamem serve`: the API server with its engine and store."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .settings import add_arguments, exposure_problem, from_args, serves_open


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve the OpenAI-compatible API (/v1/chat/completions with session_id, /v1/models, "
        "/v1/sessions, /health, /metrics) on vLLM with δ-mem. Every flag can also be set by "
        "its DELTAMEM_* environment variable.")
    add_arguments(p)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = from_args(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    if problem := exposure_problem(settings):
        logging.getLogger("deltamem.server").error("%s", problem)
        return 2
    if serves_open(settings):
        logging.getLogger("deltamem.server").warning(
            "serving on %s WITHOUT authentication (--allow-open): anyone who reaches the port "
            "can read and delete every session", settings.host)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    uvicorn.run(create_app(settings), host=settings.host, port=int(settings.port),
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=10)
    return 0
