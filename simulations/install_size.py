"""fedrec-install-size: what each role installs, measured in fresh virtual environments.

One venv per role (device, device + serving, server, everything), each from this checkout as
a user would install it (`pip install torch==2.13.0`, then `pip install '.[extra]'`). For each:
the size of site-packages, whether the heavy optional packages are absent, and a smoke check
that the role's own command imports. Writes simulations/results/install_size.json (and .md)
and the docs/deploying.md block between <!-- results:install --> markers.

    fedrec-install-size                 # all roles (a few minutes with a warm pip cache)
    fedrec-install-size --only device serving
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client.device import disk_bytes
from simulations import report
from simulations.report import README, RESULTS, ROOT

RESULT_FILE = "install_size.json"
MARK_BEGIN, MARK_END = "<!-- results:install -->", "<!-- /results:install -->"
# role -> (what it is, pip extra, the command to check, what the role needs to import)
ROLES = {
    "device": ("device", "", "fedrec-client", "import client.client_app, client.recommender"),
    "serving": ("device + HTTP service", "serve", "fedrec-client", "import client.service"),
    "server": ("server", "server", "fedrec-server", "import server.deploy, server.gate"),
    "all": ("everything (simulation, reports, tests)", "dev", "fedrec-simulate", "import ray"),
}
# packages a device should not carry unless it asked for them (FastAPI, uvicorn and httpx are
# Flower's own dependencies: every role has them)
OPTIONAL = ("ray", "matplotlib", "tensorboard", "onnx", "onnxruntime")


def measure(role: str, work: Path) -> dict:
    label, extra, command, smoke = ROLES[role]
    venv = work / role
    shutil.rmtree(venv, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # exactly pinned, first (README)
    target = f"{ROOT}[{extra}]" if extra else str(ROOT)
    subprocess.run([*pip, target], check=True)
    seconds = time.perf_counter() - start
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    present = subprocess.run(
        [
            python,
            "-I",  # isolated: a directory named like a package in the cwd (/tmp/ray) is no hit
            "-c",
            "import importlib.util, sys; "
            "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))",
            *OPTIONAL,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    # run from outside the checkout, so the installed package is what imports
    smoke_ok = (
        subprocess.run([python, "-I", "-c", smoke], cwd=work, capture_output=True).returncode == 0
    )
    help_ok = (
        subprocess.run(
            [str(venv / "bin" / command), "--help"], cwd=work, capture_output=True
        ).returncode
        == 0
    )
    return {
        "role": label,
        "install": install_command(extra),
        "site_packages_bytes": disk_bytes(Path(site)),
        "optional_present": present,
        "imports_ok": smoke_ok,
        "help_ok": help_ok,
        "install_s": seconds,
    }


def _extra_of(label: str) -> str:
    return next(extra for name, extra, _, _ in ROLES.values() if name == label)


def install_command(extra: str) -> str:
    """What a user types in a checkout (docs/deploying.md, Install)."""
    return "pip install torch==2.13.0 && pip install " + (f"'.[{extra}]'" if extra else ".")


def markdown(result: dict) -> str:
    lines = [
        f"Measured by `fedrec-install-size` on {result['machine']} ({result['date']}): a fresh "
        "venv per role, installed from this checkout.",
        "",
        "| role | install | site-packages | optional packages present | role's imports |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["roles"]:
        present = ", ".join(r["optional_present"]) or "none"
        ok = "ok" if r["imports_ok"] and r["help_ok"] else "FAILED"
        command = install_command(_extra_of(r["role"]))
        size = r["site_packages_bytes"] / 2**30
        lines.append(f"| {r['role']} | `{command}` | {size:.2f} GiB | {present} | {ok} |")
    return "\n".join(lines)


def _write(result: dict, results_dir: Path) -> None:
    report.write_results(
        results_dir / RESULT_FILE,
        result,
        markdown(result),
        readme=README,
        begin=MARK_BEGIN,
        end=MARK_END,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrec-install-size", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", nargs="*", choices=list(ROLES), help="roles to measure (all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the directory results go to")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite the tables from the results file"
    )
    args = parser.parse_args(argv)
    if args.table_only:
        result = json.loads((args.results / RESULT_FILE).read_text())
        _write(result, args.results)
        return 0
    roles = [r for r in ROLES if args.only is None or r in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedrec-install-") as tmp:
        for role in roles:
            print(f"== {role}", flush=True)
            rows.append(measure(role, Path(tmp)))
            print(
                f"   {rows[-1]['site_packages_bytes'] / 2**30:.2f} GiB, optional present: "
                f"{rows[-1]['optional_present'] or 'none'}",
                flush=True,
            )
    result = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "roles": rows,
    }
    _write(result, args.results)
    print(markdown(result))
    return 0 if all(r["imports_ok"] and r["help_ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
