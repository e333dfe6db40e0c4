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
import subprocess
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
    "gnu-dumpdir": ([R("d", "dumpdir")],),
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
    # members after the end marker: GNU tar stops there, udocker's whiteout listing too
    with pytest.raises(UnsafeLayer, match="member '../x' follows a damaged header or the end"):
        StackChecker().check_layer("sha256:l", io.BytesIO(good + hidden))
    with pytest.raises(UnsafeLayer, match="not a readable tar archive"):
        StackChecker().check_layer("sha256:l", io.BytesIO(b"\x1f\x8b" + b"junk" * 300))


# --- for real: registry, dataset, udocker ----------------------------------------------------
# Victims: "victim-dir" (a directory of the user, named by absolute symlinks) and
# "<udocker dir>/containers/victim" (what udocker's own delete would reach: it only deletes
# under its repos/, layers/ and containers/ directories), reached by relative symlinks and
# '../' names from the container's ROOT (<udocker dir>/containers/<id>/ROOT).
def hostile_layers(victim_dir: Path) -> dict:
    up = "../../victim"               # from ROOT: <udocker dir>/containers/victim
    return {
        "symlink-then-write": [[R("escape", "symlink", str(victim_dir))],
                               [R("escape/planted", data=b"pwned")]],
        "relative-symlink-then-write": [[R("escape", "symlink", up)],
                                        [R("escape/planted", data=b"pwned")]],
        "same-layer-symlink-then-write": [[R("escape", "symlink", str(victim_dir)),
                                           R("escape/planted", data=b"pwned")]],
        "dotdot-member": [[R("../../victim/planted", data=b"pwned")]],
        "absolute-member": [[R(str(victim_dir / "planted"), data=b"pwned")]],
        "dotdot-whiteout": [[R("etc", "dir")], [R("etc/../../../.wh.victim")]],
        "whiteout-through-symlink": [[R("escape", "symlink", up)], [R("escape/.wh.keep")]],
        "opaque-through-symlink": [[R("escape", "symlink", up)],
                                   [R("escape/.wh..wh..opq")]],
        "hardlink-outside": [[R("stolen", "hardlink", "../../victim/keep")]],
        "hardlink-to-later-member": [[R("early", "hardlink", "later"),
                                      R("later", data=b"x")]],
        "block-device": [[R("sda", "blk", "8:0")]],
    }


def legit_layers() -> list:
    base = im.busybox_rootfs(extra={
        "bin/busybox": im.File(Path("/bin/busybox").read_bytes(), 0o4755),   # setuid
        "shared": im.Dir(0o2775),                                            # setgid
        "etc/alt": im.Symlink("/etc/hostname"), "etc/gone": b"gone\n",
        "opq/old": b"old\n", "usr/lib/libx": b"libx\n", "lib": im.Symlink("usr/lib"),
        "dev/fd": im.Symlink("/proc/self/fd")})
    return [im.make_layer(base), im.make_raw_layer([
        R("etc/alt", data=b"now a file\n"), R("etc/.wh.gone"), R("opq/.wh..wh..opq"),
        R("opq/new", data=b"new\n"), R("data", "dir"), R("data/a", data=b"linked\n"),
        R("data/b", "hardlink", "data/a"), R("bin/su", "hardlink", "bin/busybox"),
        R("run", "dir"), R("run/initctl", "fifo")]),
        im.make_raw_layer([R("etc/alt2", "symlink", "/tmp")], "zstd"),
        im.make_raw_layer([R("./etc/.wh.alt2")], "none"),
        im.make_raw_layer([R("etc/alt2/file", data=b"in a dir\n")])]


class Runner:
    """``datalad-udocker-run`` as the non-root user or as root, each with its own udocker dir
    (under ``base``) and victims."""

    def __init__(self, nonroot, as_root: bool, base: Path):
        self.nonroot, self.as_root, self.base = nonroot, as_root, base
        self.udir = base / "udocker"

    def run(self, image: Path, *cmd: str, mode: str = "P1"):
        argv = [PY, "-m", "datalad_udocker.run.cli", "--execmode", mode, str(image), *cmd]
        env = {"DATALAD_UDOCKER_DIR": str(self.udir)}
        if not self.as_root:
            return self.nonroot.run(argv, env=env, check=False)
        return subprocess.run(argv, env={**self.nonroot.env(env), "HOME": str(self.base)},
                              cwd=self.base, capture_output=True, text=True, timeout=300)

    def plant_victims(self, victim_dir: Path):
        """(Re)create the victims; return their state, to compare after an attack."""
        victim = self.udir / "containers" / "victim"
        for d in (victim_dir, victim):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            (d / "keep").write_text("keep\n")
        if not self.as_root:
            for p in (self.udir, self.udir / "containers", victim, victim / "keep",
                      victim_dir, victim_dir / "keep"):
                self.nonroot.chown(p)
        return victims_state(victim_dir, victim)


