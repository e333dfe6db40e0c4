"""Two imports into one dataset at once, and imports killed with SIGKILL: real processes.

Imports into one dataset take turns on a lock; an import killed anywhere leaves nothing that
stops the next one, which undoes the killed one's commit step and resumes its downloads.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from checks import assert_valid_layout, git, imp
from test_import_faults import (git_hook, hold_layer_download, proxied, shim_path,
                                staged_bytes, wait_until_held)

pytestmark = pytest.mark.timeout(300)


def start_import(ds, ref, env=None, **kw):
    return subprocess.Popen(["datalad", "udocker-import", ref], cwd=ds.path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=120):
    """(returncode, stdout, stderr); the process is killed if it outlives ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def kill_hard(proc):
    """SIGKILL the import and everything it started (git, git-annex), like a batch system."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def kill_import_at(mark, what, ds, ref, env=None):
    """Start an import and SIGKILL it (with all it started) once ``mark`` exists; ``what``
    is the failure message if that point is never reached."""
    proc = start_import(ds, ref, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not mark.exists():
            assert time.time() < deadline and proc.poll() is None, what
            time.sleep(0.1)
    finally:
        kill_hard(proc)


def assert_clean(ds_path):
    """Nothing uncommitted, nothing left in staging, fsck clean, every committed key here."""
    assert git(ds_path, "status", "--porcelain", "--untracked-files=all") == ""
    assert not list((Path(ds_path) / ".git/annex/tmp").glob("datalad-udocker-*"))
    assert not (Path(ds_path) / ".git/datalad-udocker/journal.json").exists()
    fsck = subprocess.run(["git", "annex", "fsck", "--quiet"], cwd=ds_path,
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert git(ds_path, "annex", "find", "--not", "--in=here") == ""


def test_two_imports_at_once_share_a_base_layer(ds, registry):
    """Two terminals: test/single:1 and test/shared:1 (same busybox layer) into one dataset.
    A slow pre-commit hook keeps each commit step open long enough for the two to overlap."""
    git_hook(ds.path, "pre-commit", "sleep 5")
    single, shared = registry.images["test/single:1"], registry.images["test/shared:1"]
    procs = [start_import(ds, p.reference) for p in (single, shared)]
    try:
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rc, out, err in results:
        assert rc == 0 and "Traceback" not in err, (out, err)
    assert_clean(ds.path)
    for name in ("single", "shared"):
        assert_valid_layout(ds.path, Path(ds.path) / f".datalad/environments/{name}/image")
    ds.config.reload(force=True)      # changed by the two other processes
    names = {c["name"] for c in ds.containers_list(result_renderer="disabled",
                                                    return_type="list")}
    assert names == {"single", "shared"}


def test_import_leaves_a_live_imports_staging_alone(ds, registry, fault_proxy):
    """While one import is in the middle of the busybox layer, another one of the same layer
    runs to the end: it must not take over or remove the live import's partial download,
    and the first then commits without adding that layer a second time."""
    shared, single = registry.images["test/shared:1"], registry.images["test/single:1"]
    layer = shared.layers[0].digest
    assert layer == single.layers[0].digest
    hold_layer_download(fault_proxy, layer, retry_after=10)
    first = start_import(ds, proxied(fault_proxy, shared))
    try:
        wait_until_held(fault_proxy, ds.path, layer, first, min_bytes=50_000)
        res = imp(ds, single.reference)
        assert res["status"] == "ok", res
        assert staged_bytes(ds.path) >= 50_000, "the live import's partial file is gone"
        fault_proxy.clear()         # the held import resumes at its next retry
    finally:
        rc, out, err = finish(first)
    assert rc == 0 and "Traceback" not in err, (out, err)
    assert_clean(ds.path)
    assert_valid_layout(ds.path, Path(ds.path) / ".datalad/environments/shared/image")


def test_sigkill_mid_layer_then_rerun_resumes(ds, registry, fault_proxy):
    pushed = registry.images["test/single:1"]
    layer = pushed.layers[0].digest
    hold_layer_download(fault_proxy, layer)
    proc = start_import(ds, proxied(fault_proxy, pushed), start_new_session=True)
    try:
        wait_until_held(fault_proxy, ds.path, layer, proc, min_bytes=50_000)
    finally:
        kill_hard(proc)
    assert staged_bytes(ds.path) >= 50_000          # what the killed import left
    fault_proxy.clear()
    res = imp(ds, proxied(fault_proxy, pushed))
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    first = fault_proxy.seen(path=layer, method="GET")[0].headers.get("range")
    assert first and 50_000 <= int(first[6:-1]) <= 100_000, first   # resumed, not restarted
    assert_clean(ds.path)


@pytest.mark.parametrize("where", ["registerurl", "setpresentkey"])
def test_sigkill_in_commit_step_then_rerun_succeeds(ds, registry, tmp_path, where):
    """Killed while registering URLs (beside ``fromkey`` putting the layout in place), or
    while recording which remotes have the layers: then layer keys are set, symlinks
    staged, JSON written, URLs registered."""
    pushed = registry.images["test/multi:1"]
    mark = tmp_path / f"in-{where}"
    env = dict(os.environ, PATH=shim_path(tmp_path, "git-annex", f'[ "$1" = {where} ]',
                                          f"touch {mark}; exec sleep 300"))
    kill_import_at(mark, f"never reached {where}", ds, pushed.reference, env=env)
    if where == "setpresentkey":
        # the state of issue 6: staged layer symlinks the next import used to refuse
        assert "blobs/sha256" in git(ds.path, "status", "--porcelain")
    res = imp(ds, pushed.reference)
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    assert_clean(ds.path)


def test_sigkill_after_the_commit_keeps_the_import(ds, registry, tmp_path):
    """Killed after its commit was made (in a post-commit hook), before it forgot its journal:
    the next import must keep that commit, not roll it back."""
    pushed = registry.images["test/single:1"]
    mark = tmp_path / "committed"
    git_hook(ds.path, "post-commit", f"touch {mark}; exec sleep 300")
    kill_import_at(mark, "never committed", ds, pushed.reference)
    (Path(ds.path) / ".git/hooks/post-commit").unlink()
    head = git(ds.path, "rev-parse", "HEAD")
    assert (Path(ds.path) / ".git/datalad-udocker/journal.json").exists()
    res = imp(ds, pushed.reference)
    assert res["status"] == "notneeded", res
    assert git(ds.path, "rev-parse", "HEAD") == head
    assert_valid_layout(ds.path, res["path"])
    assert_clean(ds.path)


@pytest.mark.parametrize("user_staged", [True, False])
def test_sigkill_during_git_commit_then_rerun_succeeds(ds, registry, tmp_path, user_staged):
    """Killed, git included, while `git commit` runs its pre-commit hook: the next import must
    still complete on its own.  With a change of the user's staged, the import commits only its
    paths (``git commit -- PATHS``) and the killed git leaves its index.lock behind."""
    pushed = registry.images["test/single:1"]
    if user_staged:
        (Path(ds.path) / "notes.txt").write_text("mine\n")
        git(ds.path, "add", "notes.txt")
    mark = tmp_path / "committing"
    git_hook(ds.path, "pre-commit", f"touch {mark}; exec sleep 300")
    kill_import_at(mark, "never committed", ds, pushed.reference)
    (Path(ds.path) / ".git/hooks/pre-commit").unlink()
    if user_staged:
        assert (Path(ds.path) / ".git/index.lock").exists()     # what the killed git left
    res = imp(ds, pushed.reference)
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    if user_staged:
        assert git(ds.path, "status", "--porcelain") == "A  notes.txt\n"
        git(ds.path, "rm", "-q", "--cached", "notes.txt")
        (Path(ds.path) / "notes.txt").unlink()
    assert_clean(ds.path)
    assert not list((Path(ds.path) / ".git").glob("*index*.lock"))
