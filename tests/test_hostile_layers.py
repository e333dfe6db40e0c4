"""Hostile layers cannot escape the container when it is created (issue 7, item 2).

Fast unit tests of the stack checker on in-memory tars, then every attack for real: hostile
images built here, uploaded byte for byte to the real local registry, imported into a dataset
with ``datalad udocker-import`` and run with ``datalad-udocker-run`` (real udocker, PRoot) as
the non-root user and as root.  Each run must end in one line naming the layer and member,
leave its victim on the host untouched and create no container.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from datalad_udocker.errors import UnsafeLayer
from datalad_udocker.run.layer_check import StackChecker
from fixtures import images as im
from fixtures.push import upload_layout
from fixtures.util import REPO_ROOT

R = im.Raw
PY = str(REPO_ROOT / ".venv" / "bin" / "python")


def check(*layers, compression="none"):
    """Run the checker over layers given as lists of Raw members; the error text or None."""
    checker = StackChecker()
    try:
        for i, members in enumerate(layers):
            blob = im.compress(im.raw_tar(members), compression)
            checker.check_layer("sha256:layer%d" % i, io.BytesIO(blob))
    except UnsafeLayer as exc:
        return str(exc)
    return None


# --- the checker alone -----------------------------------------------------------------------
ATTACKS = {
    "symlink-then-write": ([R("escape", "symlink", "/tmp/host")], [R("escape/file", data=b"x")]),
    "relative-symlink-then-write": ([R("a", "dir"), R("a/up", "symlink", "../../../../tmp")],
                                    [R("a/up/file")]),
    "same-layer-symlink": ([R("escape", "symlink", "/tmp"), R("escape/file")],),
    "dotdot-member": ([R("../x")],),
    "dotdot-inside": ([R("a/../../x")],),
    "absolute-member": ([R("/etc/x")],),
    "dotdot-whiteout": ([R("../.wh.victim")],),
    "dotdot-opaque": ([R("a/../../.wh..wh..opq")],),
    "whiteout-of-dotdot": ([R("a", "dir"), R("a/.wh..")],),
    "whiteout-through-symlink": ([R("escape", "symlink", "/tmp")], [R("escape/.wh.victim")]),
    "opaque-of-symlink": ([R("escape", "symlink", "/tmp")], [R("escape/.wh..wh..opq")]),
    "whiteout-after-replacing-symlink": ([R("escape", "symlink", "/tmp")],
                                         [R("escape", "dir"), R("escape/.wh.victim")]),
    "hardlink-outside": ([R("link", "hardlink", "../../etc/shadow")],),
    "hardlink-absolute": ([R("link", "hardlink", "/etc/shadow")],),
    "hardlink-through-symlink": ([R("escape", "symlink", "/etc")],
                                 [R("link", "hardlink", "escape/shadow")]),
    "hardlink-to-later-member": ([R("link", "hardlink", "later"), R("later", data=b"x")],),
    "hardlink-to-directory": ([R("d", "dir"), R("link", "hardlink", "d")],),
    "char-device": ([R("sda", "chr", "8:0")],),
    "block-device": ([R("tmp", "dir"), R("tmp/sda", "blk", "8:0")],),
    "device-named-dev": ([R("dev", "blk", "8:0")],),
    "whiteout-in-whiteout-dir": ([R("a/.wh.b/.wh.c")],),
    "hardlinked-symlink-then-write": ([R("s", "symlink", "/tmp"), R("h", "hardlink", "s")],
                                      [R("h/file")]),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_checker_refuses(name):
    *head, last = ATTACKS[name]
    err = check(*ATTACKS[name])
    assert err is not None, name
    assert err.startswith("unsafe image: layer sha256:layer%d, member " % len(head)), err
    assert "\n" not in err


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_checker_reads_every_compression(compression):
    err = check([R("escape", "symlink", "/tmp")], [R("escape/x")], compression=compression)
    assert "layer sha256:layer1, member 'escape/x': its path goes through the symlink " \
           "'escape'" in err


LEGIT = [
    [R("./", "dir"), R("./bin", "dir"), R("./bin/busybox", data=b"b", mode=0o4755),
     R("./bin/sh", "symlink", "busybox"), R("./bin/su", "hardlink", "./bin/busybox"),
     R("./etc", "dir"), R("./etc/alt", "symlink", "/etc/real"), R("./etc/gone", data=b"g"),
     R("./opq", "dir"), R("./opq/old", data=b"o"), R("./dev", "dir"),
     R("./dev/null", "chr", "1:3"), R("./dev/fd", "symlink", "/proc/self/fd"),
     R("./run", "dir"), R("./run/fifo", "fifo"), R("./lib", "symlink", "usr/lib")],
    # a later layer: a symlink replaced by a file and by a directory, whiteouts, an opaque dir
    [R("etc/alt", data=b"now a file"), R("etc/.wh.gone"), R("opq/.wh..wh..opq"),
     R("opq/new", data=b"n"), R(".wh.lib"), R("lib", "dir"), R("lib/x", data=b"x"),
     R("bin/su2", "hardlink", "bin/su")],
    # and a symlink removed by a whiteout no longer blocks a path (./ prefix: udocker lists it)
    [R("etc/alt2", "symlink", "/tmp")],
    [R("./etc/.wh.alt2")],
    [R("etc/alt2/file")],
]


def test_checker_accepts_legitimate_layers():
    assert check(*LEGIT) is None
    assert check(*LEGIT, compression="gzip") is None


def test_checker_keeps_symlinks_udocker_keeps():
    # udocker's whiteout pass lists '*/.wh.*' only: a top-level '.wh.x' removes nothing
    err = check([R("s", "symlink", "/tmp")], [R(".wh.s")], [R("s/x")])
    assert "member 's/x': its path goes through the symlink 's'" in err
    # tar cannot replace a non-empty directory by a file, the symlink under it stays
    err = check([R("d", "dir"), R("d/s", "symlink", "/tmp")], [R("d", data=b"f")], [R("d/s/x")])
    assert "member 'd/s/x'" in err


def test_checker_refuses_data_after_a_damaged_header():
    good = im.raw_tar([R("a", data=b"a")])
    hidden = im.raw_tar([R("../x", data=b"x")])
    # a garbage block, then a valid member GNU tar would resynchronise on
    blob = good[:1024] + b"\xff" * 512 + hidden
    with pytest.raises(UnsafeLayer, match="follows a damaged header or the end"):
        StackChecker().check_layer("sha256:l", io.BytesIO(blob))
    with pytest.raises(UnsafeLayer, match="not a readable tar archive"):
        StackChecker().check_layer("sha256:l", io.BytesIO(b"\x1f\x8b" + b"junk" * 300))
