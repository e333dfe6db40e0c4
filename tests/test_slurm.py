"""Job arrays on a real Slurm cluster: many tasks, one image, one shared udocker directory.

The non-root user ``udtest`` imports ``test/single:1`` (busybox) from the test registry into a
dataset, then submits ``docs/examples/array-job.sh`` (the recipe of docs/cluster.rst, run as is)
with ``sbatch --array=1-8``: each task clones the dataset and runs ``datalad containers-run``,
all tasks with the same ``DATALAD_UDOCKER_DIR``. The cluster (tests/fixtures/slurm.py) runs the
eight tasks at once.

- All tasks succeed with the right output, and exactly one container was created (one udocker
  container directory seen at any moment of the array, one cache entry): the test holds the
  per-container lock until tasks queue on it (seen in /proc/locks), so they all race for the
  creation; one task creates the container, the others wait on the lock and reuse it.
- A task ``scancel``-led while it creates the container (frozen at the moment udocker's container
  directory appears, found as the holder of the exclusive creation lock) leaves nothing that
  breaks the other tasks, a resubmitted task, or ``datalad udocker-containers --prune``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.util import REPO_ROOT, wait_until

from datalad_udocker.dataset.layout import OCILayout
from datalad_udocker.run.cache import container_name
from datalad_udocker.run.udocker_repo import STATE_DIR

pytestmark = pytest.mark.timeout(900)

SCRIPT = REPO_ROOT / "docs" / "examples" / "array-job.sh"
TASKS = 8
IMAGE = "busybox"


def expected_result(task) -> str:
    return f"task {task} ran in container\n"        # /etc/hostname of the image


@pytest.fixture(scope="module")
def origin(nonroot, registry):
    """A dataset owned by ``udtest`` holding test/single:1 as container ``busybox``."""
    base = nonroot.make_tempdir("udtest-slurm-")
    nonroot.run(["datalad", "create", "-c", "text2git", "origin"], cwd=base)
    nonroot.run(["datalad", "udocker-import", "-d", "origin", "-n", IMAGE,
                 f"{registry.host}/test/single:1"], cwd=base)
    yield base / "origin"
    shutil.rmtree(base, ignore_errors=True)


class Array:
    """One submission of the recipe: its own directory of clones and a udocker directory."""

    def __init__(self, nonroot, slurm, origin, udocker_dir=None):
        self.nonroot, self.slurm, self.origin = nonroot, slurm, origin
        self.work = nonroot.make_tempdir("udtest-array-")
        self.udir = Path(udocker_dir) if udocker_dir else self.work / "udocker"
        self.env = {"DATASET": str(origin), "DATALAD_UDOCKER_DIR": str(self.udir),
                    **slurm.env}
        manifest = OCILayout(origin / ".datalad/environments" / IMAGE / "image")
        self.name = container_name(manifest.manifest_descriptor().digest, "P1")

    def submit(self, array=f"1-{TASKS}") -> str:
        """``sbatch --array=ARRAY array-job.sh`` as the user; returns the job id."""
        res = self.nonroot.run(["sbatch", "--parsable", f"--array={array}", str(SCRIPT)],
                               cwd=self.work, env=self.env)
        return res.stdout.strip().split(";")[0]

    def log(self, job, task) -> str:
        path = self.work / f"slurm-{job}_{task}.out"
        return path.read_text(errors="replace") if path.exists() else "(no output file)"

    def check_tasks(self, job, states, tasks):
        """Each of ``tasks`` COMPLETED and wrote its result in its own clone."""
        for task in tasks:
            assert states.get(f"{job}_{task}") == "COMPLETED", \
                f"task {task}: {states.get(f'{job}_{task}')}\n{self.log(job, task)}"
            assert (self.work / f"task-{task}" / "result.txt").read_text() == \
                expected_result(task), self.log(job, task)

    def container_dirs(self):
        """udocker's container directories (not the name links)."""
        cdir = self.udir / "containers"
        return sorted(p.name for p in cdir.iterdir() if not p.is_symlink()) \
            if cdir.is_dir() else []

    def cache_entries(self):
        return sorted(p.name for p in (self.udir / STATE_DIR / "containers").glob("*.json"))

    @property
    def lock_file(self) -> Path:
        return self.udir / STATE_DIR / "locks" / f"{self.name}.lock"


