"""Container creation by :mod:`datalad_udocker.run.extract`, without udocker (fast tier).

Real OCI layouts built here, real files: the container directory udocker expects, the
layers applied as udocker applied them (whiteouts first, hard links, symlinks, FIFOs,
modes from the headers without setuid/setgid, whatever the umask), and a refused or corrupt
image leaving nothing.  The extractor's own guard (no write through a symlink, whatever the
model said) is tested by handing it a plan the checker would have refused.
"""
from __future__ import annotations

import json
import os
import stat
import tarfile

import pytest

from datalad_udocker.dataset.layout import OCILayout
from datalad_udocker.errors import DigestMismatch, RunError, UnsafeLayer
from datalad_udocker.run import extract
from datalad_udocker.run.udocker_repo import UdockerRepo
from fixtures import images as im

R = im.Raw


def create(tmp_path, layers, name="dlu-test"):
    layout = tmp_path / "layout"
    im.build_image(layout, "img", layers, cmd=["/bin/sh"])
    udir = tmp_path / "udocker"
    cid = extract.create_container(udir, UdockerRepo(udir), OCILayout(layout), name)
    return udir, layout, cid


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield
    os.umask(old)


def test_a_container_in_udockers_format(tmp_path, umask):
    lower = im.make_raw_layer([
        R("bin", "dir", mode=0o755), R("bin/tool", data=b"tool\n", mode=0o4755),
        R("bin/link", "hardlink", "bin/tool"), R("bin/sh", "symlink", "tool"),
        R("shared", "dir", mode=0o2775), R("tmp", "dir", mode=0o1777),
        R("etc/gone", data=b"gone\n"), R("etc/ro", data=b"ro\n", mode=0o444),
        R("opq/old", data=b"old\n"), R("opq/keep", "dir"), R("locked", "dir", mode=0o500),
        R("locked/f", data=b"f\n", mode=0o400), R("run/fifo", "fifo", mode=0o640),
        R("dev/null", "chr", "1:3")])
    upper = im.make_raw_layer([
        R("etc/.wh.gone"), R("opq/new", data=b"new\n"), R("opq/.wh..wh..opq"),
        R("bin/tool", data=b"tool2\n", mode=0o750), R("etc/sub/deep", data=b"deep\n")],
        "zstd")
    udir, layout, cid = create(tmp_path, [lower, upper])
    cdir = udir / "containers" / cid
    manifest = OCILayout(layout).manifest()
    assert sorted(p.name for p in cdir.iterdir()) == ["ROOT", "container.json",
                                                      "imagerepo.name"]
    assert (cdir / "imagerepo.name").read_text() == \
        "datalad-udocker/%s:latest" % manifest.digest.hex
    assert json.loads((cdir / "container.json").read_text()) == OCILayout(layout).config()
    assert os.readlink(udir / "containers" / "dlu-test") == cid
    assert not list((udir / "datalad-udocker" / "run").glob("tmp*"))    # nor a skeleton
    root = cdir / "ROOT"
    modes = {p: stat.S_IMODE(os.lstat(root / p).st_mode) for p in (
        "", "bin", "bin/tool", "shared", "tmp", "etc", "etc/ro", "etc/sub", "locked",
        "locked/f", "run/fifo", "opq")}
    assert modes == {"": 0o755, "bin": 0o755, "bin/tool": 0o750, "shared": 0o775,
                     "tmp": 0o1777, "etc": 0o755, "etc/ro": 0o644, "etc/sub": 0o755,
                     "locked": 0o700, "locked/f": 0o600, "run/fifo": 0o640, "opq": 0o755}
    assert (root / "bin/tool").read_bytes() == b"tool2\n"
    # the hard link is the lower layer's inode, which the upper layer replaced at its path
    assert (root / "bin/link").read_bytes() == b"tool\n"
    assert not os.lstat(root / "bin/link").st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert os.readlink(root / "bin/sh") == "tool"
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert not os.path.lexists(root / "etc/gone") and not os.path.lexists(root / "dev/null")
    assert sorted(os.listdir(root / "opq")) == ["new"]      # whiteouts first, as udocker
    assert (root / "etc/sub/deep").read_bytes() == b"deep\n"
    for path in ("bin/tool", "bin/sh", "etc/ro", "locked", "bin"):
        assert os.lstat(root / path).st_mtime == im.MTIME, path
    assert UdockerRepo(udir).verification(
        OCILayout(layout).blob_path(manifest.layers[0].digest), manifest.layers[0].digest,
        manifest.layers[0].size)[1]             # the layers' digests are remembered


