"""man/lcr.1 is generated from the click commands (scripts/gen_man.py): it
must be up to date with them, list every command and exit code, and be
shipped in the wheel (pyproject data-files)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

import helpers

GEN = helpers.REPO / "scripts" / "gen_man.py"
PAGE = helpers.REPO / "man" / "lcr.1"


def test_man_page_up_to_date():
    cp = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True,
                        timeout=helpers.LCR_TIMEOUT)
    assert cp.returncode == 0, cp.stderr + "(regenerate: python3 scripts/gen_man.py)"


def test_man_page_lists_commands_and_exit_codes():
    sys.path.insert(0, str(helpers.REPO))
    import click

    from linuxcr.cli import main
    from linuxcr.errors import EXIT_CODES
    text = PAGE.read_text()
    ctx = click.Context(main, info_name="lcr")
    for name in main.list_commands(ctx):
        if not main.get_command(ctx, name).hidden:
            assert f".SS lcr {name.replace('-', chr(92) + '-')} " in text, name
    for code, cls, _ in EXIT_CODES:
        assert f"{code}\t{cls.replace('-', chr(92) + '-')}\t" in text, (code, cls)


def test_man_page_renders():
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    cp = subprocess.run(["man", "-l", str(PAGE)], capture_output=True, text=True,
                        env={"MANWIDTH": "120", "PATH": "/usr/bin:/bin", "MANPAGER": "cat"},
                        timeout=helpers.LCR_TIMEOUT)
    assert cp.returncode == 0, cp.stderr
    assert "lcr diff [OPTIONS] A B" in cp.stdout
    assert "EXIT STATUS" in cp.stdout


def test_man_page_in_pyproject_data_files():
    import tomllib
    conf = tomllib.loads((helpers.REPO / "pyproject.toml").read_text())
    assert "man/lcr.1" in conf["tool"]["setuptools"]["data-files"]["share/man/man1"]


def test_man_page_in_wheel(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel", reason="building a wheel without isolation needs `wheel`")
    src = tmp_path / "src"
    shutil.copytree(helpers.REPO, src, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.img", ".pytest_cache", "build", "*.egg-info", ".venv*"))
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                         "-w", str(tmp_path / "dist"), str(src)],
                        capture_output=True, text=True, timeout=600)
    if cp.returncode != 0 and "No module named pip" in cp.stderr:
        pytest.skip("pip is not available")
    assert cp.returncode == 0, cp.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("linuxcr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".data/data/share/man/man1/lcr.1") for n in names), names


def test_the_lcr_command_is_declared():
    """pip must install an `lcr` command (README's first command and the
    demo call it): a packaging edit once dropped [project.scripts]."""
    import tomllib
    with open(helpers.REPO / "pyproject.toml", "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["scripts"].get("lcr") == "linuxcr.__main__:entry"   # handoff.py first, then the CLI
