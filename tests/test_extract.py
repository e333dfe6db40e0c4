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
