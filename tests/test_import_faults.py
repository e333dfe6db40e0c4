"""Bad input, auth and network faults: a clear one-line error and the dataset as it was."""
from __future__ import annotations

import base64
import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import datalad.api as dl

from checks import assert_valid_layout, dataset_state, git, imp

pytestmark = pytest.mark.timeout(300)


def assert_fails_cleanly(ds, ref, expect, status="error", **kw):
    before = dataset_state(ds.path)
    res = imp(ds, ref, **kw)
    assert res["status"] == status, res
    assert expect in res["message"], res["message"]
    assert "\n" not in res["message"]
    assert dataset_state(ds.path) == before
    return res


def docker_config(tmp_path, monkeypatch, host, user, password):
    d = tmp_path / "docker-config"
    d.mkdir(parents=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))


def assert_no_secret(ds, secret):
    """Not in any file of the worktree or .git (objects are compressed: check git's view too)."""
    for p in Path(ds.path).rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert secret.encode() not in p.read_bytes(), p
    log = git(ds.path, "log", "-p", "--all")
    assert secret not in log


# --- bad input ---------------------------------------------------------------

@pytest.mark.parametrize("ref,expect", [
    ("test/nope:1", "test/nope not found"),
    ("test/multi:nope", "test/multi has no tag 'nope'; its tags: 1, 2"),
])
def test_unknown_image_or_tag(ds, registry, ref, expect):
    assert_fails_cleanly(ds, f"{registry.host}/{ref}", expect, "impossible")


@pytest.mark.parametrize("ref", ["UPPER/case", "a:b:c:d", "repo@sha256:abc", ""])
def test_invalid_reference(ds, ref):
    assert_fails_cleanly(ds, ref, "invalid", "impossible")


def test_bad_target_paths(ds, registry, tmp_path):
    ref = registry.images["test/single:1"].reference
    assert_fails_cleanly(ds, ref, "outside the dataset", path=str(tmp_path / "elsewhere"))
    assert_fails_cleanly(ds, ref, "inside the dataset", path=ds.path)


def test_dataset_without_annex(tmp_path, registry):
    plain = dl.create(tmp_path / "plain", annex=False, result_renderer="disabled")
    assert_fails_cleanly(plain, registry.images["test/single:1"].reference, "no git-annex")


def test_no_matching_platform_lists_platforms(ds, registry):
    res = assert_fails_cleanly(ds, registry.images["test/multiarch:1"].reference,
                               "linux/amd64, linux/arm64, linux/arm/v7",
                               "impossible", platform="linux/s390x")
    assert "--platform" in res["message"]


