"""Run configs as Flower reads them: TOML tables flattened, `--run-config` text, and the
keys and types of another Flower app's defaults (fedrec's own config is checked by
`common.config.Config`).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A run config, option or output directory that cannot be run."""


def _is_type(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys, as Flower flattens run configs."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def app_defaults(project_dir: str | Path) -> dict[str, Any]:
    """The app's run-config defaults: [tool.flwr.app.config] of its pyproject.toml."""
    pyproject = Path(project_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{project_dir} is not a Flower app: it has no pyproject.toml.")
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    try:
        return flatten(data["tool"]["flwr"]["app"]["config"])
    except KeyError:
        raise ConfigError(f"{pyproject} has no [tool.flwr.app.config] table.") from None


def check_run_config(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides checked against the app's keys and value types (ints become floats for floats)."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in defaults:
            raise ConfigError(
                f"Unknown run-config key {key!r}: the app's keys are {', '.join(defaults)}."
            )
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"Run-config {key} must be a bool, number or string: {value!r}.")
        kind = type(defaults[key])
        if not _is_type(value, kind):
            raise ConfigError(
                f"Run-config {key} must be a {kind.__name__} like its default "
                f"{defaults[key]!r}, got {value!r}."
            )
        checked[key] = float(value) if kind is float else value
    return checked


def format_toml_value(value: Any) -> str:
    """A scalar as TOML for `flwr run --run-config` (strings quoted, bools lowercase)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest round-trip form: 0.001, 1e-05, 1.0
    if isinstance(value, str):
        # flwr splits the override string with a regex that ends a quoted value at its
        # first matching quote, so a value may not contain the quote that delimits it.
        if "'" not in value and not any(c in value for c in "\n\r\t"):
            return f"'{value}'"  # a TOML literal string: backslashes stay as they are
        if '"' not in value:
            return json.dumps(value, ensure_ascii=False)  # a basic string with escapes
        raise ConfigError(
            f"The string {value!r} contains both kinds of quote; flwr --run-config cannot carry it."
        )
    raise ConfigError(f"{value!r} is not a TOML scalar (bool, int, float or string).")


def to_config_string(values: Mapping[str, Any]) -> str:
    """key=value pairs as `flwr run --run-config` and `--federation-config` take them."""
    return " ".join(f"{key}={format_toml_value(value)}" for key, value in values.items())


def parse_config_string(text: str) -> dict[str, Any]:
    """The inverse of to_config_string (what `--run-config "k=v ..."` on our CLI means)."""
    # The same pattern flwr uses for its own --run-config
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)
    leftover = re.sub(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", "", text).strip()
    if leftover:
        raise ConfigError(f"Cannot read {leftover!r} in --run-config: use key=value pairs.")
    try:
        return tomllib.loads("\n".join(f'"{key}" = {value}' for key, value in pairs))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"--run-config {text!r} is not valid: values must be TOML (strings quoted, "
            f"e.g. dataset='ml-100k'); {exc}."
        ) from None
