"""Shared assertions: one layout-validity check used by every test that writes a layout,
and a snapshot of a dataset's state to prove a failed operation changed nothing."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def git(ds_path, *args) -> str:
    return subprocess.run(["git", *args], cwd=ds_path, check=True, text=True,
                          stdout=subprocess.PIPE).stdout


def assert_valid_layout(ds_path, layout, require_content=True):
    """``layout`` (in dataset ``ds_path``) is an OCI layout skopeo reads, its JSON blobs are in
    git with matching digests, and each layer is annexed under the key equal to its digest.
    Returns (manifest dict, config dict)."""
    layout = Path(layout)
    rel = os.path.relpath(layout, ds_path)
    index = json.loads((layout / "index.json").read_text())
    assert json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    desc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest_path = blobs / desc["digest"].split(":")[1]
    assert not manifest_path.is_symlink(), "manifest must be in git, not annexed"
    manifest = json.loads(manifest_path.read_bytes())
    config_path = blobs / manifest["config"]["digest"].split(":")[1]
    assert not config_path.is_symlink(), "config must be in git, not annexed"
    config = json.loads(config_path.read_bytes())
    tracked = set(git(ds_path, "ls-files", "--", rel).split())
    for p in (manifest_path, config_path, layout / "index.json", layout / "oci-layout"):
        assert os.path.relpath(p, ds_path) in tracked
    source = desc.get("annotations", {}).get("org.datalad.udocker.manifest")
    if source:   # a Docker image: index.json names an OCI manifest over the registry's blobs
        assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        oci_view, manifest_path = manifest, blobs / source.split(":")[1]
        assert os.path.relpath(manifest_path, ds_path) in tracked
        manifest = json.loads(manifest_path.read_bytes())     # the image is the registry's
        assert [(l["digest"], l["size"]) for l in oci_view["layers"]] == [
            (l["digest"], l["size"]) for l in manifest["layers"]]
        assert oci_view["config"]["digest"] == manifest["config"]["digest"]
    for layer in manifest["layers"]:
        hexpart = layer["digest"].split(":")[1]
        p = blobs / hexpart
        assert p.is_symlink(), f"layer {hexpart} is not annexed"
        key = os.path.basename(os.readlink(p))
        assert key == f"SHA256-s{layer['size']}--{hexpart}"
        if require_content:
            assert p.exists(), f"layer {hexpart} content missing"
    if require_content:
        out = subprocess.run(["skopeo", "inspect", f"oci:{layout}"], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["Digest"] == desc["digest"]
    return manifest, config


def dataset_state(ds_path) -> dict:
    """Everything an import could change: HEAD, index, worktree status, annex objects, config,
    and the files under ``.git/annex/tmp`` (staging) with their sizes."""
    ds_path = Path(ds_path)
    objects = ds_path / ".git" / "annex" / "objects"
    tmp = ds_path / ".git" / "annex" / "tmp"
    cfg = ds_path / ".datalad" / "config"
    return {
        "head": git(ds_path, "rev-parse", "HEAD").strip(),
        "index": git(ds_path, "ls-files", "--stage"),
        "status": git(ds_path, "status", "--porcelain", "--untracked-files=all"),
        "annex_tmp": sorted((str(p.relative_to(tmp)), p.stat().st_size if p.is_file() else None)
                            for p in tmp.rglob("*")) if tmp.exists() else [],
        "objects": sorted(p.name for p in objects.rglob("SHA256*") if p.is_file())
        if objects.exists() else [],
        "config": cfg.read_text() if cfg.exists() else None,
        "files": sorted(str(p.relative_to(ds_path)) for p in ds_path.rglob("*")
                        if ".git" not in p.relative_to(ds_path).parts),
    }


def imp(ds, ref, **kw):
    """``ds.udocker_import(ref, **kw)`` -> its single result record (errors not raised)."""
    res = ds.udocker_import(ref, result_renderer="disabled", return_type="list",
                            on_failure="ignore", **kw)
    assert len(res) == 1, res
    return res[0]
