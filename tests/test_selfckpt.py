"""linuxcr.checkpoint_self() and the before_checkpoint/after_restore hooks."""
from __future__ import annotations

import re
import signal
import sys

import pytest

import helpers
from job_helpers import py_job, start_job, track_command

pytestmark = pytest.mark.e2e
LOOP = helpers.PROGS_DIR / "self_loop.py"


def _done(log) -> str:
    return helpers.wait_for_line(log, r"^done (\d+) (\w+)").group(2)


def test_killed_loop_resumes_from_its_own_checkpoint(procs, tmp_path):
    ref_log = tmp_path / "ref.log"
    procs.start([sys.executable, LOOP, tmp_path / "unused", 2000, 9000, "--no-ckpt"], ref_log)
    reference = _done(ref_log)

    ck, log = tmp_path / "ck", tmp_path / "run.log"
    p = procs.start([sys.executable, LOOP, f"{ck}/", 2000, 9000, "--die-after", 3], log)
    assert p.wait(helpers.LCR_TIMEOUT) == -signal.SIGKILL, helpers.read_log(log)
    text = helpers.read_log(log)
    assert re.findall(r"^checkpointed (\d+)", text, re.M) == ["2000", "4000", "6000"], text
    assert re.findall(r"^before (\d+)", text, re.M) == ["2000", "4000", "6000"]
    assert "done" not in text
    assert (ck / "latest").is_symlink()

    start = helpers.log_size(log)
    helpers.restart_image(ck / "latest", procs, "--any-pid")
    m = helpers.wait_for_line(log, r"^(restored|checkpointed) (\d+)", start=start)
    assert m.group(1) == "restored" and m.group(2) == "6000", helpers.read_log(log, start)
    after = helpers.read_log(log, start)
    assert re.search(r"^after 6000", after, re.M)     # the after_restore hook ran in the copy
    assert helpers.wait_for_line(log, r"^done", start=start)
    assert _done_from(log, start) == reference        # same result as the uninterrupted run
    # the copy went on checkpointing itself (at 8000) as the original would have
    assert re.search(r"^checkpointed 8000", helpers.read_log(log, start), re.M)


def _done_from(log, start) -> str:
    return helpers.wait_for_line(log, r"^done (\d+) (\w+)", start=start).group(2)


def test_refuses_where_the_helper_would_stay_a_descendant():
    # the pytest process is a child subreaper (conftest): a helper it forks
    # away comes back to it, and would be saved with it
    import linuxcr
    from linuxcr.errors import LcrError
    with pytest.raises(LcrError, match="subreaper"):
        linuxcr.checkpoint_self("/nonexistent/x.img")


def test_job_hooks_run_before_checkpoint_and_after_restore(procs, tmp_path):
    ck = tmp_path / "ck"
    argv = py_job("--hooks")
    job = start_job(procs, ck, tmp_path, argv, "--hooks")
    track_command(procs, job)
    job.wait_out(r"^count 3")
    assert job.stop() == 0, job.err_text()
    # the program answered (its hook ran); what it printed was still in the
    # output FIFO when the tree froze: saved in the image, printed once, by
    # the resumed job
    assert "did not answer" not in job.err_text()
    job2 = start_job(procs, ck, tmp_path, argv, "--hooks")
    track_command(procs, job2)
    m = job2.wait_out(r"^hook restored (\d+)")
    out = helpers.read_log(job.out)          # both runs
    before = re.findall(r"^hook before (\d+)", out, re.M)
    assert len(before) == 1 and int(m.group(1)) >= int(before[0]), out
    # the counter went on from where the hook saw it
    assert re.search(rf"^count {before[0]} ", job2.out_text(), re.M), out
    assert job2.stop() == 0
