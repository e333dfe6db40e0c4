"""Unit tests for the pure vocabulary: reference parsing and OCI manifest/platform handling."""
import json

import pytest

from datalad_udocker import oci
from datalad_udocker.digest import sha256_digest
from datalad_udocker.errors import (DigestMismatch, InvalidReference, PlatformNotFound,
                                    UnsupportedMediaType)
from datalad_udocker.reference import is_loopback_host, parse_reference

D = "sha256:" + "ab" * 32
D2 = "sha256:" + "cd" * 32


# -- references -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
    ("registry-1.docker.io/org/img", "docker.io", "org/img", "latest", None),
    ("org/img:v1", "docker.io", "org/img", "v1", None),
    ("quay.io/org/img:1.0", "quay.io", "org/img", "1.0", None),
    ("127.0.0.1:5000/test/multi:1", "127.0.0.1:5000", "test/multi", "1", None),
    ("localhost:5000/x", "localhost:5000", "x", "latest", None),
    ("localhost/x:2", "localhost", "x", "2", None),
    ("[::1]:5000/x/y:t", "[::1]:5000", "x/y", "t", None),
    ("ghcr.io/a/b/c-d_e.f:Tag_1.2-rc", "ghcr.io", "a/b/c-d_e.f", "Tag_1.2-rc", None),
    ("busybox@" + D, "docker.io", "library/busybox", None, D),
    ("127.0.0.1:5000/x@" + D, "127.0.0.1:5000", "x", None, D),
    ("quay.io/org/img:1.0@" + D, "quay.io", "org/img", "1.0", D),
])
def test_parse_reference(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry, repository, tag, digest)


def test_reference_properties():
    hub = parse_reference("busybox:1.36")
    assert hub.api_host == "registry-1.docker.io"
    assert hub.reference == "1.36"
    assert hub.name == "busybox"
    assert str(hub) == "docker.io/library/busybox:1.36"
    pinned = parse_reference("127.0.0.1:5000/test/multi:1@" + D)
    assert pinned.api_host == "127.0.0.1:5000"
    assert pinned.reference == D          # the digest wins over the tag
    assert pinned.name == "multi"
    assert str(pinned) == "127.0.0.1:5000/test/multi:1@" + D
    assert parse_reference(str(pinned)) == pinned
    assert hub.with_digest(D).digest == D and hub.with_digest(D).tag == "1.36"
    assert pinned.is_loopback() and not hub.is_loopback()


@pytest.mark.parametrize("text, words", [
    ("", "invalid image reference"),
    (" busybox", "invalid image reference"),
    ("docker://busybox", "invalid image reference"),
    ("BusyBox", "invalid repository name"),
    ("a//b", "invalid repository name"),
    ("busybox:", "invalid tag"),
    ("busybox:bad tag", "invalid tag"),
    ("busybox:" + "t" * 129, "invalid tag"),
    ("busybox@sha256:abc", "invalid digest"),
    ("busybox@md5:" + "ab" * 16, "invalid digest"),
    ("busybox@sha256:" + "AB" * 32, "invalid digest"),
    ("bad_host.:5000/x", "invalid registry host"),
    ("-lead/x", "invalid repository name"),
])
def test_invalid_references(text, words):
    with pytest.raises(InvalidReference) as exc:
        parse_reference(text)
    msg = str(exc.value)
    assert words in msg
    assert "\n" not in msg
    assert "e.g." in msg or "sha256:" in msg   # every message says what is expected


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("localhost:5000", True), ("127.0.0.1", True),
    ("127.0.0.1:5000", True), ("127.5.6.7:80", True), ("[::1]:5000", True), ("::1", True),
    ("[::1]", True), ("10.0.0.1:5000", False), ("quay.io", False), ("docker.io", False),
    ("localhost.example.com:5000", False), ("[2001:db8::1]:5000", False),
])
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


# -- platforms --------------------------------------------------------------------------------
def test_platform_parse_and_str():
    p = oci.Platform.parse("linux/arm/v7")
    assert (p.os, p.architecture, p.variant) == ("linux", "arm", "v7")
    assert str(p) == "linux/arm/v7"
    assert str(oci.Platform.parse("linux/amd64")) == "linux/amd64"
    for bad in ("linux", "linux/", "/amd64", "a/b/c/d", ""):
        with pytest.raises(PlatformNotFound, match="OS/ARCH"):
            oci.Platform.parse(bad)


def test_platform_matching():
    arm = oci.Platform("linux", "arm")
    armv7 = oci.Platform("linux", "arm", "v7")
    assert arm.matches(armv7)                     # no variant asked: any variant
    assert armv7.matches(armv7)
    assert not armv7.matches(oci.Platform("linux", "arm", "v6"))
    assert not armv7.matches(arm)
    assert not arm.matches(oci.Platform("windows", "arm"))


def test_host_platform():
    p = oci.host_platform()
    assert p.os == "linux"
    assert p.architecture in ("amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64")


def index_doc(platforms, media_type=oci.OCI_INDEX):
    manifests = []
    for i, plat in enumerate(platforms):
        os_, arch, *variant = plat.split("/")
        p = {"os": os_, "architecture": arch}
        if variant:
            p["variant"] = variant[0]
        manifests.append({"mediaType": oci.OCI_MANIFEST, "size": 100 + i,
                          "digest": "sha256:%064x" % i, "platform": p})
    return json.dumps({"schemaVersion": 2, "mediaType": media_type,
                       "manifests": manifests}).encode()


