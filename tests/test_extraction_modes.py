"""Permissions in a container are the image's, whatever the caller's umask.

udocker extracts layers with GNU tar's ``--no-same-permissions``: the
caller's umask applies and sticky bits are dropped.  The image here has
directories and files whose modes a restrictive umask (077) would change;
the non-root user creates its container with that umask, through the real
``datalad-udocker-run``, and the modes are checked inside the container and
on the extracted ROOT.  setuid/setgid are dropped on purpose (a setuid file
in the user's cache would run as the user for anyone who can reach it).
"""
from __future__ import annotations

import os
import shutil
import stat

import pytest

from fixtures import images as im
from fixtures.users import udocker_dir_fixture  # noqa: E402
from test_runtime import PY, build

# path -> (entry, mode expected in the container)
ENTRIES = {
    "opt/d755": (im.Dir(0o755), 0o755),
    "opt/d1777": (im.Dir(0o1777), 0o1777),
    "opt/d700": (im.Dir(0o700), 0o700),
    "opt/d750": (im.Dir(0o750), 0o750),
    "opt/d750/f644": (im.File(b"a\n", 0o644), 0o644),
    "opt/f755": (im.File(b"#!/bin/sh\n", 0o755), 0o755),
    "opt/f640": (im.File(b"b\n", 0o640), 0o640),
    "opt/f4755": (im.File(b"#!/bin/sh\n", 0o4755), 0o755),
    "opt/f2750": (im.File(b"#!/bin/sh\n", 0o2750), 0o750),
}
EXPECTED = dict({path: mode for path, (_, mode) in ENTRIES.items()},
                **{"tmp": 0o1777, "etc": 0o755, "etc/hostname": 0o644,
                   "root": 0o700})


@pytest.fixture(scope="module")
def image(nonroot):
    root = nonroot.make_tempdir("udtest-modes-")
    lower = im.busybox_rootfs()
    # a second layer changes modes the first one set
    upper = {"opt/d755": im.Dir(0o711), "opt/f640": im.File(b"b\n", 0o604)}
    expected = dict(EXPECTED, **{"opt/d755": 0o711, "opt/f640": 0o604})
    lower.update({path: entry for path, (entry, _) in ENTRIES.items()})
    yield build(root, "modes", [im.make_layer(lower),
                                im.make_layer(upper, "zstd")],
                cmd=["/bin/sh"]), expected
    shutil.rmtree(root, ignore_errors=True)


udir = udocker_dir_fixture("function")


@pytest.mark.parametrize("mode", ["P1", "R1"])
def test_modes_are_the_images_whatever_the_umask(nonroot, udir, image, mode):
    layout, expected = image
    paths = sorted(expected)
    probe = "umask; cd / && stat -c '%n %a' / " + " ".join(paths)
    res = nonroot.run(["/bin/sh", "-c", 'umask 077 && exec "$@"', "sh", PY,
                       "-m", "datalad_udocker.run.cli", "--execmode", mode,
                       str(layout), "sh", "-c", probe],
                      env={"DATALAD_UDOCKER_DIR": str(udir)}, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "0022"         # Docker's umask, as runc gives in R1
    inside = dict(line.split() for line in lines[1:])
    # "/" is no layer's: udocker makes it, under Docker's umask
    assert inside == dict({p: "%o" % m for p, m in expected.items()},
                          **{"/": "755"})
    roots = [r for r in (udir / "containers").glob("*/ROOT")
             if not r.parent.is_symlink()]
    assert len(roots) == 1
    on_disk = {p: stat.S_IMODE(os.lstat(roots[0] / p).st_mode)
               for p in paths + [""]}
    assert on_disk == dict(expected, **{"": 0o755})
