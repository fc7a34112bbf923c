"""Fixtures for the end-to-end tests (see helpers.py).

- The pytest process makes itself a child subreaper, so restored processes
  (whose parent, lcr, exits) are re-parented to it and can be reaped.
- ``bins`` (session): every tests/progs/*.c and shared/workloads/memhog.c
  compiled into a temporary directory (world-readable: tests also run them
  as other users).  Skips when gcc is missing.
- ``procs`` (function): the registry of processes a test started or
  restored; all of them are SIGKILLed and reaped, by pid, at teardown.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test: runs lcr on real processes")
    try:
        helpers.become_subreaper()
    except OSError as e:  # pragma: no cover
        warnings.warn(f"cannot become a child subreaper: {e}; restored processes "
                      "may not be reaped")


def pytest_sessionfinish(session, exitstatus):
    helpers.reap_zombie_children()


@pytest.fixture(scope="session")
def bins():
    if not helpers.have_gcc():
        pytest.skip("gcc not found: cannot build the test programs")
    d = Path(tempfile.mkdtemp(prefix="lcr-progs-"))
    os.chmod(d, 0o755)
    try:
        yield helpers.build_programs(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs():
    reg = helpers.Procs()
    yield reg
    problems = reg.kill_all()
    assert not problems, f"teardown could not kill: {problems}"


# --------------------------------------------------------------------------
# shared by the tests that run lcr as an ordinary user and on process trees
# (rootless_helpers.py); a test file may still define its own.

@pytest.fixture(scope="module")
def user():
    """The ordinary user the tests run lcr as (lcrtest); skips with the
    reason when it is missing or cannot run lcr."""
    from rootless_helpers import find_user, user_can_run_lcr
    u = find_user("lcrtest")
    why = user_can_run_lcr(u)
    if why:
        pytest.skip(why)
    return u


@pytest.fixture
def wd(user):
    """A work directory that user owns, removed afterwards."""
    from rootless_helpers import user_workdir
    d = user_workdir(user)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def trees():
    """The registry of process trees a test started or restored: all killed
    and reaped, by pid, at teardown."""
    from rootless_helpers import Trees
    reg = Trees()
    yield reg
    problems = reg.kill_all()
    assert not problems, f"teardown could not kill: {problems}"


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    """An agent of this test's own (LCR_AGENT_DIR in tmp_path, for this
    process and, as the env it yields, for children): killed after."""
    import signal
    d = tmp_path / "agent"
    monkeypatch.setenv("LCR_AGENT_DIR", str(d))
    yield helpers.child_env({"LCR_AGENT_DIR": str(d)})
    try:
        os.kill(int((d / "agent.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass
