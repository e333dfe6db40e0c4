"""git-annex-remote-udocker in a session: one registry client (one token) per registry, and
fast failure when the registry is gone so that ``datalad get`` takes the layers from another
git-annex remote (a directory special remote, a RIA store, a clone that has them)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datalad.api as dl
import pytest
import requests

from datalad_udocker.digest import digest_from_key

from checks import assert_valid_layout, git, imp

pytestmark = pytest.mark.timeout(300)

LAYOUT = ".datalad/environments/multi/image"
#: generous bound for a ``datalad get`` whose registry is gone: the fast path takes seconds; the
#: transport's full retry budget (per layer) would take minutes
GET_BOUND = 60.0


def publish_git_only(ds, bare: Path) -> Path:
    """Push ``ds``'s git history and git-annex branch (no content) to a new bare repository, as
    a git hosting site would hold it."""
    subprocess.run(["git", "clone", "-q", "--bare", ds.path, str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "fetch", "-q", ds.path, "git-annex:git-annex"],
                   check=True)
    subprocess.run(["git", "-C", str(bare), "remote", "remove", "origin"], check=True)
    return bare


def annexed_keys(path) -> list:
    out = git(path, "annex", "find", "--include=*", "--format=${key}\\n", LAYOUT)
    return out.split()


def timed_get(clone):
    """``datalad get`` of the image in ``clone``, killed after GET_BOUND seconds:
    (result records, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(["datalad", "-f", "json", "get", LAYOUT], cwd=clone.path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=GET_BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)      # datalad, git-annex and the remote
        proc.communicate()
        raise AssertionError(f"datalad get did not finish within {GET_BOUND} s") from None
    res = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return res, time.monotonic() - start


def registry_then(clone, other: str) -> None:
    """Make git-annex try the registry remote first, then ``other``, and no other remote.

    (Each failed layer then costs git-annex's own retry delays, 1 + 2 s with the
    ``annex.retry=3`` that ``datalad get`` passes: the default cost avoids that.)"""
    for remote in git(clone.path, "remote").split():
        if remote not in ("udocker-registry", other):
            git(clone.path, "config", f"remote.{remote}.annex-ignore", "true")
    git(clone.path, "config", "remote.udocker-registry.annex-cost", "10")
    git(clone.path, "config", f"remote.{other}.annex-cost", "20")


def assert_got_all(clone, res, seconds, n_layers: int) -> None:
    files = [r for r in res if r.get("type") == "file"]
    assert {r["status"] for r in res} == {"ok"}, res
    assert len(files) == n_layers, res
    assert seconds < GET_BOUND, f"datalad get took {seconds:.1f}s"
    assert_valid_layout(clone.path, Path(clone.path) / LAYOUT)


def blob_requests(reg) -> int:
    """How many blob requests the registry's access log shows."""
    return reg.log.read_text(errors="replace").count("/blobs/sha256:")


def checkpresentkey(path, key) -> tuple:
    """(exit status, output, seconds) of ``git annex checkpresentkey KEY udocker-registry``."""
    start = time.monotonic()
    proc = subprocess.run(["git", "annex", "checkpresentkey", key, "udocker-registry"],
                          cwd=path, capture_output=True, text=True, timeout=GET_BOUND)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


PREPARE = """import json, sys
from datalad_udocker.dataset import special_remote as sr
remote = sr.RegistryBlobRemote(sr.Master())
remote.prepare()
remote.claimurl("http://127.0.0.1:5000/v2/x/blobs/sha256:" + "0" * 64)
print(json.dumps([sorted(remote._insecure),
                  sorted(m for m in sys.modules if m.split(".")[0] in ("datalad", "requests"))]))
"""


def prepared(path, env=None):
    """(insecure registries, DataLad and requests modules loaded) after the remote's
    prepare() and a claimurl in ``path``: starting it loads neither."""
    proc = subprocess.run([sys.executable, "-c", PREPARE], cwd=path, capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def test_prepare_reads_user_settings_only_without_datalad(ds, monkeypatch):
    ds.config.set("datalad.udocker.insecure-registries", "evil.example:5000", scope="branch")
    monkeypatch.delenv("DATALAD_UDOCKER_INSECURE__REGISTRIES", raising=False)
    assert prepared(ds.path) == [[], []]
    ds.config.set("datalad.udocker.insecure-registries", "mine:1, other", scope="local")
    assert prepared(ds.path) == [["mine:1", "other"], []]
    env = dict(os.environ, DATALAD_UDOCKER_INSECURE__REGISTRIES="env:2")
    assert prepared(ds.path, env) == [["env:2"], []]
    env = dict(os.environ, DATALAD_CONFIG_OVERRIDES_JSON=json.dumps(
        {"datalad.udocker.insecure-registries": "override:3"}))
    assert prepared(ds.path, env) == [["override:3"], []]


def test_one_token_exchange_per_registry_per_get(ds, token_registry, token_issuer, tmp_path):
    pushed = token_registry.images["test/multi:1"]
    assert len(pushed.layers) >= 3
    assert imp(ds, pushed.reference)["status"] == "ok"
    for attempt in range(2):           # a second get (after a drop) exchanges one token again
        clone = dl.clone(str(publish_git_only(ds, tmp_path / f"bare{attempt}.git")),
                         tmp_path / f"clone{attempt}", result_renderer="disabled")
        token_issuer.clear()
        res, _ = timed_get(clone)
        assert_got_all(clone, res, 0, len(pushed.layers))
        assert all("udocker-registry" in r["message"] for r in res if r["type"] == "file")
        requests_seen = [(r.scopes, r.status) for r in token_issuer.requests]
        assert requests_seen == [(["repository:test/multi:pull"], 200)], requests_seen


def test_layers_come_from_other_remotes_when_the_registry_is_gone(ds, make_registry,
                                                                   tmp_path):
    reg = make_registry("plain", images=["test/multi:1"])
    pushed = reg.images["test/multi:1"]
    n = len(pushed.layers)
    assert imp(ds, pushed.reference)["status"] == "ok"
    keys = annexed_keys(ds.path)
    assert len(keys) == n

    # the layers also go to a directory special remote and a RIA store
    (tmp_path / "layers-dir").mkdir()
    git(ds.path, "annex", "initremote", "layers-dir", "type=directory",
        f"directory={tmp_path / 'layers-dir'}", "encryption=none")
    git(ds.path, "annex", "copy", "--to", "layers-dir", LAYOUT)
    ria_url = f"ria+file://{tmp_path / 'ria'}"
    ds.create_sibling_ria(ria_url, "ria", new_store_ok=True, result_renderer="disabled")
    ds.push(to="ria", result_renderer="disabled")
    bare = publish_git_only(ds, tmp_path / "bare.git")

    # a plain clone that will have the content; while both exist, whereis names the registry
    # and the other remotes
    holder = dl.clone(str(bare), tmp_path / "holder", result_renderer="disabled")
    for key in keys:
        info = json.loads(git(holder.path, "annex", "whereis", "--json", "--key", key))
        where = {r["description"].strip("[]") for r in info["whereis"]}
        assert {"udocker-registry", "layers-dir", "ria-storage"} <= where, where
        urls = [u for r in info["whereis"] for u in r.get("urls", [])]
        assert pushed.blob_url(digest_from_key(key)[0]) in urls, urls
    # by default git-annex gets the layers from the RIA store, not from the registry, even
    # while the registry is there and even at a cost above git-annex's "expensive" 200 (ssh,
    # http, S3 remotes)
    git(holder.path, "config", "remote.ria-storage.annex-cost", "225")
    served = blob_requests(reg)
    res, _ = timed_get(holder)
    assert_got_all(holder, res, 0, n)
    assert blob_requests(reg) == served, reg.log_tail()

    # 1. the registry lost the image: 404, reported as "not present" at once
    repo_dir = reg.workdir / "storage/docker/registry/v2/repositories/test/multi"
    assert repo_dir.is_dir()
    shutil.rmtree(repo_dir)
    assert requests.head(pushed.blob_url(pushed.layers[0].digest), timeout=10).status_code == 404
    clone = dl.clone(str(bare), tmp_path / "after-delete", result_renderer="disabled")
    git(clone.path, "annex", "enableremote", "layers-dir", f"directory={tmp_path / 'layers-dir'}")
    status, out, seconds = checkpresentkey(clone.path, keys[0])
    assert status == 1 and seconds < GET_BOUND, (status, out, seconds)
    registry_then(clone, "layers-dir")
    res, seconds = timed_get(clone)
    assert_got_all(clone, res, seconds, n)

    # 2. the registry is stopped (connection refused): an error, quickly, then the next source
    reg.stop()
    clone = dl.clone(f"{ria_url}#{ds.id}", tmp_path / "from-ria", result_renderer="disabled")
    status, out, seconds = checkpresentkey(clone.path, keys[0])
    assert status not in (0, 1) and "cannot reach" in out, (status, out)
    assert seconds < GET_BOUND, seconds
    # one git-annex process asks once, then reports the registry unreachable at once
    fsck = subprocess.run(["git", "annex", "fsck", "--fast", "--from", "udocker-registry",
                           "--json", "--json-error-messages", LAYOUT],
                          cwd=clone.path, capture_output=True, text=True, timeout=GET_BOUND)
    errors = [json.loads(line)["note"] for line in fsck.stdout.splitlines()]
    assert len(errors) == n and all("cannot reach" in e for e in errors), errors
    assert all("not asked again" in e for e in errors[1:]), errors
    storage = next(r for r in git(clone.path, "remote").split() if r.endswith("-storage"))
    registry_then(clone, storage)
    res, seconds = timed_get(clone)
    assert_got_all(clone, res, seconds, n)

    # default costs: the clone that has the layers is asked first, the stopped registry never
    clone = dl.clone(holder.path, tmp_path / "from-holder", result_renderer="disabled")
    res, seconds = timed_get(clone)
    assert_got_all(clone, res, seconds, n)


def test_large_layer_comes_in_ranges_and_is_verified(ds, registry, fault_proxy, tmp_path):
    """A plain ``datalad get`` fetches a layer of two ranges or more (>= 32 MiB) as parallel
    byte ranges; a corrupted byte fails the layer, whichever range it is in (nothing is kept),
    and the next get takes it whole."""
    from fixtures import images as im
    layer = im.make_layer({"data/big.bin": os.urandom(33 << 20)}, compression="none")
    im.build_image(tmp_path / "layout", "src", [layer], cmd=["/bin/sh"])
    digest = registry.push(tmp_path / "layout", "src", "test/large", "1").layers[0].digest
    res = imp(ds, f"{fault_proxy.host}/test/large:1", name="large")
    assert res["status"] == "ok", res
    large = ".datalad/environments/large/image"
    clone = dl.clone(str(publish_git_only(ds, tmp_path / "bare.git")), tmp_path / "clone",
                     result_renderer="disabled")
    fault_proxy.clear()
    fault_proxy.corrupt(offset=12345, times=None, path=digest)
    proc = subprocess.run(["datalad", "get", large], cwd=clone.path, capture_output=True,
                          text=True, timeout=GET_BOUND)
    assert proc.returncode != 0
    assert "failed verification" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert git(clone.path, "annex", "find", "--in", "here", large) == ""
    gets = fault_proxy.seen(method="GET", path=digest)
    assert len(gets) >= 2 and all(r.headers.get("range", "").startswith("bytes=")
                                  for r in gets), [r.headers for r in gets]
    assert {r.status for r in gets} == {206}
    fault_proxy.clear()
    res = clone.get(large, result_renderer="disabled", return_type="list")
    assert {r["status"] for r in res} == {"ok"}, res
    assert_valid_layout(clone.path, Path(clone.path) / large)