def test_a_refused_stack_leaves_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    layers = [im.make_raw_layer([R("big", data=b"x" * 100000), R("escape", "symlink",
                                                                  str(victim))]),
              im.make_raw_layer([R("escape/planted", data=b"pwned")])]
    with pytest.raises(UnsafeLayer, match="member 'escape/planted'"):
        create(tmp_path, layers)
    assert list(victim.iterdir()) == []
    assert list((tmp_path / "udocker" / "containers").iterdir()) == []


def test_a_corrupt_layer_leaves_nothing(tmp_path):
    layout = tmp_path / "layout"
    im.build_image(layout, "img", [im.make_layer(im.busybox_rootfs())], cmd=["/bin/sh"])
    lay = OCILayout(layout)
    blob = lay.blob_path(lay.manifest().layers[0].digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    udir = tmp_path / "udocker"
    with pytest.raises(DigestMismatch, match="corrupt"):
        extract.create_container(udir, UdockerRepo(udir), lay, "dlu-test")
    assert list((udir / "containers").iterdir()) == []


def test_the_extractor_never_writes_through_a_symlink(tmp_path):
    """A second guard: even a plan the checker would refuse cannot lead a write out."""
    victim = tmp_path / "victim"
    victim.mkdir()
    root = tmp_path / "ROOT"
    root.mkdir()
    (root / "escape").symlink_to(victim)
    writer = extract._Root(root, tmp_path / "spool")
    spool = writer.new_spool()
    for name, kind in (("escape/planted", tarfile.DIRTYPE), ("escape/sub/x", tarfile.DIRTYPE),
                       ("escape/link", tarfile.SYMTYPE)):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, "/etc"
        with pytest.raises(RunError, match="through the symlink"):
            writer.apply([info], spool)
    whiteout = tarfile.TarInfo("escape/.wh..wh..opq")
    (victim / "keep").write_text("keep")
    with pytest.raises(RunError, match="through the symlink"):
        writer.apply([whiteout], spool)
    assert [p.name for p in victim.iterdir()] == ["keep"]


def test_prune_drops_the_image_feeds_of_earlier_versions(tmp_path):
    """Earlier versions fed images into udocker's ``repos/`` (symlinks to the blobs) for
    ``udocker create``; a prune removes such a feed, never what its links point to."""
    from datalad_udocker.run.cache import ContainerCache
    blob = tmp_path / "blob"
    blob.write_bytes(b"layer")
    udir = tmp_path / "udocker"
    tag_dir = udir / "repos" / "datalad-udocker" / ("ab" * 32) / "latest"
    tag_dir.mkdir(parents=True)
    (tag_dir / "TAG").write_text("x")
    (tag_dir / ("sha256:" + "cd" * 32)).symlink_to(blob)
    ContainerCache(udir, "P1").prune()
    assert list((udir / "repos" / "datalad-udocker").iterdir()) == []
    assert blob.read_bytes() == b"layer"


@pytest.mark.parametrize("blob", [b"\x1f\x8b" + b"junk" * 300000, b"\x28\xb5\x2f\xfd" + b"x" * 99])
def test_an_unreadable_layer_is_refused_and_leaves_nothing(tmp_path, blob):
    """Decompression runs in a thread of its own: its errors still end in the checker's
    refusal (after the digest, which is right here), and nothing stays behind."""
    import threading
    layer = im.Layer(data=blob, digest=im.sha256(blob), diff_id=im.sha256(blob),
                     compression="gzip", media_type=im.OCI_LAYER["gzip"])
    before = threading.active_count()
    with pytest.raises(UnsafeLayer, match="its tar stream: it is not a readable tar archive"):
        create(tmp_path, [im.make_layer(im.busybox_rootfs()), layer])
    assert list((tmp_path / "udocker" / "containers").iterdir()) == []
    assert threading.active_count() == before


# --- attacks found by review (run/extract.py, run/layer_check.py) ---------------------------
def _tar(*members):
    """A plain PAX tar blob of ``(TarInfo, data)`` pairs, as an uncompressed Layer."""
    import io
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return _blob_layer(buf.getvalue())


def _blob_layer(blob):
    return im.Layer(data=blob, digest=im.sha256(blob), diff_id=im.sha256(blob),
                    compression="none", media_type=im.OCI_LAYER["none"])


def _member(name, type=tarfile.REGTYPE, data=None, mode=0o644, linkname="", pax=None):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = type, mode, linkname, im.MTIME
    info.size = len(data) if data is not None else 0
    info.pax_headers = dict(pax or {})
    return info, data


def _refused(tmp_path, layers, match):
    with pytest.raises(UnsafeLayer, match=match) as err:
        create(tmp_path, layers)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "udocker" / "containers").iterdir()) == []


