"""How an import puts layers into the annex and commits, and how a clone gets them.

The import moves verified layers into ``.git/annex/objects`` itself and commits with
``git commit -- PATHS``; a clone's ``git annex get`` takes what our special remote verified
without hashing it again.  These tests check that the result is what git-annex itself would
have made, and that nothing unverified gets in.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import datalad.api as dl

from checks import assert_valid_layout, git, imp
from test_import_faults import proxied

pytestmark = pytest.mark.timeout(300)


def annex(path, *args, check=True):
    return subprocess.run(["git", "annex", *args], cwd=path, text=True, check=check,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def object_path(ds_path, key):
    rel = annex(ds_path, "examinekey", "--format=${objectpath}", key).stdout.strip()
    return Path(ds_path) / rel


def test_layers_are_annexed_as_git_annex_would(ds, registry):
    """Content frozen like git-annex freezes it, recorded here and in the registry remote,
    passing a full ``git annex fsck``; droppable and gettable again by git-annex."""
    pushed = registry.images["test/multi:1"]
    res = imp(ds, pushed.reference)
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    uuid = git(ds.path, "config", "annex.uuid").strip()
    for layer in pushed.layers:
        obj = object_path(ds.path, layer.annex_key)
        assert obj.is_file()
        for p in (obj, obj.parent):
            assert not stat.S_IMODE(p.stat().st_mode) & 0o222, f"{p} is writable"
        where = annex(ds.path, "whereis", "--fast", "--key", layer.annex_key).stdout
        assert uuid in where and "udocker-registry" in where, where
    fsck = annex(ds.path, "fsck", "--", res["path"], check=False)
    assert fsck.returncode == 0 and "failed" not in fsck.stdout, fsck.stdout
    annex(ds.path, "drop", "--force", "--", res["path"])
    assert not any(object_path(ds.path, l.annex_key).exists() for l in pushed.layers)
    annex(ds.path, "get", "--", res["path"])
    assert_valid_layout(ds.path, res["path"])


def test_commit_holds_the_import_only(ds, registry):
    """A change the user staged before the import stays staged, out of the import's commit."""
    mine = Path(ds.path) / "notes.txt"
    mine.write_text("mine\n")
    git(ds.path, "add", "notes.txt")
    res = imp(ds, registry.images["test/single:1"].reference)
    assert res["status"] == "ok", res
    committed = git(ds.path, "show", "--name-only", "--format=", "HEAD").split()
    assert "notes.txt" not in committed
    assert ".datalad/config" in committed
    assert any(p.startswith(".datalad/environments/single/image/") for p in committed)
    assert git(ds.path, "status", "--porcelain").splitlines() == ["A  notes.txt"]


def test_shared_repository_lets_git_annex_place_content(ds, registry):
    """With core.sharedRepository git-annex sets the modes: the import hands it the files."""
    git(ds.path, "config", "core.sharedRepository", "group")
    pushed = registry.images["test/single:1"]
    old = os.umask(0o077)          # downloads are then private to the user
    try:
        res = imp(ds, pushed.reference)
    finally:
        os.umask(old)
    assert res["status"] == "ok", res
    obj = object_path(ds.path, pushed.layers[0].annex_key)
    assert stat.S_IMODE(obj.stat().st_mode) & 0o040, "git-annex makes it group-readable"
    fsck = annex(ds.path, "fsck", "--", res["path"], check=False)
    assert fsck.returncode == 0, fsck.stdout


def test_clone_takes_the_remotes_verification(ds, registry, fault_proxy, tmp_path):
    """A clone enables the registry remote with git-annex's second hashing off for it only;
    corrupt bytes from the registry are still refused (by the remote) and never stored."""
    pushed = registry.images["test/single:1"]
    res = imp(ds, proxied(fault_proxy, pushed))
    assert res["status"] == "ok", res
    clone = dl.clone(ds.path, tmp_path / "clone", result_renderer="disabled")
    git(clone.path, "config", "remote.origin.annex-ignore", "true")
    cfg = git(clone.path, "config", "--get-regexp", r"^remote\.")
    assert "remote.udocker-registry.annex-verify false" in cfg
    assert "remote.udocker-registry.annex-security-allow-unverified-downloads ACKTHPPT" in cfg
    assert "remote.origin.annex-verify" not in cfg     # other remotes: verified as ever
    layout = Path(clone.path) / ".datalad/environments/single/image"
    key = pushed.layers[0].annex_key
    fault_proxy.corrupt(offset=1000, times=None, path=pushed.layers[0].digest)
    got = annex(clone.path, "get", "--", str(layout), check=False)
    assert got.returncode != 0 and "verification" in got.stdout, got.stdout
    assert not object_path(clone.path, key).exists()
    for where in ("objects", "tmp"):            # no content, not even a partial file
        assert not list((Path(clone.path) / ".git/annex" / where).rglob(key + "*"))
    fault_proxy.clear()
    got = annex(clone.path, "get", "--", str(layout), check=False)
    assert got.returncode == 0, got.stdout
    assert "checksum" not in got.stdout, "git-annex hashed the layer a second time"
    assert_valid_layout(clone.path, layout)


def test_annex_objects_on_another_filesystem(ds, registry, tmp_path):
    """``.git/annex/objects`` a symlink to another filesystem (/dev/shm, tmpfs): the layers
    cannot be renamed there, git-annex copies them in."""
    shm = Path("/dev/shm")
    assert os.stat(shm).st_dev != os.stat(ds.path).st_dev, "needs /dev/shm on another fs"
    objects = Path(ds.path) / ".git/annex/objects"
    elsewhere = Path(tempfile.mkdtemp(prefix="udocker-objects-", dir=shm))
    try:
        if objects.exists():
            objects.rmdir()
        objects.symlink_to(elsewhere)
        pushed = registry.images["test/multi:1"]
        res = imp(ds, pushed.reference)
        assert res["status"] == "ok", res
        assert_valid_layout(ds.path, res["path"])
        fsck = annex(ds.path, "fsck", "--", res["path"], check=False)
        assert fsck.returncode == 0 and "failed" not in fsck.stdout, fsck.stdout
        assert not list((Path(ds.path) / ".git/annex/tmp").glob("datalad-udocker-*"))
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(elsewhere)])
        shutil.rmtree(elsewhere, ignore_errors=True)
