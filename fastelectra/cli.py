"""The ``fastelectra`` command line: ``info``, ``pretrain``, ``finetune``, ``predict``, ``bench``.

Each subcommand lives in the module that owns it and exposes ``add_cli_arguments(parser)`` and
``run_cli(args) -> int``; this file only wires them up, importing a module when its command runs.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

# command -> (module, help)
COMMANDS = {
    "info": ("fastelectra.cli", "versions, GPU and which backends are usable here"),
    "pretrain": ("fastelectra.pretrain", "ELECTRA pretraining from a text corpus"),
    "finetune": ("fastelectra.finetune", "fine-tune a sequence classifier on a CSV/JSONL file"),
    "predict": ("fastelectra.predict", "label a CSV/JSONL file with a fine-tuned classifier"),
    "bench": ("fastelectra.benchmarks.cli",
              "benchmarks (fastelectra bench --help lists them)"),
}


def info_lines() -> list[str]:
    import torch

    from . import __version__, backend

    lines = [f"fastelectra {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU: none visible to torch")
    try:
        in_force = backend.resolve()
    except ValueError as e:          # a bad FASTELECTRA_BACKEND: this command is where to see it
        in_force = f"none: {e}"
    lines.append(f"backend in force: {in_force} (set with the --backend of pretrain, finetune and predict, or "
                 f"{backend.ENV_VAR}, which overrides it)")
    t_ok, t_why = backend.triton_status()
    e_ok, e_why = backend.extension_status()
    lines.append(f"fused attention / layer norm (Triton): {'usable' if t_ok else 'unavailable'} - {t_why}")
    lines.append(f"fused replace_tokens (fastelectra._C): {'usable' if e_ok else 'unavailable'} - {e_why}")
    lines.append("eager (torch reference): usable")
    return lines


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    pass  # `info` takes no arguments


def run_cli(args: argparse.Namespace) -> int:
    """Print :func:`info_lines`; exit status 1 when FASTELECTRA_BACKEND names no backend (every op would fail)."""
    from . import backend

    print("\n".join(info_lines()))
    try:
        backend.resolve()
    except ValueError:
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastelectra", description="Fast ELECTRA pretraining on NVIDIA GPUs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_cli_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run_cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
