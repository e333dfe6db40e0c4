"""Interrupting a run: signals reach the command as under ``docker run``, and
nothing of the run survives it.

Every run goes through the real ``datalad-udocker-run`` entry point as the
non-root user, in every execution mode, with the busybox image.  The test
waits for the command to say it started (a line on its stdout: no sleeps),
signals the runner as a user or a batch system would, and then checks within
a bounded time that the exit status is Docker's, that no process of the run
is left (its marker is in no process's argv) and that the udocker directory
holds nothing more than after an ordinary run (no per-run temp directory, no
runc state, no runc spec).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_runtime import PY, build, run_cli
from fixtures import images as im
from fixtures.users import udocker_dir_fixture  # noqa: E402

from datalad_udocker.run.supervise import FORWARDED

MODES = ["P1", "P2", "F1", "R1"]
GRACE = 3          # datalad.udocker.stop-timeout for these tests, seconds
BOUND = 30         # seconds an interrupted run may take beyond the grace
_serial = itertools.count(1)


@pytest.fixture(scope="module")
def image(nonroot):
    root = nonroot.make_tempdir("udtest-signals-")
    yield build(root, "busybox", [im.make_layer(im.busybox_rootfs())],
                cmd=["/bin/sh"])
    shutil.rmtree(root, ignore_errors=True)


udir = udocker_dir_fixture("module")


@pytest.fixture
def dataset(nonroot):
    path = nonroot.make_tempdir("udtest-ds-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    """Whatever a failing test leaves running is killed after it."""
    yield
    for run in Run.started:
        run.kill()
    Run.started.clear()


def state(udir: Path):
    """Every path in the udocker directory but the containers' ROOTs."""
    found = set()
    for top, dirs, files in os.walk(udir):
        rel = os.path.relpath(top, udir)
        if rel.startswith("containers/") and rel.count("/") == 1:
            dirs[:] = [d for d in dirs if d != "ROOT"]
        found.update(os.path.join(rel, n) for n in dirs + files)
    return found


def survivors(markers):
    """Processes whose argv holds one of ``markers``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
            if any(m.encode() in argv for m in markers):
                found.append(int(pid))
        except OSError:
            continue
    return found


class Run:
    """``datalad-udocker-run ... sh -c SCRIPT`` as the user, in the background.

    SCRIPT may use ``$MARK`` (a number unique to this run) and must print
    ``started`` first.  The run's processes are found by ``MARK=N`` (in the
    argv of the shell and of every process between) and ``sleep N``.  One
    line: PRoot 5.1 echoes the command's argv with ``-v 1``, which the
    launcher drops from stderr only up to its first newline.
    """

    started: list = []

    def __init__(self, nonroot, udir, image, dataset, mode, script,
                 grace=GRACE):
        Run.started.append(self)
        self.mark = str(3000 + os.getpid() % 1000 * 10 + next(_serial) % 10)
        self.markers = ("MARK=%s;" % self.mark,
                        "sleep\0%s\0" % self.mark)
        argv = [PY, "-m", "datalad_udocker.run.cli", "--execmode", mode,
                "--dataset", str(dataset), str(image), "sh", "-c",
                "MARK=%s; %s" % (self.mark, script)]
        env = nonroot.env({"DATALAD_UDOCKER_DIR": str(udir),
                           "DATALAD_UDOCKER_STOP__TIMEOUT": str(grace)})
        # signals the test process ignores (HUP under nohup) would stay ignored in the run,
        # rightly: the run starts with the default dispositions a terminal would give it
        self.proc = subprocess.Popen(
            nonroot.command(argv), cwd=str(dataset), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_signals)

    def kill(self):
        """SIGKILL every process of the run (they may hold our pipes open);
        returns their pids."""
        left = survivors(self.markers)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left

    def line(self, timeout=180):
        """The command's next stdout line."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no output from the command in %ds" % timeout
        return self.proc.stdout.readline().decode()

    def signal(self, signum):
        self.sent = time.monotonic()
        self.proc.send_signal(signum)

    def end(self, bound):
        """(status, rest of stdout, stderr, seconds since the signal)."""
        try:
            out, err = self.proc.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            left = self.kill()
            out, err = self.proc.communicate(timeout=30)
            pytest.fail("the run did not end %ds after the signal (%d "
                        "processes left): %s" % (bound, len(left),
                                                 err.decode()))
        return (self.proc.returncode, out.decode(), err.decode(),
                time.monotonic() - self.sent)


