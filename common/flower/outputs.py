"""A run's output directory: where it may lie and what a new run may replace."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pathspec

from common.files import METRICS_FILE
from common.flower.config import ConfigError


def check_output_dir(output: Path, project_dir: Path, *, what: str = "Output directory") -> None:
    """Refuse a directory that `flwr run` would pack into the app bundle (and so send to
    every node): one inside the project that .gitignore does not exclude."""
    try:
        relative = output.relative_to(project_dir.resolve())
    except ValueError:
        return  # outside the project
    gitignore = project_dir / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else []
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    if not spec.match_file(f"{relative.as_posix()}/metrics.jsonl"):
        raise ConfigError(
            f"{what} {output} lies inside the app ({project_dir}) and is not git-ignored, so "
            "`flwr run` would pack its files into the app bundle: choose a directory under "
            "outputs/ or outside the project."
        )


def prepare_output_dir(
    output: Path, *, resume: bool, overwrite: bool, artifacts: Sequence[str]
) -> None:
    """Create the output directory; refuse to mix a new run into an old run's metrics.

    With `overwrite`, the `artifacts` a previous run left (names inside `output`) are removed.
    """
    if (output / METRICS_FILE).exists() and not resume:
        if not overwrite:
            raise ConfigError(
                f"{output} already holds a run ({METRICS_FILE} exists). Pass "
                "--overwrite to replace it, --output to write elsewhere, or set resume = true "
                "to continue it."
            )
        for name in artifacts:
            target = output / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    output.mkdir(parents=True, exist_ok=True)
