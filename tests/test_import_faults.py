"""Bad input, auth and network faults: a clear one-line error and the dataset as it was."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
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


@pytest.mark.parametrize("ref", ["UPPER/case", "a:b:c:d", "repo@sha256:abc"])
def test_invalid_reference(ds, ref):
    assert_fails_cleanly(ds, ref, "invalid", "impossible")


def test_empty_reference(ds):
    assert_fails_cleanly(ds, "", "give an image reference to import", "impossible")


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


def staged_bytes(ds_path) -> int:
    """Bytes of layer files in import staging dirs under .git/annex/tmp."""
    return sum(p.stat().st_size
               for p in (Path(ds_path) / ".git/annex/tmp").glob("datalad-udocker-*/*")
               if p.is_file() and p.name != "owner")


def hold_layer_download(fault_proxy, layer, after_bytes=100_000, retry_after=30):
    """The layer's first GET is cut after ``after_bytes``; every resume attempt then gets
    429 with ``Retry-After``, so the import waits with a partial file in staging."""
    fault_proxy.drop_after(after_bytes, times=1, path=layer)
    fault_proxy.rate_limit(times=None, retry_after=retry_after, path=layer)


def wait_until_held(fault_proxy, ds_path, layer, proc, min_bytes=1):
    """Until the held layer got its 429 and staging has bytes (the import is mid-layer)."""
    deadline = time.time() + 60
    while not (any(r.status == 429 for r in fault_proxy.seen(path=layer))
               and staged_bytes(ds_path) >= min_bytes):
        assert time.time() < deadline and proc.poll() is None, "import never got mid-layer"
        time.sleep(0.1)


def process_report(pid) -> str:
    """Command line, state, signal masks and wait channel of ``pid`` and its descendants."""
    out = []
    for p in [pid] + [int(c) for c in subprocess.run(
            ["pgrep", "-d", " ", "-P", str(pid)], capture_output=True,
            text=True).stdout.split()]:
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            wchan = Path(f"/proc/{p}/wchan").read_text()
        except OSError:
            continue
        keep = [ln for ln in status if ln.split(":")[0] in
                ("State", "SigBlk", "SigIgn", "SigCgt", "Threads")]
        out.append(f"{p} {cmd[:200]} wchan={wchan} " + " ".join(keep))
    return "\n".join(out)


def test_interrupt_leaves_dataset_untouched(ds, registry, fault_proxy):
    """Ctrl-C (SIGINT) in the middle of a layer download, from the command line."""
    pushed = registry.images["test/single:1"]
    layer = pushed.layers[0].digest
    hold_layer_download(fault_proxy, layer)
    before = dataset_state(ds.path)
    # as typed in a terminal: SIGINT not ignored (a test run started in the background by a
    # non-interactive shell ignores it, and so would the import, rightly)
    proc = subprocess.Popen(["datalad", "udocker-import", proxied(fault_proxy, pushed)],
                            cwd=ds.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until_held(fault_proxy, ds.path, layer, proc, min_bytes=50_000)
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the import did not end 15 s after Ctrl-C; its processes:\n" +
                        process_report(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert dataset_state(ds.path) == before


def test_cli_error_is_one_line_and_nonzero(ds, registry):
    before = dataset_state(ds.path)
    proc = subprocess.run(["datalad", "udocker-import", f"{registry.host}/test/single:nope"],
                          cwd=ds.path, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = [l for l in proc.stdout.splitlines() if "udocker_import(impossible)" in l]
    assert len(lines) == 1 and "has no tag 'nope'; its tags: 1" in lines[0]
    assert "Traceback" not in proc.stderr
    assert dataset_state(ds.path) == before


# --- failures inside the commit step, after it has written something ---------------

def shim_path(tmp_path, program, condition, action) -> str:
    """A PATH with a ``program`` wrapper first: it runs ``action`` when the shell ``condition``
    holds for its arguments, else execs the real program."""
    real = shutil.which(program)
    assert real, f"{program} not installed"
    d = tmp_path / "shim"
    d.mkdir(exist_ok=True)
    script = d / program
    script.write_text(f'#!/bin/sh\nif {condition}; then {action}; fi\nexec {real} "$@"\n')
    script.chmod(0o755)
    return f"{d}{os.pathsep}{os.environ['PATH']}"


def shim(tmp_path, monkeypatch, program, condition, action):
    """``shim_path`` for this test's process."""
    monkeypatch.setenv("PATH", shim_path(tmp_path, program, condition, action))


