"""Command-line entry point: `medvit <command> ...`.

Each subcommand lives in its own module under `medvit/commands/` exposing
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
command runs (or for `--help` of that command), so `medvit --help` stays fast and one
broken command cannot take down the others. This is the only place that configures logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from medvit.errors import MedvitError
from medvit.hub import OFFLINE_ENV, offline_requested, set_offline_env

_log = logging.getLogger("medvit")

# name -> (module under medvit.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data", "inspect a labels CSV + image folder: per-finding counts, missing files, patient overlap"),
    "prepare": ("prepare", "decode images once into a resized uint8 cache for training/evaluation"),
    "pretrain": ("pretrain", "self-supervised MAE pretraining of a ViT backbone on unlabelled training images"),
    "train": ("train", "train a multi-label classifier from a YAML config"),
    "calibrate": ("calibrate", "fit per-finding calibrators and operating thresholds for a run"),
    "evaluate": ("evaluate", "per-finding metrics, bootstrap CIs and plots on a labelled set"),
    "predict": ("predict", "per-finding calibrated probabilities for files or folders"),
    "export": ("export", "export a run to ONNX (optionally int8) or TorchScript, verified against torch"),
    "bench": ("bench", "measure inference speed, drift and end-to-end latency on this machine"),
    "zeroshot": ("zeroshot", "score free-text prompts against an image with a CLIP model"),
    "zeroshot-eval": ("zeroshot_eval", "per-finding zero-shot AUROC on a labelled set"),
    "align": ("align", "contrastively fine-tune a CLIP model on image-text pairs"),
    "review": ("review", "start the Streamlit review app for clinicians"),
    "reviews": ("reviews", "import reviews made elsewhere (CSV, scored with the run) or export them"),
    "users": ("users", "site-mode accounts of the review app: add, list, disable"),
    "watch": ("watch", "score new CR/DX instances in a PACS (DICOMweb) and store DICOM SR results back"),
}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + exiting, so main() controls the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


_OFFLINE_HELP = (f"never touch the network: no Hugging Face hub downloads, local files and the cache only "
                 f"(same as {OFFLINE_ENV}=1)")


def _load(command: str):
    return importlib.import_module(f"medvit.commands.{COMMANDS[command][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported to add its arguments."""
    parser = _Parser(prog="medvit", description="Chest X-ray review with vision transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--offline", dest="offline_all", action="store_true", help=_OFFLINE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            p.add_argument("--offline", action="store_true", default=None, help=_OFFLINE_HELP)
            _load(name).add_arguments(p)
    return parser


def _configure_logging(verbose: bool) -> None:
    # Third-party libraries (open_clip logs on the root logger) stay at WARNING; medvit's own loggers
    # report progress at INFO, or everything at DEBUG with -v.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _log.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Returns 0 on success, 2 on a user error (one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    _configure_logging(args.verbose)
    if offline_requested(True if args.offline_all or args.offline else None):
        set_offline_env()  # before any command imports huggingface_hub, which reads it once
        args.offline = True
    try:
        return int(_load(args.command).run(args) or 0)
    except MedvitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say what was kept and how to go on (medvit train: --resume)
        print(f"error: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