def _default_signals():
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_DFL)


_prepared = set()


def ordinary_run(nonroot, udir, image, dataset, mode):
    """The udocker directory's state after runs that ended by themselves
    (two, the first time: the first creates the container, udocker records
    mount points for /etc/passwd and /etc/group in the second)."""
    for _ in range(1 if (udir, mode) in _prepared else 2):
        res = run_cli(nonroot, udir, image, "true", mode=mode,
                      dataset=dataset)
        assert res.returncode == 0, res.stderr
    _prepared.add((udir, mode))
    return state(udir)


def assert_nothing_left(run, udir, before):
    """No process of ``run`` is left, and the udocker directory is as it
    was (per-run temp directories, runc state and spec included)."""
    assert survivors(run.markers) == []
    assert state(udir) == before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_command_ignoring_the_signal_is_killed_after_the_grace(
        nonroot, udir, image, dataset, mode, signum):
    before = ordinary_run(nonroot, udir, image, dataset, mode)
    run = Run(nonroot, udir, image, dataset, mode,
              "trap '' TERM INT; echo started; sleep $MARK; echo after")
    assert run.line() == "started\n"
    assert survivors(run.markers)             # the run is found
    run.signal(signum)
    code, out, err, took = run.end(GRACE + BOUND)
    assert (code, out, err) == (137, "", "")     # as after `docker stop`
    assert GRACE <= took < GRACE + BOUND
    assert_nothing_left(run, udir, before)


@pytest.mark.parametrize("mode", MODES)
def test_signals_reach_the_command(nonroot, udir, image, dataset, mode):
    """Each forwarded signal reaches the command once; a command that ends on
    TERM ends the run at once, with its own status.  (The command's traps run
    between its one-second sleeps: a trap during ``wait`` can be lost in
    busybox's shell.)"""
    before = ordinary_run(nonroot, udir, image, dataset, mode)
    names = ["USR1", "USR2", "HUP", "QUIT", "INT"]
    script = "".join("trap 'echo got-%s' %s; " % (n, n) for n in names) + (
        "trap 'echo got-TERM; exit 3' TERM; "
        "echo started; while :; do sleep 1; done")
    run = Run(nonroot, udir, image, dataset, mode, script, grace=60)
    assert run.line() == "started\n"
    for name in names:
        run.signal(getattr(signal, "SIG" + name))
        assert run.line() == "got-%s\n" % name
    run.signal(signal.SIGTERM)
    code, out, err, took = run.end(BOUND)
    assert (code, out, err) == (3, "got-TERM\n", "")
    assert took < BOUND
    assert_nothing_left(run, udir, before)


@pytest.mark.parametrize("mode", MODES)
def test_term_ends_a_command_as_under_docker(nonroot, udir, image, dataset,
                                             mode):
    """A command with the default TERM action dies of it (143), unless it is
    PID 1 of a PID namespace (R1, as under Docker), which ignores it: then
    it is killed after the grace period (137)."""
    before = ordinary_run(nonroot, udir, image, dataset, mode)
    run = Run(nonroot, udir, image, dataset, mode,
              "echo started; exec sleep $MARK")
    assert run.line() == "started\n"
    run.signal(signal.SIGTERM)
    code, out, err, took = run.end(GRACE + BOUND)
    if mode == "R1":
        assert (code, out, err) == (137, "", "")
        assert took >= GRACE
    else:
        assert (code, out, err) == (143, "", "")
        assert took < GRACE
    assert_nothing_left(run, udir, before)


def test_background_processes_end_with_the_command(nonroot, udir, image,
                                                   dataset):
    """As under Docker, a run ends with its command: what it left running in
    the background is killed (F1 has no PID namespace and no PRoot to wait
    for them)."""
    before = ordinary_run(nonroot, udir, image, dataset, "F1")
    run = Run(nonroot, udir, image, dataset, "F1",
              "echo started; (sleep $MARK >/dev/null 2>&1 &); exit 5")
    assert run.line() == "started\n"
    run.sent = time.monotonic()
    code, out, err, took = run.end(BOUND)
    assert (code, out, err) == (5, "", "")
    assert_nothing_left(run, udir, before)