def git_hook(ds_path, name, body):
    hook = Path(ds_path) / ".git" / "hooks" / name
    hook.parent.mkdir(exist_ok=True)
    hook.write_text("#!/bin/sh\n" + body + "\n")
    hook.chmod(0o755)


FAIL = 'echo "injected failure" >&2; exit 1'


@pytest.mark.parametrize("where,expect", [
    ("registerurl", "git annex registerurl failed"),
    ("setpresentkey", "git annex setpresentkey failed"),
    ("git add", "git add failed"),
    ("commit", "git commit failed"),
])
def test_failure_inside_commit_step_rolls_back(ds, registry, tmp_path, monkeypatch, where,
                                               expect):
    """The new image's base layer is in the annex already but no file of HEAD points to it
    any more (an image that was removed): the rollback must drop only the layer it added,
    and put back index, worktree, .datalad/config and .git/annex/tmp."""
    res = imp(ds, registry.images["test/single:1"].reference, path=str(Path(ds.path) / "old"))
    assert res["status"] == "ok", res
    git(ds.path, "rm", "-rq", "old")
    git(ds.path, "commit", "-qm", "remove the old image")
    shared = registry.images["test/shared:1"]
    if where in ("registerurl", "setpresentkey"):     # after setkey/fromkey wrote
        shim(tmp_path, monkeypatch, "git-annex", f'[ "$1" = {where} ]', FAIL)
    elif where == "git add":                          # after the annex calls wrote
        shim(tmp_path, monkeypatch, "git", '[ "$1" = add ] && [ "$2" = -- ]', FAIL)
    else:                                             # after git add and config changes
        git_hook(ds.path, "pre-commit", FAIL)
    state = dataset_state(ds.path)
    assert_fails_cleanly(ds, shared.reference, expect, name="shared")
    assert shared.layers[0].annex_key in state["objects"]      # still there: shared layer
    assert shared.layers[1].annex_key not in state["objects"]
    # and the rollback leaves nothing that stops the next import
    monkeypatch.undo()
    (Path(ds.path) / ".git/hooks/pre-commit").unlink(missing_ok=True)
    res = imp(ds, shared.reference, name="shared")
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    assert res["layers_reused"] == [shared.layers[0].digest]


def test_failed_update_of_an_image_rolls_back(ds, registry, tmp_path, monkeypatch):
    """A newer tag into the same path fails in the commit step: the committed older image is
    left exactly as it was (its layout restored from HEAD, none of its keys dropped)."""
    res = imp(ds, registry.images["test/multi:1"].reference)
    assert res["status"] == "ok", res
    shim(tmp_path, monkeypatch, "git-annex", '[ "$1" = registerurl ]', FAIL)
    assert_fails_cleanly(ds, registry.images["test/multi:2"].reference,
                         "git annex registerurl failed")
    assert_valid_layout(ds.path, res["path"])


def test_rollback_keeps_a_layer_that_head_refers_to(ds, registry, tmp_path, monkeypatch):
    """In a clone without layer content, a failed import that fetched a layer HEAD refers to
    (through another image) keeps it: a rollback never drops what a commit points to."""
    res = imp(ds, registry.images["test/single:1"].reference)
    assert res["status"] == "ok", res
    clone = dl.clone(ds.path, tmp_path / "clone", result_renderer="disabled")
    shared = registry.images["test/shared:1"]
    base = shared.layers[0].annex_key
    assert base not in dataset_state(clone.path)["objects"]
    shim(tmp_path, monkeypatch, "git-annex", '[ "$1" = registerurl ]', FAIL)
    res = imp(clone, shared.reference, name="shared")
    assert res["status"] == "error" and "registerurl" in res["message"], res
    state = dataset_state(clone.path)
    assert base in state["objects"] and shared.layers[1].annex_key not in state["objects"]
    assert state["status"] == "" and state["annex_tmp"] == []
