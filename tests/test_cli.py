"""Every command answers --help without importing the heavy stack (torch, transformers, peft,
opacus, matplotlib): a CLI that takes seconds to print its usage feels broken."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("torch", "transformers", "peft", "opacus", "matplotlib", "flwr.simulation")

PROBE = """
import importlib, json, sys
module, func = sys.argv[1].split(":")
try:
    getattr(importlib.import_module(module), func)(["--help"])
except SystemExit as exit:
    code = exit.code
else:
    code = None
print(json.dumps({"code": code, "heavy": [m for m in sys.argv[2:] if m in sys.modules]}))
"""


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_answers_without_the_heavy_imports(script):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, SCRIPTS[script], *HEAVY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    usage, result = done.stdout.rsplit("\n", 2)[0], done.stdout.strip().splitlines()[-1]
    assert "usage:" in usage
    assert result == '{"code": 0, "heavy": []}', f"{script} --help imported {result}"


def test_a_command_without_its_extra_names_the_install_command(monkeypatch, tmp_path, capsys):
    """A device installs the base package; `serve` needs the serve extra and says so."""
    import importlib.util

    from client import device

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    code = device.main(["serve", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert "fedrec-client serve needs fastapi" in err and "pip install 'fedrec[serve]'" in err