def test_job_array_creates_the_container_once(nonroot, slurm, origin):
    array = Array(nonroot, slurm, origin)
    # the user holds the creation lock until tasks queue on it: all of them then race for
    # the creation at once, however fast one creation is on this machine
    nonroot.run(["mkdir", "-p", str(array.lock_file.parent)])
    holder = subprocess.Popen(nonroot.command(["flock", "-x", str(array.lock_file), "cat"]),
                              stdin=subprocess.PIPE, env=nonroot.env())
    start = time.monotonic()
    try:
        wait_until(lambda: flock_holders(array.lock_file, "WRITE") == [holder.pid], 30,
                   what="the test to hold the creation lock")
        job = array.submit()
        queued = set()

        def two_queued():
            queued.update(flock_holders(array.lock_file, None, waiting=True))
            return len(queued) >= 2
        wait_until(two_queued, 300, interval=0.02,
                   what="two tasks to wait on the creation lock",
                   log=array.work / f"slurm-{job}_1.out")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # every container directory that exists at any moment of the array (a container lives at
    # least as long as a task's run in it: a re-creation cannot slip between two looks)
    seen, waited = set(), set()

    def watch():
        seen.update(array.container_dirs())
        if flock_holders(array.lock_file, "WRITE"):     # a task is creating the container
            waited.update(flock_holders(array.lock_file, None, waiting=True))

    states = slurm.wait_done(job, watch=watch)
    array_time = time.monotonic() - start
    array.check_tasks(job, states, range(1, TASKS + 1))
    assert len(seen) == 1, f"{len(seen)} containers were created: {sorted(seen)}"
    assert array.container_dirs() == sorted(seen)
    # the tasks ran together: several queued on the lock, then raced for the creation
    print(f"\n[lock] {len(queued)} task(s) queued on the lock the test held; "
          f"{len(waited)} waited while one created the container")
    assert array.cache_entries() == [f"{array.name}.json"]
    # each task recorded its run in its own clone
    log = nonroot.run(["git", "log", "-1", "--format=%B"], cwd=array.work / "task-1").stdout
    assert "[DATALAD RUNCMD]" in log

    # the same runs one after the other (fresh clones and udocker directory)
    seq = Array(nonroot, slurm, origin)
    start = time.monotonic()
    for task in range(1, TASKS + 1):
        nonroot.run(["bash", str(SCRIPT)], cwd=seq.work,
                    env={**seq.env, "SLURM_ARRAY_TASK_ID": str(task)})
    seq_time = time.monotonic() - start
    for task in range(1, TASKS + 1):
        assert (seq.work / f"task-{task}" / "result.txt").read_text() == expected_result(task)
    print(f"\n[figures] {TASKS} tasks (clone + containers-run): job array "
          f"{array_time:.1f} s wall (submit to last task done, {os.cpu_count()} cores), "
          f"sequential {seq_time:.1f} s")
    for a in (array, seq):
        shutil.rmtree(a.work, ignore_errors=True)


def flock_holders(path: Path, mode: str = "WRITE", waiting: bool = False):
    """Pids holding (or with ``waiting``: waiting for) a flock of ``mode`` (READ, WRITE or
    None: either) on ``path``, from /proc/locks."""
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        return []
    pids = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()[1:]
        if (fields[0] == "->") != waiting:
            continue
        fields = fields[1:] if waiting else fields
        if len(fields) > 4 and fields[:2] == ["FLOCK", "ADVISORY"] and \
                (mode is None or fields[2] == mode) and \
                fields[4].rsplit(":", 1)[-1] == str(inode):
            pids.append(int(fields[3]))
    return pids


