"""A site-wide container cache, read-only for its users (issue 11 item 5).

root creates the site's containers (a directory 0755 owned by root) by
running images once with ``DATALAD_UDOCKER_DIR=<site dir>``; the non-root
user names that directory in ``datalad.udocker.site-dir`` in their global git
config and runs the same image with their own (empty) udocker directory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fixtures import images as im
from fixtures.util import REPO_ROOT

PY = str(REPO_ROOT / ".venv" / "bin" / "python")
RUN = [PY, "-m", "datalad_udocker.run.cli", "--execmode", "P1"]


def listing(root: Path) -> dict:
    """Every path under ``root`` with its type, mode, size and mtime."""
    found = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files + ["."]:
            path = os.path.join(base, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                  st.st_uid)
    return found


@pytest.fixture(scope="module")
def site(nonroot):
    """``(site dir, images)``: two busybox images, only ``shared`` in the site."""
    if not nonroot.switches:
        pytest.fail("the site cache test needs root (to be the site's account)")
    images = nonroot.make_tempdir("udtest-site-images-")
    layouts = {}
    for name, extra in (("shared", {"etc/site-marker": b"from the image\n"}),
                        ("private", {"etc/site-marker": b"private image\n"})):
        layouts[name] = images / name
        im.build_image(layouts[name], name,
                       [im.make_layer(im.busybox_rootfs(extra=extra))], cmd=["/bin/sh"])
    site_dir = Path(tempfile.mkdtemp(prefix="udtest-site-", dir="/tmp"))
    site_dir.chmod(0o755)                       # root's, readable by all
    for mode in ("P1", "R1"):
        res = subprocess.run(RUN[:-1] + [mode, str(layouts["shared"]), "cat", "/etc/site-marker"],
                             env=dict(os.environ, DATALAD_UDOCKER_DIR=str(site_dir / "udocker")),
                             cwd="/", capture_output=True, text=True)
        assert (res.returncode, res.stdout) == (0, "from the image\n"), res.stderr
    for cdir in (site_dir / "udocker" / "containers").iterdir():
        cdir.chmod(0o755)                       # R1 made its container root's only
    nonroot.run(["git", "config", "--global", "datalad.udocker.site-dir",
                 str(site_dir / "udocker")])
    try:
        yield site_dir / "udocker", layouts
    finally:
        nonroot.run(["git", "config", "--global", "--unset", "datalad.udocker.site-dir"],
                    check=False)
        shutil.rmtree(site_dir, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)


@pytest.fixture
def own(nonroot):
    """The user's own (fresh) udocker directory and a dataset directory."""
    base = nonroot.make_tempdir("udtest-site-own-")
    ds = base / "ds"
    ds.mkdir()
    nonroot.chown(ds)
    yield base / "udocker", ds
    shutil.rmtree(base, ignore_errors=True)


def run(nonroot, udir, image, *cmd, dataset=None):
    argv = RUN + (["--dataset", str(dataset)] if dataset else []) + [str(image), *cmd]
    return nonroot.run(argv, cwd=dataset, env={"DATALAD_UDOCKER_DIR": str(udir)}, check=False)


def own_containers(udir: Path):
    return sorted(p.name for p in (udir / "containers").iterdir()) \
        if (udir / "containers").is_dir() else []


