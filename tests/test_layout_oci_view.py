"""A Docker v2s2 image in a dataset's layout (issue 9 item 7): the registry's manifest blob
stays untouched and is what the package reads as the image; ``index.json`` names an OCI
manifest over the same blobs, so OCI tools read the layout by tag.  Layouts written before
(the Docker manifest in ``index.json``) read the same.  No servers: the layout is written
by :func:`write_json_files` into a directory, as the store does."""
import json
import subprocess

import pytest

from fixtures import images as im
from test_runtime import cached, run_cli, udir  # noqa: F401 (udir: a fixture)

from datalad_udocker import oci
from datalad_udocker.dataset.layout import OCILayout, blob_name, layout_files, write_json_files
from datalad_udocker.digest import sha256_digest
from datalad_udocker.errors import LayoutError

ANN = {oci.ANNOTATION_REF_NAME: "1", oci.ANNOTATION_TAG: "1",
       oci.ANNOTATION_REPOSITORY: "test/docker", oci.ANNOTATION_REGISTRY: "example.org"}


def docker_image(layers):
    """(oci.Manifest with Docker media types, config bytes) over ``layers``."""
    config_raw = json.dumps(im.image_config(layers), sort_keys=True).encode()
    doc = {"schemaVersion": 2, "mediaType": oci.DOCKER_MANIFEST,
           "config": {"mediaType": oci.DOCKER_CONFIG, "size": len(config_raw),
                      "digest": sha256_digest(config_raw)},
           "layers": [{"mediaType": im.DOCKER_LAYER, "size": l.size, "digest": l.digest}
                      for l in layers]}
    raw = json.dumps(doc, indent=3).encode()       # the registry's bytes, whatever they are
    return oci.parse_manifest(raw, oci.DOCKER_MANIFEST), config_raw


@pytest.fixture
def image():
    return docker_image([im.make_layer({"a": b"1"}), im.make_layer({"b": b"2"})])


def store(path, manifest, config_raw, layers=()):
    written = write_json_files(path, manifest, config_raw, ANN)
    for layer in layers:
        (path / blob_name(layer.digest)).write_bytes(layer.data)
    return written


def test_docker_image_is_stored_untouched_and_named_by_an_oci_manifest(tmp_path, image):
    manifest, config_raw = image
    written = store(tmp_path, manifest, config_raw)
    entry, = json.loads((tmp_path / "index.json").read_text())["manifests"]
    assert entry["mediaType"] == oci.OCI_MANIFEST
    assert entry["annotations"] == dict(ANN, **{oci.ANNOTATION_MANIFEST: manifest.digest})
    assert (tmp_path / blob_name(manifest.digest)).read_bytes() == manifest.raw
    view = json.loads((tmp_path / blob_name(entry["digest"])).read_bytes())
    assert view["mediaType"] == oci.OCI_MANIFEST
    assert view["config"] == {"mediaType": oci.OCI_CONFIG, "digest": manifest.config.digest,
                              "size": manifest.config.size}
    assert view["layers"] == [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                               "digest": l.digest, "size": l.size} for l in manifest.layers]
    assert sorted(p.name for p in written) == sorted(
        [manifest.digest.hex, entry["digest"].split(":")[1], manifest.config.digest.hex,
         "index.json", "oci-layout"])
    # what the package reads as the image is the registry's manifest
    layout = OCILayout(tmp_path)
    desc = layout.manifest_descriptor()
    assert (desc.digest, desc.media_type, desc.size) == (
        manifest.digest, oci.DOCKER_MANIFEST, len(manifest.raw))
    assert desc.annotations == ANN and layout.annotations() == ANN
    assert layout.manifest() == manifest
    assert layout.image_name() == ("example.org/test/docker", "1")
    # the same image gives the same bytes (a re-import changes nothing in git)
    before = {p: p.read_bytes() for p in written}
    store(tmp_path, manifest, config_raw)
    assert {p: p.read_bytes() for p in written} == before