def process_tree(pid):
    """``pid`` and all its descendants, parents first."""
    children = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo += children.get(p, [])
    return tree


def freeze(pid):
    """SIGSTOP ``pid`` and all its descendants (again until no new one appears); their
    ``(pid, start time)`` pairs."""
    frozen, starts = set(), {}
    while True:
        new = [p for p in process_tree(pid) if p not in frozen]
        if not new:
            return sorted(starts.items())
        for p in new:
            with contextlib.suppress(ProcessLookupError):     # a child that just exited
                os.kill(p, signal.SIGSTOP)
            frozen.add(p)
            stat = proc_stat(p)
            if stat is not None:
                starts[p] = stat[1]


def proc_stat(pid):
    """``(state, start time)`` of ``pid`` from /proc/PID/stat, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def alive(pid, start) -> bool:
    """Is the process ``pid`` that started at ``start`` still alive (not a zombie)?"""
    stat = proc_stat(pid)
    return stat is not None and stat[1] == start and stat[0] not in ("Z", "X")


def slurm_task_of(pid) -> str:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = dict(v.decode(errors="replace").split("=", 1) for v in env if b"=" in v)
    return found["SLURM_ARRAY_TASK_ID"]


def test_scancel_while_creating(nonroot, slurm, origin):
    array = Array(nonroot, slurm, origin)
    job = array.submit()
    # the task creating the container holds the exclusive lock...
    creator = []
    wait_until(lambda: creator.extend(flock_holders(array.lock_file)) or creator, 300,
               interval=0.02, what="a task to take the creation lock",
               log=array.work / f"slurm-{job}_1.out")
    task = slurm_task_of(creator[0])
    # ...and is frozen as soon as udocker's container directory appears: mid-create
    wait_until(array.container_dirs, 120, interval=0.01,
               what="udocker's container directory to appear")
    frozen = freeze(creator[0])
    assert array.cache_entries() == [], "creation finished before it could be cancelled"
    assert slurm.job_states(f"{job}_{task}").get(f"{job}_{task}") == "RUNNING"
    nonroot.run(["scancel", f"{job}_{task}"], env=slurm.env)
    states = slurm.wait_done(job)
    assert states[f"{job}_{task}"] == "CANCELLED", states
    others = [t for t in range(1, TASKS + 1) if str(t) != task]
    array.check_tasks(job, states, others)
    assert array.cache_entries() == [f"{array.name}.json"]
    # every frozen process of the cancelled task is dead (gone, or a zombie whose orphaned
    # parent is this sandbox's non-reaping init; a reused pid has another start time)
    wait_until(lambda: not [p for p in frozen if alive(*p)], 60,
               what="the cancelled task's processes to die")

    # resubmitting the cancelled task (after removing its half-done clone) just works
    shutil.rmtree(array.work / f"task-{task}")
    job2 = array.submit(array=task)
    array.check_tasks(job2, slurm.wait_done(job2), [task])
    assert array.cache_entries() == [f"{array.name}.json"]

    # prune removes what the cancelled creation left, keeps the container in use recently
    udocker = {"DATALAD_UDOCKER_DIR": str(array.udir)}
    nonroot.run(["datalad", "udocker-containers", "--prune", "--older-than", "1"], env=udocker)
    listing = nonroot.run(["datalad", "udocker-containers"], env=udocker).stdout
    assert "incomplete" not in listing and listing.count("P1 ") == 1, listing
    assert len(array.container_dirs()) == 1, array.container_dirs()
    assert array.cache_entries() == [f"{array.name}.json"]
    res = nonroot.run(["datalad", "containers-run", "-n", IMAGE, "cat /etc/hostname"],
                      cwd=array.work / f"task-{others[0]}", env=udocker)
    assert "container" in res.stdout
    assert len(array.container_dirs()) == 1
    shutil.rmtree(array.work, ignore_errors=True)