def without_layers(layout: Path, dest: Path) -> Path:
    """A copy of ``layout`` without its layer blobs (a clone that fetched none)."""
    shutil.copytree(layout, dest)
    blobs = dest / "blobs" / "sha256"
    index = json.loads((dest / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    for layer in manifest["layers"]:
        (blobs / layer["digest"][7:]).unlink()
    return dest


def test_site_container_used_without_writing(nonroot, site, own):
    site_dir, layouts = site
    udir, ds = own
    image = without_layers(layouts["shared"], ds.parent / "image")
    before = listing(site_dir.parent)
    res = run(nonroot, udir, image, "sh", "-c",
              "cat /etc/site-marker; echo data > out.txt; touch /tmp/scratch-$$",
              dataset=ds)
    assert (res.returncode, res.stdout) == (0, "from the image\n"), res.stderr
    assert (ds / "out.txt").read_text() == "data\n"           # the dataset is writable
    # writes into the container's root fail with the system's own error
    res = run(nonroot, udir, image, "sh", "-c", "echo x > /new-file")
    assert res.returncode != 0
    assert "Permission denied" in res.stderr or "Read-only" in res.stderr, res.stderr
    res = run(nonroot, udir, image, "sh", "-c", "echo x >> /etc/site-marker")
    assert res.returncode != 0 and "Permission denied" in res.stderr, res.stderr
    # nothing written in the site dir, no container of the user's own
    assert listing(site_dir.parent) == before
    assert own_containers(udir) == []
    assert not list((udir / "datalad-udocker" / "containers").glob("*.json")) \
        if (udir / "datalad-udocker" / "containers").is_dir() else True


def test_image_missing_in_site_uses_own_cache(nonroot, site, own):
    site_dir, layouts = site
    udir, _ = own
    before = listing(site_dir.parent)
    res = run(nonroot, udir, layouts["private"], "cat", "/etc/site-marker")
    assert (res.returncode, res.stdout) == (0, "private image\n"), res.stderr
    assert len(own_containers(udir)) == 2            # the container and its name link
    assert listing(site_dir.parent) == before


def test_site_dir_writable_by_user_is_ignored(nonroot, site, own):
    """A "site" directory the user could change is not trusted: warned
    about, and the user's own cache is used."""
    site_dir, layouts = site
    udir, _ = own
    fake = nonroot.make_tempdir("udtest-site-fake-")
    try:
        shutil.copytree(site_dir, fake / "udocker", symlinks=True)
        res = nonroot.run(RUN + [str(layouts["shared"]), "cat", "/etc/site-marker"],
                          env={"DATALAD_UDOCKER_DIR": str(udir),
                               "DATALAD_UDOCKER_SITE__DIR": str(fake / "udocker")},
                          check=False)
        assert (res.returncode, res.stdout) == (0, "from the image\n"), res.stderr
        assert "ignoring datalad.udocker.site-dir" in res.stderr
        assert len(own_containers(udir)) == 2
    finally:
        shutil.rmtree(fake, ignore_errors=True)


def test_r1_uses_own_cache(nonroot, site, own):
    """R1 writes runc's spec into the container directory: it never uses
    the site's containers (the site has one for R1 too)."""
    site_dir, layouts = site
    udir, _ = own
    before = listing(site_dir.parent)
    res = nonroot.run(RUN[:-1] + ["R1", str(layouts["shared"]), "cat", "/etc/site-marker"],
                      env={"DATALAD_UDOCKER_DIR": str(udir)}, check=False)
    assert (res.returncode, res.stdout) == (0, "from the image\n"), res.stderr
    assert len(own_containers(udir)) == 2
    assert listing(site_dir.parent) == before


def test_site_container_writable_by_user_is_ignored(nonroot, site, own):
    """A site container the user could change (its ROOT made world-writable)
    is not used: warned about, and the user's own cache is used."""
    site_dir, layouts = site
    udir, _ = own
    roots = [p / "ROOT" for p in (site_dir / "containers").iterdir()
             if not p.is_symlink() and (p / "ROOT").is_dir()]
    modes = [r.stat().st_mode & 0o7777 for r in roots]
    try:
        for r in roots:
            r.chmod(0o777)
        res = run(nonroot, udir, layouts["shared"], "cat", "/etc/site-marker")
        assert (res.returncode, res.stdout) == (0, "from the image\n"), res.stderr
        assert "ignoring the site cache's" in res.stderr
        assert len(own_containers(udir)) == 2
    finally:
        for r, mode in zip(roots, modes):
            r.chmod(mode)
