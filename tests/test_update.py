"""Updating images by tag, tracing results to their image, rerunning on a fresh machine.

- ``udocker-import --update NAME`` re-resolves the recorded tag through a real registry (behind
  the fault proxy, which records every request): nothing changed -> ``notneeded``, no commit, no
  layer requested; the tag moved -> the new manifest at the same path and name, only the changed
  layer blob requested from the registry;
- ``--update`` alone updates every image that follows a tag; images imported by digest (pinned)
  stay as they are even when their tag moved, archive imports and foreign containers say why;
  naming such an image is ``impossible``;
- each ``containers-run`` is traceable to its exact manifest: the run record names the image
  path, the run commit's ``index.json`` names the manifest, and the commit that last changed the
  image (the import or update) says ``manifest sha256:...`` in its message;
- a recorded ``containers-run`` is rerun by another user, with another install and an empty
  udocker directory, in a clone of a bare git remote holding no annexed content: the layers come
  from the registry by digest and the outputs are bit for bit the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from checks import assert_valid_layout, dataset_state, git, imp
from fixtures.catalogue import push_standard_as
from fixtures.proxy import BLOB_PATH
from fixtures.users import SYSTEM_PATH
from test_run_records import VENV, last_record, second_install

pytestmark = pytest.mark.timeout(600)


def update(ds, name=None):
    """``ds.udocker_import(name, update=True)`` -> its results (errors not raised)."""
    return ds.udocker_import(name, update=True, result_renderer="disabled",
                             return_type="list", on_failure="ignore")


def blob_gets(proxy):
    """Digests of the blobs the registry was asked for (GET) through ``proxy``."""
    return [r.path.split("?", 1)[0].rsplit("/", 1)[1]
            for r in proxy.seen(path=BLOB_PATH, method="GET")]


def run_manifest(ds_path, commit):
    """The manifest digest the containers-run of ``commit`` used, two ways that must agree:
    ``index.json`` of the image the run record names, as of that commit; and the message of
    the commit that last changed that image (import or update), which names its manifest."""
    msg = git(ds_path, "log", "-1", "--format=%B", commit)
    record = json.loads(msg.split("=== Do not change lines below ===\n", 1)[1]
                        .split("\n^^^", 1)[0])
    image = record["extra_inputs"][0]
    index = json.loads(git(ds_path, "show", f"{commit}:{image}/index.json"))
    digest = index["manifests"][0]["digest"]
    changed = git(ds_path, "log", "-1", "--format=%B", commit, "--", image)
    assert f"manifest {digest}" in changed, changed
    assert record["cmd"].startswith("datalad-udocker-run ") and image in record["cmd"]
    return digest


def run_commits(ds_path):
    """The containers-run commits, oldest first."""
    return git(ds_path, "log", "--reverse", "--format=%H", "--grep=DATALAD RUNCMD").split()


def test_update_by_tag_reuses_layers_and_runs_are_traceable(ds, registry, fault_proxy):
    repo = f"update/tool-{uuid.uuid4().hex[:8]}"
    v1 = push_standard_as(registry, "test/multi:1", repo, "latest")
    ref = f"{fault_proxy.host}/{repo}:latest"
    assert imp(ds, ref, name="tool")["status"] == "ok"
    layout = Path(ds.path) / ".datalad/environments/tool/image"
    ds.containers_run("run-1 > out.txt", container_name="tool", outputs=["out.txt"],
                      result_renderer="disabled")
    assert "version=1 " in (Path(ds.path) / "out.txt").read_text()

    # nothing changed: notneeded, no commit, no layer requested
    head = git(ds.path, "rev-parse", "HEAD")
    fault_proxy.clear()
    res, = update(ds, "tool")
    assert res["status"] == "notneeded", res
    assert res["manifest_digest"] == v1.manifest_digest
    assert "up to date" in res["message"]
    assert git(ds.path, "rev-parse", "HEAD") == head
    assert not set(blob_gets(fault_proxy)) & {l.digest for l in v1.layers}
    assert fault_proxy.seen(path=r"/manifests/latest$"), "the tag was not resolved again"

    # the tag moves to version 2 (first two layers shared): only the third layer is fetched
    v2 = push_standard_as(registry, "test/multi:2", repo, "latest")
    assert v2.layers[:2] == v1.layers[:2] and v2.layers[2] != v1.layers[2]
    # a failed update (the new layer arrives corrupt) changes nothing; running it again works
    before = dataset_state(ds.path)
    fault_proxy.corrupt(times=None, path=v2.layers[2].digest + "$")
    res, = update(ds, "tool")
    assert res["status"] == "error" and v2.layers[2].digest in res["message"], res
    assert dataset_state(ds.path) == before
    fault_proxy.clear()
    res, = update(ds, "tool")
    assert res["status"] == "ok", res
    assert res["path"] == str(layout) and res["container_name"] == "tool"
    assert res["manifest_digest"] == v2.manifest_digest
    assert res["previous_manifest_digest"] == v1.manifest_digest
    assert set(blob_gets(fault_proxy)) == {v2.layers[2].digest, v2.config.digest}
    assert res["layers_downloaded"] == [v2.layers[2].digest]
    assert res["layers_reused"] == [l.digest for l in v2.layers[:2]]
    assert_valid_layout(ds.path, layout)
    ds.config.reload()
    assert ds.config.get("datalad.containers.tool.image") == ".datalad/environments/tool/image"
    assert git(ds.path, "status", "--porcelain") == ""
    # and now it is up to date
    res, = update(ds, "tool")
    assert res["status"] == "notneeded", res

    ds.containers_run("run-2 > out.txt", container_name="tool", outputs=["out.txt"],
                      result_renderer="disabled")
    assert "version=2 " in (Path(ds.path) / "out.txt").read_text()
    # each run is traced to its exact manifest
    first, second = run_commits(ds.path)
    assert run_manifest(ds.path, first) == v1.manifest_digest
    assert run_manifest(ds.path, second) == v2.manifest_digest
    # rerun on top of the first run's parent: the exact image of that record (version 1)
    ds.rerun(revision=first, onto=first + "^", branch="with-v1", result_renderer="disabled")
    assert "version=1 " in (Path(ds.path) / "out.txt").read_text()
    assert run_manifest(ds.path, "HEAD") == v1.manifest_digest


def test_update_all_keeps_pinned_and_archive_images(ds, registry, tmp_path):
    repo = f"update/pin-{uuid.uuid4().hex[:8]}"
    v1 = push_standard_as(registry, "test/multi:1", repo, "stable")
    tag_ref = f"{registry.host}/{repo}:stable"
    assert imp(ds, tag_ref, name="follows")["status"] == "ok"
    assert imp(ds, f"{tag_ref}@{v1.manifest_digest}", name="pinned",
               path=os.path.join(ds.path, "images", "pinned"))["status"] == "ok"
    oci_dir = tmp_path / "oci"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                    f"docker://{registry.host}/test/shared:1", f"oci:{oci_dir}:x"],
                   check=True, capture_output=True)
    assert imp(ds, f"oci:{oci_dir}:x", name="fromdir")["status"] == "ok"
    (Path(ds.path) / "foreign.img").write_text("not an OCI layout\n")
    ds.save(message="foreign image", result_renderer="disabled")
    ds.containers_add("foreign", image="foreign.img", call_fmt="sh {img} {cmd}",
                      result_renderer="disabled")

    # the tag moves: --update alone moves the image that follows it, the pinned one stays
    v2 = push_standard_as(registry, "test/multi:2", repo, "stable")
    res = {r["container_name"]: r for r in update(ds)}
    assert sorted(res) == ["follows", "foreign", "fromdir", "pinned"]
    assert res["follows"]["status"] == "ok" and \
        res["follows"]["manifest_digest"] == v2.manifest_digest
    for name, why in (("pinned", "pinned to digest " + v1.manifest_digest),
                      ("fromdir", "imported from an archive"),
                      ("foreign", "not imported by datalad-udocker")):
        assert res[name]["status"] == "notneeded", res[name]
        assert why in res[name]["message"], res[name]
    index = json.loads((Path(ds.path) / "images/pinned/index.json").read_text())
    assert index["manifests"][0]["digest"] == v1.manifest_digest
    head = git(ds.path, "rev-parse", "HEAD")
    assert all(r["status"] == "notneeded" for r in update(ds))
    assert git(ds.path, "rev-parse", "HEAD") == head

    # naming an image that follows no tag is impossible, with the reason, in one line
    for name, why in (("pinned", "is pinned to digest"), ("fromdir", "from an archive"),
                      ("nosuch", "no container named 'nosuch'")):
        r, = update(ds, name)
        assert r["status"] == "impossible" and why in r["message"], r
    cli = subprocess.run(["datalad", "udocker-import", "--update", "pinned"], cwd=ds.path,
                         capture_output=True, text=True)
    assert cli.returncode != 0
    said = [ln for ln in (cli.stdout + cli.stderr).splitlines() if "pinned to digest" in ln]
    assert len(said) == 1 and "import another reference" in said[0], cli.stdout + cli.stderr
    cli = subprocess.run(["datalad", "udocker-import", "--update", "follows"], cwd=ds.path,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "up to date" in cli.stdout, cli.stdout + cli.stderr
    # --update keeps path, name and platform: other options are refused
    r, = ds.udocker_import("follows", update=True, platform="linux/arm64",
                           result_renderer="disabled", return_type="list",
                           on_failure="ignore")
    assert r["status"] == "impossible" and "--update [NAME] alone" in r["message"], r
    assert git(ds.path, "rev-parse", "HEAD") == head


def sha256s(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the author is root, the "
                    "second user gets the author's install hidden in a mount namespace")
def test_fresh_machine_rerun_from_registry(nonroot, registry, fault_proxy):
    """root records a containers-run and publishes git only; udtest, with another install and
    an empty udocker directory, clones and reruns: layers from the registry, same outputs."""
    base = nonroot.make_tempdir("udtest-fresh-")
    try:
        _fresh_machine_rerun(nonroot, registry, fault_proxy, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fresh_machine_rerun(nonroot, registry, fault_proxy, base):
    author_env = {**os.environ, "DATALAD_UDOCKER_DIR": str(base / "root-udocker"),
                  "PATH": f"{VENV / 'bin'}:{SYSTEM_PATH}"}

    def author(cmd, cwd):
        return subprocess.run(cmd, cwd=cwd, env=author_env, check=True, text=True,
                              capture_output=True)

    pushed = registry.images["test/shared:1"]
    origin = base / "origin"
    author(["datalad", "create", "-c", "text2git", str(origin)], base)
    author(["datalad", "udocker-import", "-n", "shared",
            f"{fault_proxy.host}/test/shared:1"], origin)
    author(["datalad", "containers-run", "-n", "shared", "-o", "out",
            "sh -c 'mkdir -p out; cat /shared/marker.txt > out/marker.txt; "
            "sha256sum /bin/busybox > out/busybox.sha256; "
            "busybox 2>&1 | head -1 > out/version.txt'"], origin)
    record, _ = last_record(lambda c, cwd: author(c, cwd), origin)
    expected = sha256s(origin / "out")
    assert (origin / "out/marker.txt").read_text() == "shared\n"

    # published as to a git hosting site: git and the git-annex branch, no annexed content
    bare = base / "published.git"
    author(["git", "clone", "-q", "--bare", str(origin), str(bare)], base)
    author(["git", "-C", str(bare), "fetch", "-q", str(origin), "git-annex:git-annex"], base)
    author(["git", "-C", str(bare), "remote", "remove", "origin"], base)
    assert not (bare / "annex" / "objects").exists()
    subprocess.run(["chown", "-R", f"{nonroot.uid}:{nonroot.gid}", str(bare)], check=True)

    venv = second_install(nonroot, base)
    udocker_dir = base / "user-udocker"
    env = {"PATH": f"{venv / 'bin'}:{SYSTEM_PATH}", "DATALAD_UDOCKER_DIR": str(udocker_dir)}
    nonroot.run(["datalad", "clone", str(bare), "clone"], cwd=base, env=env)
    clone = base / "clone"
    layers = [p for p in (clone / ".datalad/environments/shared/image/blobs/sha256").iterdir()
              if p.is_symlink()]
    assert len(layers) == 2 and not any(p.exists() for p in layers)
    assert not udocker_dir.exists()
    before = {p.name: p.stat().st_mtime_ns for p in (clone / "out").iterdir()}
    fault_proxy.clear()
    # the author's install is not there for the second user ("another machine")
    hide = f"mount -t tmpfs none {VENV / 'bin'} && exec \"$@\""
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", hide, "sh",
                          *nonroot.command(["datalad", "rerun"])], cwd=clone,
                         env=nonroot.env(env), capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # the layers came from the registry, by digest; the container was created anew
    assert set(blob_gets(fault_proxy)) == {l.digest for l in pushed.layers}
    assert all(p.exists() for p in layers)
    assert any((udocker_dir / "containers").iterdir())
    # the outputs were written again, bit for bit the same
    assert all(p.stat().st_mtime_ns != before[p.name] for p in (clone / "out").iterdir())
    assert sha256s(clone / "out") == expected
    assert nonroot.run(["git", "status", "--porcelain"], cwd=clone, env=env).stdout == ""
    assert nonroot.run(["git", "rev-parse", "HEAD"], cwd=clone, env=env).stdout == \
        author(["git", "rev-parse", "HEAD"], origin).stdout
    assert record["extra_inputs"] == [".datalad/environments/shared/image"]
