"""The raw config before validation: the YAML file, `--set` overrides and older key names; and the
error lines that say where each bad value came from (the file, or `<command line>` and the
override that brought it in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

COMMAND_LINE = "<command line>"  # the source named for a problem of a --set override


class ConfigError(ValueError):
    """A config file that cannot be used; the message has one line per problem."""


def read_yaml(path: Path) -> dict[str, Any]:
    """The config file's sections as a dict; ConfigError naming the file when it cannot be read."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Set each `section.key=value` of `overrides` (the value read as YAML) in `raw`; returns
    dotted key -> override. ConfigError naming `<command line>` for one that cannot be applied."""
    applied = {}
    for override in overrides:
        key, value = _split_override(override)
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{COMMAND_LINE}: {key}: {part} is not a section (--set {override})")
        node[leaf] = _override_value(key, value)
        applied[key] = override
    return applied


def _split_override(override: str) -> tuple[str, str]:
    key, sep, value = override.partition("=")
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"{COMMAND_LINE}: --set {override}: must look like section.key=value")
    return key, value


def _override_value(key: str, value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{COMMAND_LINE}: {key}: cannot read the value {value!r} as YAML ({problem})") from None


def format_errors(err: ValidationError, source: str, overrides: Mapping[str, str]) -> str:
    """One line per problem: `<source>: key: message`, or `<command line>: key: message (--set ...)`
    where an override (dotted key -> override, from `apply_overrides`) brought it in."""
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "<root>"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown key"
        override = _override_at(key, overrides)
        lines.append(f"{COMMAND_LINE}: {key}: {message} (--set {override})" if override
                     else f"{source}: {key}: {message}")
    return "\n".join(lines)


def _override_at(key: str, overrides: Mapping[str, str]) -> str | None:
    """The override that set `key`, a key under it, or a section it created, if any."""
    related = (o for k, o in overrides.items() if f"{key}.".startswith(f"{k}.") or k.startswith(f"{key}."))
    return next(related, None)


OLD_AMP = {True: "auto", False: "fp32"}  # train.amp, before train.precision


def read_old_amp(raw: dict[str, Any], source: str, overrides: Mapping[str, str]) -> dict[str, Any]:
    """`train.amp` of older configs read as `train.precision` (true: auto, false: fp32). Given
    both, the one set on the command line wins; both in the same place is an error."""
    train = raw.get("train")
    if not isinstance(train, dict) or "amp" not in train:
        return raw
    amp_override, precision_override = _override_at("train.amp", overrides), _override_at("train.precision", overrides)
    where = f"{COMMAND_LINE}: train.amp" if amp_override else f"{source}: train.amp"
    amp = train["amp"]
    if not isinstance(amp, bool):
        raise ConfigError(f"{where}: must be true or false, got {amp!r} (the older name of train.precision: "
                          "auto, bf16, fp16 or fp32)")
    kept = {k: v for k, v in train.items() if k != "amp"}
    if "precision" in train and bool(amp_override) == bool(precision_override):
        raise ConfigError(f"{where}: is the older name of train.precision, which is set too: keep train.precision "
                          f"only (amp: {str(amp).lower()} is precision: {OLD_AMP[amp]})")
    if "precision" not in train or amp_override:
        kept["precision"] = OLD_AMP[amp]
    return raw | {"train": kept}
