"""udocker-import from a real registry into a real dataset, and back in a clone."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import datalad.api as dl

from checks import assert_valid_layout, git, imp

pytestmark = pytest.mark.timeout(300)


def keys_of(pushed):
    return [layer.annex_key for layer in pushed.layers]


def test_import_multi_layer(ds, registry):
    pushed = registry.images["test/multi:1"]
    res = imp(ds, pushed.reference)
    assert res["status"] == "ok", res
    layout = Path(ds.path) / ".datalad/environments/multi/image"
    assert res["path"] == str(layout)
    assert res["container_name"] == "multi"
    assert res["manifest_digest"] == pushed.manifest_digest
    manifest, config = assert_valid_layout(ds.path, layout)
    assert [l["digest"] for l in manifest["layers"]] == [l.digest for l in pushed.layers]
    # every layer key equals its registry digest, with the blob URL registered
    for layer in pushed.layers:
        out = git(ds.path, "annex", "whereis", "--json", "--key", layer.annex_key)
        info = json.loads(out)
        urls = [u for r in info["whereis"] for u in r.get("urls", [])]
        assert pushed.blob_url(layer.digest) in urls
        assert any(r["description"] == "[udocker-registry]" for r in info["whereis"])
    ann = json.loads((layout / "index.json").read_text())["manifests"][0]["annotations"]
    assert ann["org.datalad.udocker.repository"] == "test/multi"
    assert ann["org.datalad.udocker.tag"] == "1"
    assert ann["org.datalad.udocker.registry"] == registry.host
    # registered with datalad-container, in the same commit, nothing left unsaved
    assert ds.config.get("datalad.containers.multi.image") == ".datalad/environments/multi/image"
    assert ds.config.get("datalad.containers.multi.cmdexec").startswith("datalad-udocker-run ")
    changed = git(ds.path, "show", "--name-only", "--format=", "HEAD").split()
    assert ".datalad/config" in changed and any("index.json" in c for c in changed)
    assert ds.repo.status() == {} or all(
        v["state"] == "clean" for v in ds.repo.status().values())
    containers = ds.containers_list(result_renderer="disabled", return_type="list")
    assert [c["name"] for c in containers] == ["multi"]


@pytest.mark.parametrize("ref", ["test/docker:1", "test/zstd:1", "test/plain:1"])
def test_import_media_types(ds, registry, ref):
    pushed = registry.images[ref]
    res = imp(ds, pushed.reference, name="img")
    assert res["status"] == "ok", res
    manifest, _ = assert_valid_layout(ds.path, res["path"])
    assert [l["mediaType"] for l in manifest["layers"]] == [l.media_type for l in pushed.layers]
    assert res["layers_downloaded"] == [l.digest for l in pushed.layers]


def test_import_multiplatform(ds, registry):
    pushed = registry.images["test/multiarch:1"]
    res = imp(ds, pushed.reference)           # default: this host's platform
    assert res["status"] == "ok", res
    host = "linux/amd64" if os.uname().machine == "x86_64" else "linux/arm64"
    assert res["manifest_digest"] == pushed.platforms[host].manifest_digest
    res = imp(ds, pushed.reference, platform="linux/arm/v7", name="ma-arm",
              path=os.path.join(ds.path, "images", "ma-arm"))
    assert res["status"] == "ok", res
    child = pushed.platforms["linux/arm/v7"]
    manifest, _ = assert_valid_layout(ds.path, Path(ds.path) / "images/ma-arm")
    assert [l["digest"] for l in manifest["layers"]] == [l.digest for l in child.layers]
    ann = json.loads((Path(ds.path) / "images/ma-arm/index.json").read_text())
    ann = ann["manifests"][0]["annotations"]
    assert ann["org.datalad.udocker.platform"] == "linux/arm/v7"
    assert ann["org.datalad.udocker.source-digest"] == pushed.manifest_digest


def test_reimport_is_noop_and_update_reuses_layers(ds, registry):
    v1, v2 = registry.images["test/multi:1"], registry.images["test/multi:2"]
    assert imp(ds, v1.reference)["status"] == "ok"
    head = git(ds.path, "rev-parse", "HEAD")
    again = imp(ds, v1.reference)
    assert again["status"] == "notneeded"
    assert git(ds.path, "rev-parse", "HEAD") == head
    res = imp(ds, v2.reference)
    assert res["status"] == "ok", res
    assert res["layers_reused"] == [l.digest for l in v2.layers[:2]]
    assert res["layers_downloaded"] == [v2.layers[2].digest]
    layout = Path(ds.path) / ".datalad/environments/multi/image"
    assert_valid_layout(ds.path, layout)
    hexes = {p.name for p in (layout / "blobs/sha256").iterdir()}
    assert v1.layers[2].digest.split(":")[1] not in hexes     # stale layer gone
    assert v1.manifest_digest.split(":")[1] not in hexes


def test_shared_layers_stored_once(ds, registry):
    single, shared = registry.images["test/single:1"], registry.images["test/shared:1"]
    assert imp(ds, single.reference)["status"] == "ok"
    res = imp(ds, shared.reference)
    assert res["status"] == "ok"
    assert single.layers[0].digest in res["layers_reused"]
    objects = [p for p in (Path(ds.path) / ".git/annex/objects").rglob(single.layers[0].annex_key)
               if p.is_file()]
    assert len(objects) == 1


def test_clone_gets_layers_from_registry(ds, registry, tmp_path):
    pushed = registry.images["test/multi:1"]
    assert imp(ds, pushed.reference)["status"] == "ok"
    # publish git only (no annex content), as `datalad push` to a git host would
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", ds.path, str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "fetch", "-q", ds.path, "git-annex:git-annex"],
                   check=True)
    subprocess.run(["git", "-C", str(bare), "remote", "remove", "origin"], check=True)
    clone = dl.clone(str(bare), tmp_path / "clone", result_renderer="disabled")
    assert "udocker-registry" in git(clone.path, "remote").split()   # autoenabled
    layout = Path(clone.path) / ".datalad/environments/multi/image"
    assert git(clone.path, "remote").split() == ["origin", "udocker-registry"]
    res = clone.get(str(layout), result_renderer="disabled", return_type="list")
    assert {r["status"] for r in res} == {"ok"}
    files = [r for r in res if r["type"] == "file"]
    assert len(files) == len(pushed.layers)
    assert all("udocker-registry" in r["message"] for r in files), files
    assert_valid_layout(clone.path, layout)
    clone.drop(str(layout), result_renderer="disabled", reckless="availability")
    assert not any(p.exists() for p in (layout / "blobs/sha256").iterdir() if p.is_symlink())
    clone.get(str(layout), result_renderer="disabled")
    assert_valid_layout(clone.path, layout)
    out = git(clone.path, "annex", "fsck", "--from", "udocker-registry", "--fast", "--json")
    assert all(json.loads(l)["success"] for l in out.splitlines())


def test_special_remote_is_read_only(ds, registry):
    pushed = registry.images["test/single:1"]
    assert imp(ds, pushed.reference)["status"] == "ok"
    key = pushed.layers[0].annex_key
    proc = subprocess.run(["git", "annex", "drop", "--from", "udocker-registry",
                           "--force", "--key", key],
                          cwd=ds.path, text=True, capture_output=True)
    assert proc.returncode != 0
    assert "read-only" in proc.stdout + proc.stderr
    # the registry still has it, and git-annex still knows
    out = git(ds.path, "annex", "checkpresentkey", key, "udocker-registry")
    assert out == ""


def test_import_by_digest_wins_over_tag(ds, registry):
    v1, v2 = registry.images["test/multi:1"], registry.images["test/multi:2"]
    # tag says 2, digest says 1: the digest wins, the tag is kept as a label
    res = imp(ds, f"{registry.host}/{v2.name}:2@{v1.manifest_digest}", name="pinned")
    assert res["status"] == "ok", res
    assert res["manifest_digest"] == v1.manifest_digest
    manifest, _ = assert_valid_layout(ds.path, res["path"])
    assert [l["digest"] for l in manifest["layers"]] == [l.digest for l in v1.layers]


def test_import_refuses_uncommitted_changes_in_its_path(ds, registry):
    """A changed or untracked file where the image goes is the user's: the import stops and
    says so, and leaves it (checked without git-annex's filter: the layout holds none)."""
    v1, v2 = registry.images["test/multi:1"], registry.images["test/multi:2"]
    layout = Path(imp(ds, v1.reference)["path"])
    for change in ("modified", "untracked"):
        target = layout / ("index.json" if change == "modified" else "notes.txt")
        target.write_text('{"mine": 1}')
        res = imp(ds, v2.reference)
        assert res["status"] == "error" and "uncommitted changes" in res["message"], res
        assert target.read_text() == '{"mine": 1}'
        if change == "modified":
            git(ds.path, "checkout", "--", str(target))
        else:
            target.unlink()
    assert imp(ds, v2.reference)["status"] == "ok"
