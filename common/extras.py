"""The optional extras of the package (pyproject.toml): a command that needs one says which,
and how to install it, instead of failing on an import deep inside."""

from __future__ import annotations

import importlib.util

from common.flower.config import ConfigError


class MissingExtra(ConfigError):
    """A module of an optional extra is not installed; the message gives the pip command."""


def require(extra: str, *modules: str, what: str) -> None:
    """Raise MissingExtra unless every module of `extra` that `what` needs is importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"{what} needs {', '.join(missing)} from fedrec's {extra!r} extra, which is not "
            f"installed here: pip install 'fedrec[{extra}]' (in a checkout: pip install "
            f"'.[{extra}]')."
        )
