"""Import from archives the real Docker Engine wrote with ``docker save``, and OCI layouts.

The Engine here (Debian's docker.io, 20.10) writes the classic flavour; the Docker >= 25
flavour is made from that very archive by :func:`to_docker25` (same layer bytes, config and
names, laid out as Docker 25 lays them out).
"""
from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import datalad.api as dl

from checks import assert_valid_layout, dataset_state, git, imp
from test_docker_archive import _add, classic_archive, make_image, write_docker25

import datalad_udocker.commands.export_image  # noqa: F401  (binds Dataset.udocker_export)
from datalad_udocker import oci
from datalad_udocker.archive.source import open_source
from datalad_udocker.registry.client import RegistryClient

pytestmark = pytest.mark.timeout(600)


def client_factory(ref):
    return RegistryClient(ref.registry)


def to_docker25(classic: Path, out: Path) -> Path:
    """Re-lay a classic ``docker save`` archive as Docker >= 25 writes it
    (:func:`test_docker_archive.write_docker25`: same layer tars, config and names)."""
    with tarfile.open(classic) as t:
        def read(name):
            member = t.getmember(name)
            if member.issym():
                member = t.getmember(str(Path(name).parent / member.linkname))
            return t.extractfile(member).read()
        images = [([read(l) for l in e["Layers"]], read(e["Config"]), e.get("RepoTags") or [])
                  for e in json.loads(t.extractfile("manifest.json").read())]
    return write_docker25(out, images)


@pytest.fixture(scope="module")
def saved(registry, dockerd, tmp_path_factory):
    """Archives written by the real ``docker save`` after pulling from the test registry."""
    d = tmp_path_factory.mktemp("saved")
    refs = {k: registry.images[k].reference for k in ("test/multi:1", "test/single:1")}
    for ref in refs.values():
        dockerd.docker("pull", ref)
    dockerd.docker("save", "-o", str(d / "multi.tar"), refs["test/multi:1"])
    dockerd.docker("save", "-o", str(d / "both.tar"), *refs.values())
    # a local image on top of test/multi:1: one layer no registry has
    dockerd.docker("run", "--name", "derive", "--entrypoint", "/bin/sh", refs["test/multi:1"],
                   "-c", "echo derived > /derived.txt")
    dockerd.docker("commit", "derive", "local/derived:1")
    dockerd.docker("rm", "derive")
    dockerd.docker("save", "-o", str(d / "derived.tar"), "local/derived:1")
    for name in ("multi", "both", "derived"):
        to_docker25(d / f"{name}.tar", d / f"{name}-25.tar")
    return d


def test_real_docker_save_is_the_classic_flavour(saved):
    with tarfile.open(saved / "multi.tar") as t:
        names = t.getnames()
    assert "manifest.json" in names and "repositories" in names
    assert any(n.endswith("/layer.tar") for n in names)


@pytest.mark.parametrize("flavour", ["", "-25"])
def test_source_without_registry(saved, registry, flavour):
    pushed = registry.images["test/multi:1"]
    src = open_source(f"docker-archive:{saved}/multi{flavour}.tar", None, client_factory)
    assert all(l.url is None for l in src.layers)
    # local layers are the uncompressed tars: their digests are the diff_ids
    assert [l.descriptor.digest for l in src.layers] == pushed.config_json["rootfs"]["diff_ids"]
    assert src.manifest.config.digest == pushed.config_digest
    assert src.default_name == "multi"
    assert src.annotations[oci.ANNOTATION_REPOSITORY] == "test/multi"


@pytest.mark.parametrize("flavour", ["", "-25"])
def test_source_ref_recovers_registry_blobs(saved, registry, flavour):
    pushed = registry.images["test/multi:1"]
    src = open_source(f"docker-archive:{saved}/multi{flavour}.tar", pushed.reference,
                      client_factory)
    assert src.manifest.digest == pushed.manifest_digest      # the registry's own manifest
    assert [l.url for l in src.layers] == [pushed.blob_url(l.digest) for l in pushed.layers]
    assert src.notes == []
    assert src.annotations[oci.ANNOTATION_SOURCE_DIGEST] == pushed.manifest_digest


