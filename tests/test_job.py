"""`lcr run --checkpoint-dir` on the host: stop (SIGTERM) -> image in DIR,
exit 0; start again -> resumed; grace budget; bad images; --interval."""
from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

import helpers
from job_helpers import counts, py_job, start_job, track_command

pytestmark = pytest.mark.e2e


def _cycle(procs, ck, logs, argv, *opts):
    """Start (fresh or resumed), let it count, stop: (job, counts seen)."""
    job = start_job(procs, ck, logs, argv, *opts)
    track_command(procs, job)
    n0 = len(counts(job.out_text()))
    job.wait_out(r"^count \d+")
    while len(counts(job.out_text())) < n0 + 5:
        helpers.wait_for_line(job.out, r"^count", start=job.out_start, pid=job.pid)
    assert job.stop() == 0, job.err_text()
    assert re.search(r"saved .*ckpt-\d+\.img", job.err_text()), job.err_text()
    return job, counts(job.out_text())


def test_stop_and_resume_twice(procs, tmp_path):
    ck = tmp_path / "ck"
    argv = py_job()
    job1, c1 = _cycle(procs, ck, tmp_path, argv)
    assert "started" in job1.err_text()
    first = os.readlink(ck / "latest")
    assert (ck / first).is_file()
    job2, c2 = _cycle(procs, ck, tmp_path, argv)
    assert re.search(r"resumed from .*ckpt-000001\.img taken at .*, \d+ pages", job2.err_text())
    # the counter continues exactly where the checkpoint left it: no gap, no repeat
    assert c2[0] == c1[-1] + 1, (c1[-3:], c2[:3])
    assert c2 == list(range(c2[0], c2[0] + len(c2)))
    job3 = start_job(procs, ck, tmp_path, argv, "--saved-exit-code", "75")
    track_command(procs, job3)
    job3.wait_out(rf"^count {c2[-1] + 3} ")
    assert job3.stop() == 75, job3.err_text()            # a Kubernetes Job's "preempted"
    c3 = counts(job3.out_text())
    assert c3[0] == c2[-1] + 1
    assert os.readlink(ck / "latest") == "ckpt-000003.img"
    # without --interval only the latest image is kept
    assert sorted(p.name for p in ck.glob("*.img")) == ["ckpt-000003.img"]


def test_memhog_checksum_after_resume(procs, bins, tmp_path):
    if "memhog" not in bins.paths:
        pytest.skip(bins.missing.get("memhog", "memhog not built"))
    ck = tmp_path / "ck"
    argv = [bins.paths["memhog"], "-f", "64"]
    job = start_job(procs, ck, tmp_path, argv)
    track_command(procs, job)
    job.wait_out(r"ready")
    before = helpers.probe_hog(job.pid, job.out)     # SIGUSR1 to lcr: forwarded to memhog
    assert before.ok, before.line
    assert job.stop() == 0, job.err_text()
    job2 = start_job(procs, ck, tmp_path, argv)
    track_command(procs, job2)
    job2.wait_err(r"resumed from")
    after = helpers.probe_hog(job2.pid, job2.out)
    assert after.ok, after.line
    assert after.counter >= before.counter
    assert job2.stop() == 0, job2.err_text()
    job3 = start_job(procs, ck, tmp_path, argv)
    track_command(procs, job3)
    job3.wait_err(r"resumed from .*ckpt-000002")
    assert helpers.probe_hog(job3.pid, job3.out).ok


def test_grace_too_short_keeps_latest_and_signals_command(procs, tmp_path):
    ck = tmp_path / "ck"
    argv = py_job("--mib", "192", "--term-exit", "3")
    _cycle(procs, ck, tmp_path, argv)
    assert os.readlink(ck / "latest") == "ckpt-000001.img"
    job = start_job(procs, ck, tmp_path, argv, "--grace", "1ms")
    track_command(procs, job)
    job.wait_err(r"resumed from")
    job.wait_out(r"^count")
    code = job.stop()
    err = job.err_text()
    assert "not finished within 0.001 s" in err, err
    assert "latest stays ckpt-000001.img" in err, err
    assert code == 3, err                             # the command's own exit status
    assert "got SIGTERM" in job.out_text()
    assert os.readlink(ck / "latest") == "ckpt-000001.img"
    assert sorted(p.name for p in ck.iterdir() if p.name.endswith(".img")) == ["ckpt-000001.img"]
    # and the kept image still resumes
    job2, c = _cycle(procs, ck, tmp_path, argv)
    assert "resumed from" in job2.err_text()