def victims_state(*dirs: Path) -> dict:
    return {str(p): (p.read_bytes(), p.stat().st_mode, p.stat().st_nlink)
            for d in dirs for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def hostile(nonroot, registry):
    """A dataset (of the non-root user) with every hostile image and the legitimate one."""
    base = nonroot.make_tempdir("udtest-hostile-")
    victim_dir = base / "victim-dir"
    images_dir = base / "layouts"
    specs = {name: [im.make_raw_layer(members) for members in layers]
             for name, layers in hostile_layers(victim_dir).items()}
    specs["legit"] = legit_layers()
    for name, layers in specs.items():
        im.build_image(images_dir / name, name, layers, cmd=["/bin/sh"])
        upload_layout(registry, images_dir / name, name, f"hostile/{name}", "1")
    nonroot.run(["datalad", "create", "-c", "text2git", "ds"], cwd=base)
    ds = base / "ds"
    for name in specs:
        nonroot.run(["datalad", "udocker-import", "-d", str(ds), "-n", name,
                     f"{registry.host}/hostile/{name}:1"], cwd=base)
    yield ds, victim_dir, {name: [l.digest for l in layers] for name, layers in specs.items()}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["nonroot", "root"])
def runner(request, nonroot):
    base = nonroot.make_tempdir("udtest-hostile-run-")
    yield Runner(nonroot, request.param == "root", base)
    shutil.rmtree(base, ignore_errors=True)


EXPECTED = {   # attack -> (index of the refused layer, refused member)
    "symlink-then-write": (1, "escape/planted"),
    "relative-symlink-then-write": (1, "escape/planted"),
    "same-layer-symlink-then-write": (0, "escape/planted"),
    "dotdot-member": (0, "../../victim/planted"),
    "absolute-member": (0, None),
    "dotdot-whiteout": (1, "etc/../../../.wh.victim"),
    "whiteout-through-symlink": (1, "escape/.wh.keep"),
    "opaque-through-symlink": (1, "escape/.wh..wh..opq"),
    "hardlink-outside": (0, "stolen"),
    "hardlink-to-later-member": (0, "early"),
    "block-device": (0, "sda"),
}


@pytest.mark.parametrize("attack", sorted(EXPECTED))
def test_hostile_image_is_refused(hostile, runner, attack):
    ds, victim_dir, digests = hostile
    before = runner.plant_victims(victim_dir)
    image = ds / ".datalad" / "environments" / attack / "image"
    res = runner.run(image, "true")
    # nothing touched, nothing created, nothing fed
    assert victims_state(victim_dir, runner.udir / "containers" / "victim") == before
    assert sorted(p.name for p in (runner.udir / "containers").iterdir()) == ["victim"]
    assert not (runner.udir / "repos").exists() or not any((runner.udir / "repos").rglob("*"))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    layer, member = EXPECTED[attack]
    member = member or str(victim_dir / "planted")
    assert lines[0].startswith(
        f"datalad-udocker-run: error: unsafe image: layer {digests[attack][layer]}, "
        f"member {member!r}: "), lines[0]
    assert not (runner.udir / "datalad-udocker" / "checked").exists()


def test_legitimate_image_runs_and_looks_right(hostile, runner):
    ds, victim_dir, _ = hostile
    runner.plant_victims(victim_dir)
    image = ds / ".datalad" / "environments" / "legit" / "image"
    script = ("cat /etc/alt /opq/new /data/b /etc/alt2/file /lib/libx; ls /opq; "
              "test -e /etc/gone || echo gone-is-gone; readlink /dev/fd")
    res = runner.run(image, "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ("now a file\nnew\nlinked\nin a dir\nlibx\nnew\ngone-is-gone\n"
                          "/proc/self/fd\n"), res.stdout
    roots = [p / "ROOT" for p in (runner.udir / "containers").iterdir()
             if not p.is_symlink() and (p / "ROOT").is_dir()]
    assert len(roots) == 1
    root = roots[0]
    # hardlinks are hardlinks, setuid/setgid bits are gone (as root too)
    assert os.stat(root / "data/a").st_ino == os.stat(root / "data/b").st_ino
    assert os.stat(root / "bin/su").st_ino == os.stat(root / "bin/busybox").st_ino
    for path in (root / "bin/busybox", root / "shared"):
        assert not os.stat(path).st_mode & (stat.S_ISUID | stat.S_ISGID), path
    assert (root / "etc/alt").is_file() and not (root / "etc/alt").is_symlink()
    assert stat.S_ISFIFO(os.lstat(root / "run/initctl").st_mode)      # FIFOs are allowed
    assert not os.path.lexists(root / "opq/old") and not os.path.lexists(root / "etc/gone")
    # the blobs were verified once: a second execution mode (which extracts and checks the
    # layers again, in the same read) does not hash them again (their memos are not rewritten)
    memos = sorted((runner.udir / "datalad-udocker").glob("verified/*"))
    assert len(memos) == 6          # the config and five layers
    inodes = [os.stat(p).st_ino for p in memos]
    res = runner.run(image, "cat", "/etc/alt", mode="P2")
    assert (res.returncode, res.stdout) == (0, "now a file\n"), res.stderr
    assert [os.stat(p).st_ino for p in memos] == inodes