@pytest.mark.parametrize("flavour", ["", "-25"])
def test_partial_match_lists_unmatched_layers(saved, registry, flavour):
    pushed = registry.images["test/multi:1"]
    src = open_source(f"docker-archive:{saved}/derived{flavour}.tar", pushed.reference,
                      client_factory)
    urls = [l.url for l in src.layers]
    assert urls[:3] == [pushed.blob_url(l.digest) for l in pushed.layers]
    assert urls[3] is None
    assert len(src.notes) == 2      # one unmatched layer, and a config of its own
    assert src.layers[3].descriptor.digest in src.notes[0]
    assert src.manifest.media_type == oci.OCI_MANIFEST
    assert src.manifest.digest != pushed.manifest_digest


def test_several_images_choose_by_name(saved, registry):
    with pytest.raises(Exception, match="holds 2 images") as err:
        open_source(f"docker-archive:{saved}/both.tar", None, client_factory)
    assert "test/multi:1" in str(err.value) and "test/single:1" in str(err.value)
    ref = registry.images["test/single:1"].reference
    src = open_source(f"docker-archive:{saved}/both-25.tar:{ref}", None, client_factory)
    assert src.default_name == "single"


def test_explicit_source_ref_unreachable_is_an_error(saved):
    with pytest.raises(Exception, match="cannot match"):
        open_source(f"docker-archive:{saved}/multi.tar", "127.0.0.1:9/nothing/here:1",
                    client_factory)


# --- through udocker-import into a dataset --------------------------------

def test_import_archive_with_source_ref_then_clone_gets_from_registry(saved, registry, ds,
                                                                      tmp_path):
    pushed = registry.images["test/multi:1"]
    res = imp(ds, f"docker-archive:{saved}/multi.tar", source_ref=pushed.reference)
    assert res["status"] == "ok", res
    assert res["manifest_digest"] == pushed.manifest_digest
    layout = Path(res["path"])
    assert layout == Path(ds.path) / ".datalad/environments/multi/image"
    assert_valid_layout(ds.path, layout)
    for layer in pushed.layers:
        info = json.loads(git(ds.path, "annex", "whereis", "--json", "--key", layer.annex_key))
        assert pushed.blob_url(layer.digest) in [u for r in info["whereis"]
                                                 for u in r.get("urls", [])]
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", ds.path, str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "fetch", "-q", ds.path, "git-annex:git-annex"],
                   check=True)
    # the bare copy must not know the original (datalad clone would add it as a remote and
    # get the layers from there): the registry is then the only source
    subprocess.run(["git", "-C", str(bare), "remote", "remove", "origin"], check=True)
    clone = dl.clone(str(bare), tmp_path / "clone", result_renderer="disabled")
    assert "origin-2" not in git(clone.path, "remote").split()
    got = clone.get(str(Path(clone.path) / ".datalad/environments/multi/image"),
                    result_renderer="disabled", return_type="list")
    assert {r["status"] for r in got} == {"ok"}
    assert_valid_layout(clone.path, Path(clone.path) / ".datalad/environments/multi/image")


def test_import_archive_without_registry_is_local(saved, ds):
    res = imp(ds, f"docker-archive:{saved}/derived-25.tar")
    assert res["status"] == "ok", res
    assert res["container_name"] == "derived"
    manifest, config = assert_valid_layout(ds.path, res["path"])
    assert [l["digest"] for l in manifest["layers"]] == config["rootfs"]["diff_ids"]
    for l in manifest["layers"]:
        key = "SHA256-s%d--%s" % (l["size"], l["digest"].split(":")[1])
        info = json.loads(git(ds.path, "annex", "whereis", "--json", "--key", key))
        assert not [u for r in info["whereis"] for u in r.get("urls", [])]


