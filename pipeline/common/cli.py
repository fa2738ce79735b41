"""How every stage's `main` ends, the same for all stages: exit status 0 done, 1 failed (logged
with a traceback), 2 bad input (its one-line message logged).

A stage that works through a batch (predict's scans) goes on past a failed item and ends with
its summary: as bad input (status 2) when only inputs were bad, as `BatchFailed` (status 1, each
item's traceback already logged) when something else failed."""

from __future__ import annotations

import argparse
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import fsspec

from pipeline.common.config_help import describe_keys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
MODEL_HELP = "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model folder"


class BatchFailed(RuntimeError):
    """Some items of a batch failed (each logged with its traceback), the others are done; the
    message is the one-line summary."""


def output_folder_problem(out: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Create the output folder `out` (local or any fsspec URL) if needed and write, then delete, a
    probe file in it: None when that works, else the one-line problem naming `out`. Stages call it
    before their work, so an unwritable output never costs the work (or a traceback)."""
    try:
        fs, path = fsspec.core.url_to_fs(str(out), **(storage_options or {}))
        if fs.isfile(path):
            return f"{out}: exists and is a file, not a folder"
        probe = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex}"
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except OSError as err:
        return f"{out}: output folder is not writable ({err.strerror or err})"
    return None


def stage_parser(module: str, doc: str | None, config_sections: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A stage's argument parser whose --help shows the module docstring as written (usage,
    examples, exit status) and, after the options, the config keys the stage reads."""
    epilog = None
    if config_sections:
        epilog = ("config keys (YAML sections, or --set KEY=VALUE), with their defaults:\n"
                  + describe_keys(["name", *config_sections]))
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run_stage(
    work: Callable[[], object], log: logging.Logger, activity: str, bad_input: tuple[type[BaseException], ...]
) -> int:
    """Run `work` (its result is not used) and return the exit status; `bad_input` are the
    exceptions whose message is the whole story (a bad file, config or argument)."""
    try:
        work()
    except bad_input as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    except BatchFailed as err:
        log.error("%s", err)
        return EXIT_FAILED
    except Exception:
        log.exception("%s failed", activity)
        return EXIT_FAILED
    return EXIT_OK


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """The options of a stage that runs a trained model (evaluate, predict): which model, which of
    its folds and where its MLflow runs are; how inference runs is `add_inference_arguments`'."""
    # Imported here: stages that run no model (ingest, datasets) need not load torch.
    from pipeline.common.ensemble import parse_folds

    parser.add_argument("--model", required=required, help=MODEL_HELP)
    parser.add_argument("--folds", type=parse_folds, metavar="all|0,1,...",
                        help="of a fold-ensemble model, the folds whose softmax is averaged (default all)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")


def model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """What `add_model_arguments` and `add_inference_arguments` parsed, as the keyword arguments the
    stages' options share (model, folds, tracking_uri, inference, device); a bad inference value is
    a usage error."""
    from pipeline.common.inference import inference_options

    return {"model": args.model, "folds": args.folds, "tracking_uri": args.tracking_uri,
            "inference": inference_options(parser, args), "device": args.device}
