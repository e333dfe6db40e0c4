"""The one digest type, OCI layout reader, ensure_local and transport table,
on their own (no servers).

A digest is checked once, when a descriptor is made, whoever makes it; the
OCI layout reader serves a dataset's layout (LayoutError) and an image source
(ArchiveError) alike, and parses the config it hands out; ensure_local gets
what is missing or says in one line what is not there.
"""
import json

import pytest

from fixtures import images as im

from datalad_udocker import oci
from datalad_udocker.archive.oci_archive import read_oci_layout
from datalad_udocker.dataset.layout import OCILayout, blob_name
from datalad_udocker.dataset.local import ensure_local
from datalad_udocker.digest import Digest, HashingReader, sha256_digest
from datalad_udocker.errors import ArchiveError, InvalidDigest, LayoutError
from datalad_udocker.members import DirReader
from datalad_udocker.transports import TRANSPORTS, split_transport

HEX = "ab" * 32


def test_digest_is_checked_once_and_knows_its_parts():
    d = Digest("sha256:" + HEX)
    assert (d.algorithm, d.hex) == ("sha256", HEX)
    assert d == "sha256:" + HEX and Digest(d) is d
    assert json.dumps({"d": d}) == json.dumps({"d": "sha256:" + HEX})
    for bad in ("sha256:" + HEX[:-1], "sha256:../../x", "sha512:" + HEX, None,
                "SHA256:" + HEX):
        with pytest.raises(InvalidDigest):
            Digest(bad)


def test_a_descriptor_made_in_code_holds_a_checked_digest():
    desc = oci.Descriptor("application/octet-stream", "sha256:" + HEX, 1)
    assert isinstance(desc.digest, Digest) and desc.hex == HEX
    with pytest.raises(InvalidDigest):
        oci.Descriptor("application/octet-stream", "sha256:../etc/passwd", 1)


def test_hashing_reader_hashes_what_passes(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 3000)
    with open(tmp_path / "f", "rb") as f:
        reader = HashingReader(f)
        assert reader.read(100) == b"x" * 100
        reader.drain()
    assert (reader.digest, reader.count) == (sha256_digest(b"x" * 3000), 3000)


def _put(layout, doc):
    raw = json.dumps(doc).encode()
    (layout / blob_name(sha256_digest(raw))).write_bytes(raw)
    return sha256_digest(raw), len(raw)


def _layout(tmp_path, config=None):
    """An OCI layout of one image tagged ``t``; with ``config``, that JSON
    value (whatever it is) as the image's config."""
    layout = im.init_layout(tmp_path / "oci")
    layers = [im.make_layer({"a": b"1"})]
    if config is None:
        desc = im.write_image(layout, layers, im.image_config(layers))
    else:
        digest, size = _put(layout, config)
        digest, size = _put(layout, {
            "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "layers": [],
            "config": {"mediaType": oci.OCI_CONFIG, "digest": digest, "size": size}})
        desc = {"mediaType": oci.OCI_MANIFEST, "digest": digest, "size": size}
    im.tag(layout, desc, "t")
    return layout


def test_one_reader_for_a_dataset_layout_and_an_oci_dir(tmp_path):
    layout = _layout(tmp_path)
    mine = OCILayout(layout)
    assert mine.config()["rootfs"]["diff_ids"]
    with DirReader(layout) as reader:
        image = read_oci_layout(reader, "t")
    assert image.manifest == mine.manifest()
    assert image.layers[0].member == blob_name(mine.manifest().layers[0].digest)


@pytest.mark.parametrize("config", [[1, 2], "text", {"rootfs": "no"}])
def test_a_config_that_is_not_an_image_config_is_one_clear_error(tmp_path, config):
    layout = _layout(tmp_path, config)
    with pytest.raises(LayoutError, match="config") as err:
        OCILayout(layout).config()
    assert "\n" not in str(err.value)
    with DirReader(layout) as reader, pytest.raises(ArchiveError, match="config"):
        read_oci_layout(reader)


def test_ensure_local_fetches_what_is_missing_and_says_what_is_not(tmp_path):
    layout = OCILayout(_layout(tmp_path))
    blob = layout.blob_path(layout.manifest().layers[0].digest)
    data = blob.read_bytes()
    blob.unlink()
    with pytest.raises(LayoutError, match="not present.*datalad get") as err:
        ensure_local(layout)
    assert layout.manifest().layers[0].digest in str(err.value)
    with pytest.raises(LayoutError, match="not present.*: no network"):
        ensure_local(layout, lambda paths: "no network")
    asked = []

    def fetch(paths):
        asked.extend(paths)
        blob.write_bytes(data)
    assert ensure_local(layout.path, fetch).path == layout.path
    assert asked == [blob]
    assert ensure_local(layout, None).path == layout.path    # nothing missing now


@pytest.mark.parametrize("spec, transport, rest", [
    ("busybox", "docker", "busybox"),
    ("docker://127.0.0.1:5000/a:1", "docker", "127.0.0.1:5000/a:1"),
    ("oci:/x:tag", "oci", "/x:tag"),
    ("oci-archive:f.tar", "oci-archive", "f.tar"),
    ("docker-archive:a.tar:n:t", "docker-archive", "a.tar:n:t"),
    ("localhost:5000/oci:1", "docker", "localhost:5000/oci:1"),
])
def test_one_table_of_transports(spec, transport, rest):
    assert split_transport(spec) == (transport, rest)
    assert transport in TRANSPORTS