def test_import_partial_match_reports_unmatched(saved, registry, ds):
    pushed = registry.images["test/multi:1"]
    res = imp(ds, f"docker-archive:{saved}/derived.tar", source_ref=pushed.reference)
    assert res["status"] == "ok", res
    assert any("not in" in n for n in res["notes"]), res["notes"]
    assert_valid_layout(ds.path, res["path"])


def test_export_roundtrip_recovers_registry(saved, registry, ds, tmp_path):
    """An exported archive names its registry: re-importing it needs no --source-ref."""
    pushed = registry.images["test/multi:1"]
    assert imp(ds, pushed.reference)["status"] == "ok"
    out = tmp_path / "exported.tar"
    assert ds.udocker_export("multi", output=str(out), result_renderer="disabled",
                             return_type="list")[0]["status"] == "ok"
    other = dl.create(tmp_path / "other", result_renderer="disabled")
    res = imp(other, f"docker-archive:{out}")
    assert res["status"] == "ok", res
    assert res["manifest_digest"] == pushed.manifest_digest
    assert Path(ds.path, ".datalad/environments/multi/image/index.json").read_text() == \
        Path(other.path, ".datalad/environments/multi/image/index.json").read_text()


def test_import_oci_dir(registry, ds, tmp_path):
    layout = tmp_path / "oci"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                    "docker://" + registry.images["test/multi:1"].reference, f"oci:{layout}:v1"],
                   check=True, capture_output=True)
    res = imp(ds, f"oci:{layout}:v1", name="fromoci")
    assert res["status"] == "ok", res
    manifest, _ = assert_valid_layout(ds.path, res["path"])
    assert [l["digest"] for l in manifest["layers"]] == [
        l.digest for l in registry.images["test/multi:1"].layers]


@pytest.mark.parametrize("case", ["truncated", "traversal", "device", "missing-blob",
                                  "diff-id", "ambiguous", "no-such-name"])
def test_bad_archives_leave_dataset_unchanged(saved, ds, tmp_path, case):
    path = tmp_path / "bad.tar"
    wanted = ""
    if case == "truncated":
        data = (saved / "multi.tar").read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif case in ("traversal", "device"):
        classic_archive(path, [make_image(1)])
        with tarfile.open(path, "a") as tar:
            if case == "traversal":
                _add(tar, "../../escaped.txt", b"x")
            else:
                _add(tar, "dev/console", type=tarfile.CHRTYPE, devmajor=5, devminor=1)
    elif case == "missing-blob":
        _copy_without(saved / "multi-25.tar", path, lambda n: n.startswith("blobs/") and
                      n == _layer0(saved / "multi-25.tar"))
    elif case == "diff-id":
        layers, config, name = make_image(2)
        bad_config = json.loads(config)
        bad_config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
        classic_archive(path, [(layers, json.dumps(bad_config).encode(), name)])
    elif case in ("ambiguous", "no-such-name"):
        path = saved / "both.tar"
        wanted = ":nothing/like:this" if case == "no-such-name" else ""
    before = dataset_state(ds.path)
    res = imp(ds, f"docker-archive:{path}{wanted}")
    assert res["status"] == "error", res
    assert "\n" not in res["message"]
    assert dataset_state(ds.path) == before
    assert not list(tmp_path.rglob("escaped.txt"))
    proc = subprocess.run(["datalad", "udocker-import", "-d", ds.path,
                           f"docker-archive:{path}{wanted}"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert dataset_state(ds.path) == before


def _layer0(path):
    with tarfile.open(path) as t:
        return json.loads(t.extractfile("manifest.json").read())[0]["Layers"][0]


def _copy_without(src, dst, drop):
    with tarfile.open(src) as s, tarfile.open(dst, "w") as d:
        for m in s.getmembers():
            if not drop(m.name):
                d.addfile(m, s.extractfile(m) if m.isreg() else None)
