"""F1 (Fakechroot) with Debian's patchelf 0.14.3 (issue 9 item 4), as the non-root user.

udocker's F1 engine starts every program through the image's own loader, which it finds with
``patchelf -q --print-interpreter`` and keeps in the container's ``ld.so.path``.  Debian's
patchelf rejects udocker's ``-q``: udocker then never found the loader, ran patchelf on every
executable of the image on every run, and programs ran with the HOST's ``ld-linux``.  Here a
counting patchelf (``UDOCKER_USE_PATCHELF_EXECUTABLE``, udocker's own variable, which
datalad-udocker honours) logs every call it gets.
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import pytest

from fixtures import images as im
from test_runtime import PY, build

HANG = 120          # seconds: a loose bound for one warm run, not a timing assertion

COUNTER = """#!/bin/sh
echo "$*" >> {log}
exec {real} "$@"
"""


@pytest.fixture(scope="module")
def glibc(nonroot):
    """An image of dynamically linked glibc programs (copies of the host's, with their
    libraries and loader at the paths ``ldd`` names)."""
    root = nonroot.make_tempdir("udtest-f1-images-")
    yield build(root, "glibc", [im.make_layer(im.glibc_rootfs())], cmd=["/bin/sh"])
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def f1env(nonroot):
    """``(environment, patchelf log)``: a fresh udocker directory and a counting patchelf."""
    base = nonroot.make_tempdir("udtest-f1-")
    real = shutil.which("patchelf")
    assert real, "F1 needs Debian's patchelf (apt-get install patchelf)"
    log = base / "patchelf.log"
    log.write_text("")
    counter = base / "patchelf"
    counter.write_text(COUNTER.format(log=log, real=real))
    counter.chmod(0o755)
    for path in (log, counter):
        nonroot.chown(path)
    yield {"DATALAD_UDOCKER_DIR": str(base / "udocker"),
           "UDOCKER_USE_PATCHELF_EXECUTABLE": str(counter)}, log
    shutil.rmtree(base, ignore_errors=True)


def calls(log: Path) -> list:
    return log.read_text().splitlines()


def run(nonroot, env, image, *cmd, mode="F1"):
    res = nonroot.run([PY, "-m", "datalad_udocker.run.cli", "--execmode", mode, str(image),
                       *cmd], env=env, check=False, timeout=HANG)
    assert res.returncode == 0, res.stderr
    return res


def mapped(maps: str, name: str) -> set:
    """The paths of the mapped files whose name starts with ``name``."""
    return {line.split()[-1] for line in maps.splitlines()
            if line.split()[-1].rpartition("/")[2].startswith(name)}


def test_f1_runs_the_image_loader_recorded_at_creation(nonroot, glibc, f1env):
    env, log = f1env
    created = nonroot.run([PY, "-c", (
        "import json, sys; from datalad_udocker.run.cache import ContainerCache\n"
        "print(json.dumps(ContainerCache(execmode='F1').ensure_container(sys.argv[1]).path))"),
        str(glibc)], env=env)
    root = Path(json.loads(created.stdout.splitlines()[-1])).resolve() / "ROOT"
    # creation found the loader with a handful of patchelf calls, none with -q, and udocker
    # recorded it in its own state file
    at_create = calls(log)
    assert 1 <= len(at_create) <= 5, at_create
    assert all(c.startswith("--print-interpreter ") for c in at_create), at_create
    assert (root.parent / "ld.so.path").read_text().strip() == "/lib64/ld-linux-x86-64.so.2"

    # the command and the programs it starts map the IMAGE's loader and libc, not the host's
    out = run(nonroot, env, glibc, "sh", "-c", "cat /proc/self/maps; echo ==; "
              "exec cat /proc/self/maps").stdout
    for maps in out.split("==\n") + [out]:
        for name in ("ld-linux", "libc.so"):
            paths = mapped(maps, name)
            assert paths and all(p.startswith(f"{root}/") for p in paths), (name, maps)

    # no run ever calls patchelf again
    for _ in range(2):
        run(nonroot, env, glibc, "true")
    assert calls(log) == at_create


def test_f1_warm_run_time_next_to_p1(nonroot, glibc, f1env):
    """Prints the median warm run of ``true`` in F1 and P1 (see with ``pytest -s``)."""
    env, log = f1env
    medians = {}
    for mode in ("P1", "F1"):
        run(nonroot, env, glibc, "true", mode=mode)          # creates the container
        times = []
        for _ in range(3):
            start = time.monotonic()
            run(nonroot, env, glibc, "true", mode=mode)
            times.append(time.monotonic() - start)
        medians[mode] = statistics.median(times)
    print("\nwarm run of true (median of 3): " + ", ".join(
        "%s %.2f s" % kv for kv in medians.items()), file=sys.stderr)
    assert len(calls(log)) <= 5, calls(log)