_ATTACKER = """
import os, sys
shared, victim = sys.argv[1:]
try:
    os.rename(shared + "/sub", shared + "/old")
    os.symlink(victim, shared + "/sub")
    print("swapped")
except PermissionError as exc:
    print("denied", exc)
"""


def test_another_user_cannot_swap_a_directory_while_a_container_is_made(tmp_path, nonroot,
                                                                          monkeypatch):
    """Between two layers, another local user tries what a 0777 directory of the image
    allows: rename ``shared/sub`` (checked and remembered as a real directory by the
    first layer) away and put a symlink to a victim directory in its place.  The
    container directory is 0700 until it is finished: the attempt is denied."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    base = Path(tempfile.mkdtemp(prefix="dlu-race-", dir="/tmp"))    # others may enter
    base.chmod(0o755)
    victim = tmp_path / "victim"
    victim.mkdir()
    attempts = []
    layer = extract._extract_layer

    def attacker_between_layers(root, *args):
        if attempts == [] and os.path.isdir(os.path.join(root.path, "shared")):
            attempts.append(nonroot.run([sys.executable, "-c", _ATTACKER,
                                         os.path.join(root.path, "shared"), str(victim)],
                                        check=False, cwd="/"))
        return layer(root, *args)
    monkeypatch.setattr(extract, "_extract_layer", attacker_between_layers)
    try:
        first = _tar(_member("shared", tarfile.DIRTYPE, mode=0o777),
                     _member("shared/sub/x", data=b"x"))
        second = _tar(_member("shared/sub/pwned", data=b"pwned"))
        udir, _, cid = create(base, [first, second])
        assert [a.returncode for a in attempts] == [0], attempts
        assert attempts[0].stdout.startswith("denied"), attempts[0].stdout
        assert list(victim.iterdir()) == []
        cdir = udir / "containers" / cid
        assert (cdir / "ROOT/shared/sub/pwned").read_bytes() == b"pwned"
        assert stat.S_IMODE(os.lstat(cdir).st_mode) == 0o755     # finished: reachable
        assert stat.S_IMODE(os.lstat(cdir / "ROOT/shared").st_mode) == 0o777
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)


def _gnu_sparse(name, realsize):
    """A GNU sparse ('S') member claiming ``realsize`` bytes (one hole), no data."""
    info = tarfile.TarInfo(name)
    info.type, info.mtime = tarfile.GNUTYPE_SPARSE, im.MTIME
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))

    def octal(n):
        return tarfile.itn(n, 12, tarfile.GNU_FORMAT)
    block[386:398], block[398:410], block[483:495] = octal(realsize), octal(0), octal(realsize)
    block[148:156] = b" " * 8
    block[148:156] = ("%06o\0 " % sum(block[:512])).encode()
    return bytes(block[:512]) + b"\0" * 1024


@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_a_sparse_member_is_refused_before_its_zeros_are_written(tmp_path, kind):
    """A few hundred bytes claiming 64 MiB of zeros (terabytes would do as well)."""
    size = 64 << 20
    if kind == "gnu":
        layer = _blob_layer(_gnu_sparse("big", size))
    else:
        layer = _tar(_member("big", data=b"", pax={
            "GNU.sparse.map": "%d,0" % size, "GNU.sparse.size": str(size)}))
    _refused(tmp_path, [layer], r"member 'big': a sparse file, which image builders")


@pytest.mark.parametrize("name", ["a/.wh.keep/", "a/b/.wh.../", "a/.wh.../",
                                  "a/.wh..wh..opq/", "a/.wh.keep/."])
def test_a_file_named_with_a_trailing_slash_is_refused(tmp_path, name):
    """The checker and the extractor read names alike (split_name); a file whose name ends
    in '/' (which GNU tar would strip) is refused: it deleted ``a/keep`` or all of ``a``."""
    lower = _tar(_member("a/keep", data=b"k"), _member("a/b/c", data=b"c"))
    _refused(tmp_path, [lower, _tar(_member(name, data=b""))],
             r"member %r: a file whose name ends in '/'" % name)


@pytest.mark.parametrize("target", ["a/keep/", "a/keep/."])
def test_a_hardlink_to_a_name_with_a_trailing_slash_is_refused(tmp_path, target):
    lower = _tar(_member("a/keep", data=b"k"))
    _refused(tmp_path, [lower, _tar(_member("h", tarfile.LNKTYPE, linkname=target))],
             r"member 'h': a hardlink whose target ends in '/'")


def test_a_whiteout_named_directory_is_refused_by_its_normalised_name(tmp_path):
    lower = _tar(_member("a/keep", data=b"k"))
    _refused(tmp_path, [lower, _tar(_member("a/.wh.keep/", tarfile.DIRTYPE))],
             r"member 'a/\.wh\.keep': a whiteout marker that is a directory")


@pytest.mark.parametrize("member, match", [
    (_member("x", data=b"1", pax={"path": "a\0b"}), r"member 'a\\x00b': a NUL character"),
    (_member("x", tarfile.SYMTYPE, linkname="y", pax={"linkpath": "/etc\0/passwd"}),
     r"member 'x': a NUL character in its link target"),
    (_member("d", tarfile.DIRTYPE, pax={"mtime": "1e400"}),
     r"member 'd': a modification time out of range \(inf\)"),
    (_member("s", tarfile.SYMTYPE, linkname="x", pax={"mtime": "-1e30"}),
     r"member 's': a modification time out of range"),
    (_member("f", data=b"x", pax={"mtime": "nan"}), r"member 'f': a modification time"),
], ids=["nul-path", "nul-linkpath", "mtime-inf", "mtime-huge-negative", "mtime-nan"])
def test_a_header_the_extraction_cannot_apply_is_refused_in_one_line(tmp_path, member,
                                                                      match):
    _refused(tmp_path, [_tar(member)], "unusable image: layer sha256:[0-9a-f]+, " + match)


def test_a_layer_that_is_not_a_tar_is_refused_and_an_empty_tar_is_not(tmp_path):
    _refused(tmp_path / "text", [_blob_layer(b"hello world\n" * 100)],
             "its tar stream: it is not a tar archive")
    udir, _, cid = create(tmp_path / "zeros", [_blob_layer(b"\0" * 1024)])
    assert list((udir / "containers" / cid / "ROOT").iterdir()) == []
