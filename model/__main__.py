"""`python -m model --preset NAME [--tasks N]`: print a network's architecture summary."""

from __future__ import annotations

import argparse
import logging

from model.presets import PRESETS, REFERENCE_TASKS, preset_spec
from model.spec import ARCHITECTURES
from model.summary import summarize
from model.tasks import TaskSpec

log = logging.getLogger("model")


def reference_tasks(count: int) -> list[TaskSpec]:
    """The paper's first `count` tasks; beyond 11, extra 1-channel binary tasks."""
    extra = [TaskSpec(f"task{i}", 2, 1) for i in range(len(REFERENCE_TASKS), count)]
    return [*REFERENCE_TASKS[:count], *extra]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="uniseg-paper")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=None, help="default: the preset's")
    parser.add_argument("--tasks", type=int, default=len(REFERENCE_TASKS), help="number of tasks (default 11, the paper's)")
    parser.add_argument("--prompt-channels", type=int, default=None)
    parser.add_argument("--fuse-channels", type=int, default=None)
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = preset_spec(
        args.preset,
        architecture=args.architecture,
        prompt_channels=args.prompt_channels,
        fuse_channels=args.fuse_channels,
    )
    tasks = reference_tasks(1 if spec.architecture == "plain" else args.tasks)
    log.info("preset            %s", args.preset)
    for line in summarize(spec, tasks).lines():
        log.info(line)


if __name__ == "__main__":
    main()