def _push_raw(registry, name, tag, layer_media_type, layer_bytes):
    """Push an image byte for byte through the registry API (plain registry)."""
    base = registry.url + f"/v2/{name}"

    def blob(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        loc = requests.post(base + "/blobs/uploads/").headers["Location"]
        if loc.startswith("/"):
            loc = registry.url + loc
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{loc}{sep}digest={digest}", data=data,
                         headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        return {"digest": digest, "size": len(data)}
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(blob(config), mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": [dict(blob(layer_bytes), mediaType=layer_media_type)]}
    r = requests.put(f"{base}/manifests/{tag}", data=json.dumps(manifest),
                     headers={"Content-Type": manifest["mediaType"]})
    r.raise_for_status()
    return f"{registry.host}/{name}:{tag}"


def test_unsupported_layer_media_type(ds, registry):
    ref = _push_raw(registry, "test/weird", "1", "application/vnd.example.squashfs", b"x" * 100)
    assert_fails_cleanly(ds, ref, "unsupported media type")


# --- auth ----------------------------------------------------------------------

def test_basic_auth(ds, basic_registry, tmp_path, monkeypatch):
    pushed = basic_registry.images["test/single:1"]
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    assert_fails_cleanly(ds, pushed.reference, "docker login")
    docker_config(tmp_path, monkeypatch, basic_registry.host, basic_registry.username, "wrong")
    assert_fails_cleanly(ds, pushed.reference, "docker login")
    monkeypatch.undo()
    docker_config(tmp_path / "good", monkeypatch, basic_registry.host,
                  basic_registry.username, basic_registry.password)
    res = imp(ds, pushed.reference)
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    assert basic_registry.password not in json.dumps(res)
    assert_no_secret(ds, basic_registry.password)


def test_token_auth_anonymous_and_with_credentials(ds, token_registry, token_issuer, tmp_path,
                                                   monkeypatch):
    pushed = token_registry.images["test/multi:1"]
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    res = imp(ds, pushed.reference)
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    assert token_issuer.requests, "the token issuer was never asked"
    # with credentials, anonymous pulls refused
    token_issuer.anonymous_pull = False
    assert_fails_cleanly(ds, token_registry.images["test/single:1"].reference, "docker login",
                         name="single")
    docker_config(tmp_path, monkeypatch, token_registry.host, token_registry.username,
                  token_registry.password)
    res = imp(ds, token_registry.images["test/single:1"].reference)
    assert res["status"] == "ok", res
    assert_no_secret(ds, token_registry.password)
    # the clone's special remote gets the layers with the same credentials
    clone = dl.clone(ds.path, tmp_path / "clone", result_renderer="disabled")
    subprocess.run(["git", "config", "remote.origin.annex-ignore", "true"], cwd=clone.path,
                   check=True)
    layout = Path(clone.path) / ".datalad/environments/single/image"
    res = clone.get(str(layout), result_renderer="disabled", return_type="list")
    assert {r["status"] for r in res} == {"ok"}
    assert_valid_layout(clone.path, layout)


# --- network faults through a real proxy ------------------------------------------

def proxied(proxy, pushed):
    return f"{proxy.host}/{pushed.name}:{pushed.tag}"


def test_429_and_503_are_retried(ds, registry, fault_proxy):
    pushed = registry.images["test/multi:1"]
    fault_proxy.rate_limit(times=2, retry_after=1)
    fault_proxy.fail_with_status(503, times=2)
    res = imp(ds, proxied(fault_proxy, pushed))
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    statuses = [r.status for r in fault_proxy.requests]
    assert statuses.count(429) == 2 and statuses.count(503) == 2


def test_dropped_connection_resumes_with_range(ds, registry, fault_proxy):
    pushed = registry.images["test/single:1"]
    fault_proxy.drop_after(100_000, times=1, path=pushed.layers[0].digest)
    res = imp(ds, proxied(fault_proxy, pushed))
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    ranges = [r.headers.get("range") for r in fault_proxy.seen(path=pushed.layers[0].digest)]
    assert ranges[0] is None
    resumed_at = [int(r[6:-1]) for r in ranges[1:] if r]
    assert resumed_at and 0 < resumed_at[0] <= 100_000, ranges


def test_corrupt_bytes_never_stored(ds, registry, fault_proxy):
    pushed = registry.images["test/single:1"]
    fault_proxy.corrupt(offset=1000, times=None, path=pushed.layers[0].digest)
    assert_fails_cleanly(ds, proxied(fault_proxy, pushed), "verification")
    key = pushed.layers[0].annex_key
    assert not list((Path(ds.path) / ".git/annex").rglob(key))


def test_registry_gone_mid_transfer(ds, registry, fault_proxy):
    pushed = registry.images["test/single:1"]
    layer = pushed.layers[0].digest
    fault_proxy.drop_after(50_000, times=1, path=layer)
    fault_proxy.fail_with_status(503, times=None, path=layer)
    assert_fails_cleanly(ds, proxied(fault_proxy, pushed), "503")


def test_interrupt_leaves_dataset_untouched(ds, registry, fault_proxy):
    """Ctrl-C (SIGINT) in the middle of an import, from the command line."""
    pushed = registry.images["test/multi:1"]
    fault_proxy.rate_limit(times=None, retry_after=20)
    before = dataset_state(ds.path)
    proc = subprocess.Popen(["datalad", "udocker-import", proxied(fault_proxy, pushed)],
                            cwd=ds.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(r.status == 429 for r in fault_proxy.requests):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=15)
    assert proc.returncode != 0
    assert dataset_state(ds.path) == before
    assert not list((Path(ds.path) / ".git/annex/tmp").glob("datalad-udocker-*"))


def test_cli_error_is_one_line_and_nonzero(ds, registry):
    before = dataset_state(ds.path)
    proc = subprocess.run(["datalad", "udocker-import", f"{registry.host}/test/single:nope"],
                          cwd=ds.path, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = [l for l in proc.stdout.splitlines() if "udocker_import(impossible)" in l]
    assert len(lines) == 1 and "has no tag 'nope'; its tags: 1" in lines[0]
    assert "Traceback" not in proc.stderr
    assert dataset_state(ds.path) == before
