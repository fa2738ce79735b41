"""How every stage's `main` ends, the same for all stages: exit status 0 done, 1 failed (logged
with a traceback), 2 bad input (its one-line message logged)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from pipeline.common.config import describe_keys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


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
    except Exception:
        log.exception("%s failed", activity)
        return EXIT_FAILED
    return EXIT_OK