def test_index_select():
    idx = oci.parse_manifest(index_doc(
        ["linux/amd64", "linux/arm64", "linux/arm/v7", "unknown/unknown"]))
    assert isinstance(idx, oci.Index)
    assert idx.select(oci.Platform.parse("linux/arm64")).digest == "sha256:%064x" % 1
    assert idx.select(oci.Platform.parse("linux/arm/v7")).digest == "sha256:%064x" % 2
    assert idx.select(oci.Platform.parse("linux/arm")).digest == "sha256:%064x" % 2
    assert idx.platforms()[:3] == ["linux/amd64", "linux/arm64", "linux/arm/v7"]


def test_index_select_lists_platforms():
    idx = oci.parse_manifest(index_doc(["linux/amd64", "linux/arm/v7", "unknown/unknown"],
                                       oci.DOCKER_MANIFEST_LIST))
    with pytest.raises(PlatformNotFound) as exc:
        idx.select(oci.Platform.parse("linux/s390x"))
    msg = str(exc.value)
    assert "linux/s390x" in msg
    assert "linux/amd64, linux/arm/v7" in msg
    assert "unknown" not in msg                   # attestation entries are not platforms
    assert "--platform" in msg
    with pytest.raises(PlatformNotFound, match="available: none"):
        oci.parse_manifest(index_doc(["unknown/unknown"])).select(oci.host_platform())


# -- manifests --------------------------------------------------------------------------------
def manifest_doc(media_type=oci.OCI_MANIFEST, layer_type=None, **extra_layer):
    layer = {"mediaType": layer_type or "application/vnd.oci.image.layer.v1.tar+gzip",
             "size": 10, "digest": D2, **extra_layer}
    doc = {"schemaVersion": 2, "config": {"mediaType": oci.OCI_CONFIG, "size": 5, "digest": D},
           "layers": [layer]}
    if media_type:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


@pytest.mark.parametrize("media_type", [oci.OCI_MANIFEST, oci.DOCKER_MANIFEST])
def test_parse_manifest(media_type):
    raw = manifest_doc(media_type)
    m = oci.parse_manifest(raw, expected_digest=sha256_digest(raw))
    assert isinstance(m, oci.Manifest)
    assert m.media_type == media_type and m.raw == raw and m.digest == sha256_digest(raw)
    assert m.config.digest == D and m.layers[0].digest == D2 and m.layers[0].size == 10
    assert m.blobs() == (m.config,) + m.layers
    assert m.layers[0].hex == "cd" * 32


def test_media_type_from_header_or_content():
    raw = manifest_doc(media_type=None)           # OCI manifests may omit mediaType
    assert oci.parse_manifest(raw, oci.DOCKER_MANIFEST).media_type == oci.DOCKER_MANIFEST
    assert oci.parse_manifest(raw, "application/json").media_type == oci.OCI_MANIFEST
    assert oci.parse_manifest(raw).media_type == oci.OCI_MANIFEST
    idx = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert isinstance(oci.parse_manifest(idx), oci.Index)


def test_manifest_digest_mismatch():
    with pytest.raises(DigestMismatch):
        oci.parse_manifest(manifest_doc(), expected_digest=D)


@pytest.mark.parametrize("raw, words", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"schemaVersion": 1, "mediaType":
                 "application/vnd.docker.distribution.manifest.v1+prettyjws"}).encode(),
     "unsupported manifest media type"),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST}).encode(), "malformed"),
])
def test_unsupported_manifests(raw, words):
    with pytest.raises(UnsupportedMediaType, match=words):
        oci.parse_manifest(raw)


@pytest.mark.parametrize("layer_type, compression", [
    ("application/vnd.oci.image.layer.v1.tar+gzip", "gzip"),
    ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd"),
    ("application/vnd.oci.image.layer.v1.tar", None),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", "gzip"),
])
def test_supported_layers(layer_type, compression):
    m = oci.parse_manifest(manifest_doc(layer_type=layer_type))
    oci.check_layers_supported(m)
    assert oci.layer_compression(layer_type) == compression


@pytest.mark.parametrize("layer_type, extra, words", [
    ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", {}, "foreign"),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", {}, "non-distributable"),
    ("application/vnd.oci.image.layer.v1.tar+gzip", {"urls": ["https://x/y"]}, "foreign"),
    ("application/vnd.example.weird", {}, "unsupported media type"),
])
def test_unsupported_layers(layer_type, extra, words):
    m = oci.parse_manifest(manifest_doc(layer_type=layer_type, **extra))
    with pytest.raises(UnsupportedMediaType, match=words):
        oci.check_layers_supported(m)


def test_descriptor_round_trip():
    d = {"mediaType": oci.OCI_MANIFEST, "digest": D, "size": 7,
         "platform": {"architecture": "arm", "os": "linux", "variant": "v7"},
         "annotations": {"a": "b"}}
    desc = oci.Descriptor.from_dict(d)
    assert desc.platform == oci.Platform("linux", "arm", "v7")
    assert desc.to_dict() == d
