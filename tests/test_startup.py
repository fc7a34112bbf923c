"""Start-up cost of the `lcr` command, checked structurally (no clock): what
`import linuxcr.cli` and `lcr --version` load.  Each `lcr` command pays for
every module it imports before it does anything; the engines, the image
format and the heavy third-party packages are imported by the commands that
use them (see docs/benchmarks.md, "Start-up")."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Never imported by `import linuxcr.cli` (nor by `import linuxcr`).
HEAVY = ("numpy", "cryptography", "zstandard", "rich", "psutil", "msgspec", "xxhash")
# The API and engine modules: imported by the commands, not by the CLI itself.
ENGINE = ("linuxcr.api", "linuxcr.engine.dump", "linuxcr.engine.restore",
          "linuxcr.image.stream", "linuxcr.image.schema", "linuxcr.resources.memory",
          "linuxcr.cli_migrate")


def _modules(code: str) -> set[str]:
    """sys.modules after running code in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("code", ["import linuxcr.cli", "import linuxcr",
                                  "from linuxcr import __version__"])
def test_import_is_light(code):
    mods = _modules(code)
    heavy = [m for m in HEAVY if m in mods]
    assert not heavy, f"{code!r} imports {heavy}"
    engine = [m for m in ENGINE if m in mods]
    assert not engine, f"{code!r} imports {engine}"


def test_version_is_light():
    """`lcr --version` runs without the API, engines, importlib.metadata."""
    code = ("import sys; from linuxcr.cli import main; sys.argv = ['lcr', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass")
    mods = _modules(code)
    assert not [m for m in HEAVY + ENGINE if m in mods]
    assert "importlib.metadata" not in mods


def test_public_api_still_there():
    """The lazy package still has the whole public API, and submodules as
    attributes."""
    import linuxcr
    from linuxcr import api
    for name in ("checkpoint", "restart", "check", "run", "snapshot", "snapshots", "transaction"):
        assert getattr(linuxcr, name) is getattr(api, name)
        assert name in dir(linuxcr)
    assert isinstance(linuxcr.__version__, str)
    assert linuxcr.api is api
    with pytest.raises(AttributeError):
        linuxcr.no_such_thing  # noqa: B018
    exec("from linuxcr import checkpoint, restart", {})


def test_version_output():
    r = subprocess.run([sys.executable, "-m", "linuxcr", "--version"], capture_output=True,
                       text=True, timeout=60)
    import linuxcr
    assert r.returncode == 0
    assert r.stdout.strip().endswith(f"version {linuxcr.__version__}")


def test_migrate_commands_listed_and_loaded():
    """migrate/receive are loaded on demand but listed and usable as before."""
    r = subprocess.run([sys.executable, "-m", "linuxcr", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    assert "migrate" in r.stdout and "receive" in r.stdout
    r = subprocess.run([sys.executable, "-m", "linuxcr", "migrate", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--max-downtime" in r.stdout


def test_entry_hands_off_before_the_cli():
    """The `lcr` entry point (linuxcr.__main__:entry) decides on handing
    `lcr checkpoint` to the agent (linuxcr/handoff.py) with os/socket/json
    only: no click, no CLI, no API."""
    mods = _modules("import linuxcr.__main__, linuxcr.handoff as h\n"
                    "h.wanted(['lcr', 'checkpoint', '1', '-o', 'x']); h.agent_socket()")
    assert not [m for m in HEAVY + ENGINE if m in mods]
    assert "click" not in mods and "linuxcr.cli" not in mods and "linuxcr.agent" not in mods
    # nor the error classes (dataclasses drags in inspect, ast, dis: ~10 ms)
    assert "linuxcr.errors" not in mods and "dataclasses" not in mods


def test_script_is_the_light_entry():
    import tomllib
    from pathlib import Path
    meta = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["lcr"] == "linuxcr.__main__:entry"