def test_oci_tools_read_it_by_tag(tmp_path):
    layers = [im.make_layer({"a": b"1"})]
    manifest, config_raw = docker_image(layers)
    store(tmp_path, manifest, config_raw, layers)
    for cmd in (["umoci", "stat", "--image", f"{tmp_path}:1"],
                ["skopeo", "inspect", f"oci:{tmp_path}:1"],
                ["oci-image-tool", "validate", "--type", "image", "--ref", "name=1",
                 str(tmp_path)]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{cmd[0]}: {res.stderr}"


def test_an_oci_image_is_stored_as_it_is(tmp_path):
    layers = [im.make_layer({"a": b"1"})]
    desc = im.write_image(tmp_path / "src", layers, im.image_config(layers))
    manifest = OCILayout(tmp_path / "src").read_manifest(oci.Descriptor.from_dict(desc))
    config_raw = (tmp_path / "src" / blob_name(manifest.config.digest)).read_bytes()
    written = store(tmp_path / "dst", manifest, config_raw)
    entry, = json.loads((tmp_path / "dst/index.json").read_text())["manifests"]
    assert (entry["digest"], entry["annotations"]) == (manifest.digest, ANN)
    assert len(written) == 4          # manifest, config, oci-layout, index.json
    assert OCILayout(tmp_path / "dst").manifest_descriptor().digest == manifest.digest


def test_a_layout_written_by_an_older_version_reads_the_same(tmp_path, image):
    """Before item 7, index.json named the registry's Docker manifest itself."""
    manifest, config_raw = image
    (tmp_path / "blobs/sha256").mkdir(parents=True)
    for raw in (manifest.raw, config_raw):
        (tmp_path / blob_name(sha256_digest(raw))).write_bytes(raw)
    for name, data in layout_files(oci.Descriptor(oci.DOCKER_MANIFEST, manifest.digest,
                                                  len(manifest.raw), annotations=ANN)):
        (tmp_path / name).write_bytes(data)
    layout = OCILayout(tmp_path)
    desc = layout.manifest_descriptor()
    assert (desc.digest, desc.media_type, desc.annotations) == (
        manifest.digest, oci.DOCKER_MANIFEST, ANN)
    assert layout.manifest() == manifest
    assert layout.config()["rootfs"]["diff_ids"]


def test_a_source_annotation_that_does_not_match_is_one_clear_error(tmp_path, image):
    manifest, config_raw = image
    store(tmp_path, manifest, config_raw)
    other, other_config = docker_image([im.make_layer({"c": b"3"})])
    (tmp_path / blob_name(other.digest)).write_bytes(other.raw)
    index = json.loads((tmp_path / "index.json").read_text())
    index["manifests"][0]["annotations"][oci.ANNOTATION_MANIFEST] = other.digest
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(LayoutError, match="does not describe the image") as err:
        OCILayout(tmp_path).manifest()
    assert "\n" not in str(err.value)
    (tmp_path / blob_name(other.digest)).unlink()
    with pytest.raises(LayoutError, match="missing from blobs"):
        OCILayout(tmp_path).manifest_descriptor()
    index["manifests"][0]["annotations"][oci.ANNOTATION_MANIFEST] = "../../etc/passwd"
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(LayoutError, match="not a digest"):
        OCILayout(tmp_path).manifest_descriptor()


def test_a_docker_image_reimports_as_notneeded_under_the_registry_digest(ds, registry):
    from checks import imp
    pushed = registry.images["test/docker:1"]
    res = imp(ds, pushed.reference, name="d")
    assert res["status"] == "ok" and res["manifest_digest"] == pushed.manifest_digest
    layout = OCILayout(res["path"])
    assert layout.manifest_descriptor().digest == pushed.manifest_digest
    assert json.loads(layout.index_path.read_text())["manifests"][0]["mediaType"] == \
        oci.OCI_MANIFEST
    again = imp(ds, pushed.reference, name="d")
    assert again["status"] == "notneeded", again


def test_the_runtime_runs_a_docker_image_keyed_on_the_registry_manifest(nonroot, udir):
    """The container is made from the registry's manifest (its layers, its name)."""
    import shutil
    root = nonroot.make_tempdir("udtest-oci-view-")
    try:
        layers = [im.make_layer(im.busybox_rootfs()), im.make_layer({"marker": b"v2s2\n"})]
        manifest, config_raw = docker_image(layers)
        store(root / "img", manifest, config_raw, layers)
        res = run_cli(nonroot, udir, root / "img", "cat", "/marker")
        assert (res.returncode, res.stdout) == (0, "v2s2\n"), res.stderr
        assert [c["manifest_digest"] for c in cached(nonroot, udir)] == [manifest.digest]
    finally:
        shutil.rmtree(root, ignore_errors=True)