def _corrupt(path):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(16)
        f.seek(size // 2)
        f.write(bytes(x ^ 0xFF for x in b))


def test_corrupt_latest_refused_then_fresh_with_flag(procs, tmp_path):
    ck = tmp_path / "ck"
    argv = py_job()
    _cycle(procs, ck, tmp_path, argv)
    _corrupt(ck / os.readlink(ck / "latest"))
    cp = helpers.lcr("run", "--checkpoint-dir", ck, "--", *argv, check=False)
    lines = cp.stderr.strip().splitlines()
    assert cp.returncode != 0 and len(lines) == 1, cp.stderr
    assert lines[0].startswith("lcr: ") and "ckpt-000001.img" in lines[0], cp.stderr
    assert "Traceback" not in cp.stderr
    assert (ck / "latest").is_symlink()                 # nothing moved, nothing started
    job = start_job(procs, ck, tmp_path, argv, "--fresh-on-bad-image")
    track_command(procs, job)
    job.wait_err(r"kept aside in .*bad-")
    job.wait_err(r"started")
    aside = [d for d in ck.iterdir() if d.name.startswith("bad-")]
    assert len(aside) == 1 and (aside[0] / "ckpt-000001.img").exists()
    job.wait_out(r"^count")
    assert job.stop() == 0
    assert counts(job.out_text())[0] == 0                # a fresh start


def test_foreign_image_refused(procs, tmp_path):
    ck = tmp_path / "ck"
    _cycle(procs, ck, tmp_path, py_job())
    cp = helpers.lcr("run", "--checkpoint-dir", ck, "--", *py_job("--mib", "1"), check=False)
    assert cp.returncode != 0, cp.stderr
    assert "another command" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1


def test_command_exit_status_passed_on(procs, tmp_path):
    cp = helpers.lcr("run", "--checkpoint-dir", tmp_path / "ck", "--", "sh", "-c",
                     "echo hello; exit 7", check=False)
    assert cp.returncode == 7, cp.stderr
    assert "hello" in cp.stdout
    assert not (tmp_path / "ck" / "latest").exists()


def test_interval_retention_and_resume_from_chain(procs, tmp_path):
    ck = tmp_path / "ck"
    argv = py_job("--mib", "8")
    job = start_job(procs, ck, tmp_path, argv, "--interval", "200ms", "--keep", "2",
                    "--full-every", "3")
    track_command(procs, job)
    for k in range(5):
        helpers.wait_for_line(job.err, rf"ckpt-{k + 1:06d}\.img: (full|incremental)",
                              start=job.err_start, pid=job.pid)
    assert re.search(r"ckpt-000002\.img: incremental", job.err_text())
    assert job.stop() == 0, job.err_text()
    c1 = counts(job.out_text())
    names = sorted(p.name for p in ck.glob("*.img"))
    # keep 2 newest plus the parents they need; never more than one full chain
    assert len(names) <= 4, names
    job2 = start_job(procs, ck, tmp_path, argv)
    track_command(procs, job2)
    job2.wait_err(r"resumed from")
    job2.wait_out(r"^count")
    assert counts(job2.out_text())[0] == c1[-1] + 1
    assert job2.stop() == 0


def test_bad_options(tmp_path):
    cp = helpers.lcr("run", "--checkpoint-dir", tmp_path, "--grace", "soon", "--", "true",
                     check=False)
    assert cp.returncode != 0 and "--grace" in cp.stderr
    cp = helpers.lcr("run", "--checkpoint-dir", tmp_path, "--keep", "2", "--", "true", check=False)
    assert cp.returncode != 0 and "--keep needs --interval" in cp.stderr


def test_signed_images_resume_only_with_the_key(procs, tmp_path):
    ck = tmp_path / "ck"
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_bytes(os.urandom(32))
    other.write_bytes(os.urandom(32))
    argv = py_job()
    _cycle(procs, ck, tmp_path, argv, "--sign", str(key))
    cp = helpers.lcr("run", "--checkpoint-dir", ck, "--verify", other, "--", *argv, check=False)
    assert cp.returncode != 0 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "ckpt-000001.img" in cp.stderr
    job, _ = _cycle(procs, ck, tmp_path, argv, "--sign", str(key), "--verify", str(key))
    assert "resumed from" in job.err_text()
