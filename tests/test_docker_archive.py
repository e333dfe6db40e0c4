"""docker_archive / oci_archive / archive_source on archives built in the test.

Archives here are written the way the two ``docker save`` flavours write them
(:func:`classic_archive`, :func:`docker25_archive`; test_archive_import.py
checks them against the real Engine's output), plus hand-crafted malicious
or broken ones: every bad-input case must fail with one clear ArchiveError
(or DigestMismatch) and never extract anything.
"""
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import threading

import pytest

from fixtures import images as im

from datalad_udocker import oci
from datalad_udocker.archive.source import open_source, parse_spec
from datalad_udocker.archive.docker_archive import (TarReader, read_docker_archive,
                                            write_archive)
from datalad_udocker.errors import ArchiveError, DigestMismatch, UdockerError
from datalad_udocker.archive.oci_archive import DirReader


def _hex(data):
    return hashlib.sha256(data).hexdigest()


def _add(tar, name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def make_image(n=2, compression="none", name="example.org/test/img:1"):
    """``(layers, config_bytes, name)`` of a small image built in Python."""
    layers = [im.make_layer({"f%d.txt" % i: b"layer %d\n" % i}, compression)
              for i in range(n)]
    config = im.image_config(layers, cmd=["/bin/sh"])
    return layers, json.dumps(config, sort_keys=True).encode(), name


def classic_archive(path, images, link_duplicates=True):
    """Write ``images`` [(layers, config, name)] as Docker < 25 ``docker save`` does.

    ``<id>/layer.tar`` (uncompressed), ``<id>/json``, ``<id>/VERSION``,
    ``<config-hex>.json``, ``manifest.json``, ``repositories``; a layer
    shared with an earlier image is a symlink ``../<id>/layer.tar``.
    """
    entries, repos, seen = [], {}, {}
    with tarfile.open(path, "w") as tar:
        for layers, config, name in images:
            ids = []
            for layer in layers:
                raw = gzip.decompress(layer.data) if layer.compression == "gzip" \
                    else layer.data
                lid = _hex(("%s/%s" % (ids[-1] if ids else "", layer.diff_id))
                           .encode())
                ids.append(lid)
                if lid in seen:
                    continue
                _add(tar, lid, type=tarfile.DIRTYPE, mode=0o755)
                _add(tar, lid + "/VERSION", b"1.0")
                _add(tar, lid + "/json", json.dumps({"id": lid}).encode())
                if link_duplicates and layer.diff_id in seen.values():
                    other = [k for k, v in seen.items() if v == layer.diff_id][0]
                    _add(tar, lid + "/layer.tar", type=tarfile.SYMTYPE,
                         linkname="../%s/layer.tar" % other)
                else:
                    _add(tar, lid + "/layer.tar", raw)
                seen[lid] = layer.diff_id
            _add(tar, _hex(config) + ".json", config)
            entries.append({"Config": _hex(config) + ".json",
                            "RepoTags": [name] if name else None,
                            "Layers": [i + "/layer.tar" for i in ids]})
            if name:
                repo, _, tag = name.rpartition(":")
                repos.setdefault(repo, {})[tag] = ids[-1]
        _add(tar, "manifest.json", json.dumps(entries).encode())
        _add(tar, "repositories", json.dumps(repos).encode())
    return path


def _full_name(name):
    """Docker's normalised name (``reference.Named.String()``): busybox:latest ->
    docker.io/library/busybox:latest; written independently of the code under test."""
    first, slash, _ = name.partition("/")
    if not slash:
        return "docker.io/library/" + name
    if "." not in first and ":" not in first and first != "localhost":
        return "docker.io/" + name
    return name


def _familiar(name):
    """Docker's ``reference.FamiliarString``: the inverse of :func:`_full_name`."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _go_json(doc):
    """Go's ``json.Marshal``: compact, fields in struct order (the dicts' order here)."""
    return json.dumps(doc, separators=(",", ":")).encode()


def write_docker25(path, images, manifest_layers=True):
    """Write ``images`` [(uncompressed layer tars, config bytes, names)] as Docker >= 25
    ``docker save`` lays them out (moby ``image/tarexport/save.go``).

    ``blobs/sha256/``: each layer tar under its diff_id, a legacy v1 JSON per layer (not
    referenced by anything), the config, and an OCI manifest whose config descriptor carries
    the platform.  ``index.json`` (compact, ``mediaType`` set) has one entry per *name*: the
    manifest with ``platform`` and the annotations ``io.containerd.image.name`` (the full
    name, ``docker.io/library/busybox:latest``) and ``org.opencontainers.image.ref.name``
    (the tag); an image saved by ID has no entry.  ``manifest.json`` (Go's encoder: compact
    with a final newline) lists ``Config``, ``RepoTags`` (familiar names, ``null`` if none)
    and ``Layers`` as ``blobs/sha256/<diff_id>``; ``repositories`` maps familiar repo ->
    tag -> the top layer's diff_id hex.  Members are the temp dir's walk: sorted, directories
    first.  ``manifest_layers=False`` is Docker 25.0.0, whose manifest listed no layers.
    """
    blobs, entries, index, repos = {}, [], [], {}
    for raws, config, names in images:
        cfg = json.loads(config)
        platform = {"architecture": cfg["architecture"], "os": cfg["os"]}
        parent = ""
        for raw in raws:
            blobs[_hex(raw)] = raw
            v1id = _hex((parent + _hex(raw)).encode())
            v1 = _go_json({"id": v1id, "parent": parent, "created": "1970-01-01T00:00:00Z",
                           "container_config": {"Cmd": None}, "os": cfg["os"]})
            blobs[_hex(v1)] = v1
            parent = v1id
        blobs[_hex(config)] = config
        manifest = _go_json({
            "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + _hex(config),
                       "size": len(config), "platform": platform},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": "sha256:" + _hex(r), "size": len(r)}
                       for r in raws] if manifest_layers else []})
        blobs[_hex(manifest)] = manifest
        for name in names:
            full = _full_name(name)
            index.append({"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + _hex(manifest),
                          "size": len(manifest),
                          "annotations": {"io.containerd.image.name": full,
                                          "org.opencontainers.image.ref.name":
                                              full.rpartition(":")[2]},
                          "platform": platform})
            repo, _, tag = _familiar(name).rpartition(":")
            repos.setdefault(repo, {})[tag] = _hex(raws[-1])
        entries.append({"Config": "blobs/sha256/" + _hex(config),
                        "RepoTags": [_familiar(n) for n in names] or None,
                        "Layers": ["blobs/sha256/" + _hex(r) for r in raws]})
    with tarfile.open(path, "w") as tar:
        _add(tar, "blobs", type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "blobs/sha256", type=tarfile.DIRTYPE, mode=0o755)
        for hexd, data in sorted(blobs.items()):
            _add(tar, "blobs/sha256/" + hexd, data, mode=0o644)
        _add(tar, "index.json", _go_json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
                                           "manifests": index}), mode=0o644)
        _add(tar, "manifest.json", _go_json(entries) + b"\n", mode=0o644)
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}', mode=0o644)
        if repos:
            _add(tar, "repositories", _go_json(repos) + b"\n", mode=0o644)
    return path


def docker25_archive(path, images, manifest_layers=True):
    """Write ``images`` [(layers, config, name or None)] built in Python as Docker >= 25
    ``docker save`` does (:func:`write_docker25`)."""
    return write_docker25(path, [
        ([gzip.decompress(l.data) if l.compression == "gzip" else l.data for l in layers],
         config, [name] if name else []) for layers, config, name in images], manifest_layers)


def _open(path, wanted=None):
    with TarReader(path) as r:
        return read_docker_archive(r, wanted)


# --- reading good archives -------------------------------------------------

def docker25_0_archive(path, images):
    """Docker 25.0.0: the OCI manifest in blobs/ lists no layers (manifest.json does)."""
    return docker25_archive(path, images, manifest_layers=False)


@pytest.mark.parametrize("flavour", [classic_archive, docker25_archive, docker25_0_archive])
def test_read_both_flavours(tmp_path, flavour):
    layers, config, name = make_image(3)
    path = flavour(tmp_path / "a.tar", [(layers, config, name)])
    src = open_source("docker-archive:%s" % path)
    assert src.config_raw == config
    assert [l.descriptor.digest for l in src.layers] == [l.diff_id for l in layers]
    assert all(l.url is None for l in src.layers)
    assert src.manifest.config.digest == "sha256:" + _hex(config)
    assert src.default_name == "img"
    assert src.annotations[oci.ANNOTATION_REPOSITORY] == "test/img"
    assert src.annotations[oci.ANNOTATION_TAG] == "1"
    for layer, want in zip(src.layers, layers):
        dest = tmp_path / "out.bin"
        layer.fetch(str(dest), lambda n: None)
        assert "sha256:" + _hex(dest.read_bytes()) == want.diff_id
        dest.unlink()


def test_docker25_names_and_an_image_saved_by_id(tmp_path):
    """Docker 25 names an image in index.json by its full name (docker.io/library/...) and in
    manifest.json by its familiar one; an image saved by ID is in manifest.json only."""
    a, b = make_image(1, name="busybox:latest"), make_image(2, name=None)
    path = docker25_archive(tmp_path / "a.tar", [a, b])
    with tarfile.open(path) as t:
        index = json.loads(t.extractfile("index.json").read())
        entries = json.loads(t.extractfile("manifest.json").read())
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == [
        "docker.io/library/busybox:latest"]
    assert [e["RepoTags"] for e in entries] == [["busybox:latest"], None]
    for wanted in ("busybox", "busybox:latest", "docker.io/library/busybox:latest"):
        src = open_source("docker-archive:%s:%s" % (path, wanted))
        assert src.config_raw == a[1]
        assert src.annotations[oci.ANNOTATION_REPOSITORY] == "library/busybox"
    with pytest.raises(ArchiveError, match="holds 2 images.*busybox:latest.*untagged image #2"):
        open_source("docker-archive:%s" % path)
    only = docker25_archive(tmp_path / "id.tar", [b])
    src = open_source("docker-archive:%s" % only)
    assert src.config_raw == b[1]
    assert [l.descriptor.digest for l in src.layers] == [l.diff_id for l in b[0]]


def containerd_archive(path, layers, config, name):
    """Write one image as Docker with the containerd image store saves it (containerd's
    ``images/archive`` exporter): the registry's blobs as pulled (gzip layers), ``index.json``
    naming the registry's multi-platform *index* (annotated as Docker 25 does), of which only
    the host platform's manifest, config and layers are in ``blobs/``; ``manifest.json``
    points at the compressed layer blobs.  Returns the host manifest's digest."""
    blobs = {_hex(l.data): l.data for l in layers}
    blobs[_hex(config)] = config
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + _hex(config),
                   "size": len(config)},
        "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size}
                   for l in layers]}, indent=3).encode()
    blobs[_hex(manifest)] = manifest
    other = b'{"schemaVersion":2}'          # another platform's manifest: not in the tar
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + _hex(other), "size": len(other),
         "platform": {"architecture": "arm64", "os": "linux"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + _hex(manifest),
         "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    blobs[_hex(index)] = index
    with tarfile.open(path, "w") as tar:
        for hexd, data in sorted(blobs.items()):
            _add(tar, "blobs/sha256/" + hexd, data)
        _add(tar, "index.json", _go_json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
                                           "manifests": [{
            "mediaType": oci.OCI_INDEX, "digest": "sha256:" + _hex(index), "size": len(index),
            "annotations": {"io.containerd.image.name": _full_name(name),
                            "org.opencontainers.image.ref.name": name.rpartition(":")[2]}}]}))
        _add(tar, "manifest.json", _go_json([{
            "Config": "blobs/sha256/" + _hex(config), "RepoTags": [_familiar(name)],
            "Layers": ["blobs/sha256/" + _hex(l.data) for l in layers]}]) + b"\n")
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
    return "sha256:" + _hex(manifest)


def test_containerd_store_archive_keeps_the_registry_manifest(tmp_path):
    layers, config, name = make_image(2, "gzip")
    digest = containerd_archive(tmp_path / "c.tar", layers, config, name)
    src = open_source("docker-archive:%s" % (tmp_path / "c.tar"))
    assert src.manifest.digest == digest          # through the index, to the host's manifest
    assert [(l.descriptor.digest, l.descriptor.media_type) for l in src.layers] == [
        (l.digest, l.media_type) for l in layers]


def test_shared_layers_are_symlinks_within_archive(tmp_path):
    a = make_image(2)
    b_layers = [im.make_layer({"other": b"x"}, "none")] + a[0][:1]   # same diff, new parent
    b = (b_layers, json.dumps(im.image_config(b_layers)).encode(), "example.org/b:2")
    path = classic_archive(tmp_path / "two.tar", [a, b])
    with tarfile.open(path) as t:
        assert any(m.issym() for m in t.getmembers())
    src = open_source("docker-archive:%s:example.org/b:2" % path)
    assert [l.descriptor.digest for l in src.layers] == [l.diff_id for l in b_layers]


def test_several_images_need_a_name(tmp_path):
    a, b = make_image(1, name="example.org/a:1"), make_image(2, name="example.org/b:1")
    path = classic_archive(tmp_path / "two.tar", [a, b])
    with pytest.raises(ArchiveError, match=r"holds 2 images.*example.org/a:1.*example.org/b:1"):
        _open(path)
    with pytest.raises(ArchiveError, match="no image named example.org/c:1.*example.org/a:1"):
        _open(path, "example.org/c:1")
    assert _open(path, "example.org/b:1").repo_tags == ["example.org/b:1"]
    # docker-style normalisation: busybox == docker.io/library/busybox:latest
    path2 = classic_archive(tmp_path / "bb.tar", [make_image(1, name="busybox:latest"),
                                                    make_image(2, name="alpine:3")])
    assert _open(path2, "docker.io/library/busybox").repo_tags == ["busybox:latest"]


def test_gzipped_archive_and_compressed_layers(tmp_path):
    layers, config, name = make_image(2, "gzip")
    plain = docker25_archive(tmp_path / "a.tar", [(layers, config, name)])
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    src = open_source("docker-archive:%s" % gz)
    assert len(src.layers) == 2


def test_parse_spec(tmp_path):
    assert parse_spec("docker-archive:/x/y.tar:reg:5000/a/b:1") == (
        "docker-archive", "/x/y.tar", "reg:5000/a/b:1")
    assert parse_spec("oci:/x/dir:1.0") == ("oci", "/x/dir", "1.0")
    assert parse_spec("oci:/x/dir") == ("oci", "/x/dir", None)
    with pytest.raises(ArchiveError, match="unsupported source"):
        parse_spec("tarball:/x")


# --- writing ------------------------------------------------------------

def _layout_image(tmp_path, compression="gzip", n=3):
    layout = tmp_path / "layout"
    layers = [im.make_layer({"d/%d" % i: os.urandom(100)}, compression) for i in range(n)]
    desc = im.build_image(layout, "1", layers, cmd=["/bin/sh"])
    manifest_raw = (layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
    manifest = oci.parse_manifest(manifest_raw, desc["mediaType"], desc["digest"])
    config = (layout / "blobs" / "sha256" / manifest.config.hex).read_bytes()
    paths = {l.digest: layout / "blobs" / "sha256" / l.hex for l in manifest.layers}
    return manifest, config, paths, layers


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_write_then_read_through_a_pipe(tmp_path, fmt):
    manifest, config, paths, layers = _layout_image(tmp_path)
    r, w = os.pipe()
    out = tmp_path / "x.tar"
    copier = threading.Thread(target=lambda: out.write_bytes(os.fdopen(r, "rb").read()))
    copier.start()
    with os.fdopen(w, "wb") as pipe:     # not seekable: must be a pure stream
        write_archive(pipe, manifest, config, paths, ["example.org/t/x:7"],
                      {oci.ANNOTATION_SOURCE: "example.org/t/x:7"}, fmt)
    copier.join()
    spec = ("docker-archive:%s" if fmt == "docker-archive" else "oci-archive:%s") % out
    src = open_source(spec)
    # the stored (compressed) blobs and the manifest come back unchanged
    assert src.manifest.digest == manifest.digest
    assert [l.descriptor.digest for l in src.layers] == [l.digest for l in layers]
    assert src.annotations[oci.ANNOTATION_REPOSITORY] == "t/x"
    with tarfile.open(out) as t:
        names = t.getnames()
    assert ("manifest.json" in names) == (fmt == "docker-archive")
    assert "index.json" in names and "oci-layout" in names


def test_write_refuses_a_corrupt_layer_file(tmp_path):
    manifest, config, paths, _ = _layout_image(tmp_path)
    victim = paths[manifest.layers[1].digest]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=manifest.layers[1].digest):
        write_archive(io.BytesIO(), manifest, config, paths)
    victim.write_bytes(bytes(data[:-5]))
    with pytest.raises(DigestMismatch, match="shorter"):
        write_archive(io.BytesIO(), manifest, config, paths)


def test_zstd_layers_are_written_plain_in_a_docker_archive_only(tmp_path):
    manifest, config, paths, layers = _layout_image(tmp_path, "zstd", n=2)
    docker, oci_tar = io.BytesIO(), io.BytesIO()
    write_archive(docker, manifest, config, paths, ["example.org/z:1"])
    write_archive(oci_tar, manifest, config, paths, ["example.org/z:1"], fmt="oci-archive")
    with tarfile.open(fileobj=io.BytesIO(docker.getvalue())) as t:
        entry = json.loads(t.extractfile("manifest.json").read())[0]
        assert entry["Layers"] == ["blobs/sha256/" + l.diff_id[7:] for l in layers]
        for member, layer in zip(entry["Layers"], layers):   # the plain tar itself
            assert "sha256:" + _hex(t.extractfile(member).read()) == layer.diff_id
    with tarfile.open(fileobj=io.BytesIO(oci_tar.getvalue())) as t:
        assert {l.digest[7:] for l in layers} <= {n.rpartition("/")[2] for n in t.getnames()}
    (tmp_path / "d.tar").write_bytes(docker.getvalue())
    src = open_source("docker-archive:%s" % (tmp_path / "d.tar"))     # diff_ids checked
    assert [l.descriptor.digest for l in src.layers] == [l.diff_id for l in layers]
    # a zstd layer file not holding its bytes: refused before anything is written
    victim = paths[manifest.layers[1].digest]
    victim.write_bytes(victim.read_bytes()[:-3])
    out = io.BytesIO()
    with pytest.raises(DigestMismatch, match=manifest.layers[1].digest):
        write_archive(out, manifest, config, paths)
    assert out.getvalue() == b""


# --- OCI layouts ----------------------------------------------------------

def test_oci_dir_by_tag_and_missing_blob(tmp_path):
    layout = tmp_path / "oci"
    l1 = [im.make_layer({"a": b"1"})]
    l2 = [im.make_layer({"b": b"2"}), im.make_layer({"c": b"3"})]
    im.build_image(layout, "one", l1)
    im.build_image(layout, "two", l2)
    with pytest.raises(ArchiveError, match="holds 2 images.*one.*two"):
        open_source("oci:%s" % layout)
    src = open_source("oci:%s:two" % layout)
    assert [l.descriptor.digest for l in src.layers] == [l.digest for l in l2]
    assert src.default_name == "oci"
    (layout / "blobs" / "sha256" / l2[1].digest.split(":")[1]).unlink()
    with pytest.raises(ArchiveError, match="missing from blobs"):
        open_source("oci:%s:two" % layout)


def test_oci_dir_blob_with_wrong_bytes(tmp_path):
    layout = tmp_path / "oci"
    layers = [im.make_layer({"a": b"1"})]
    im.build_image(layout, "t", layers)
    blob = layout / "blobs" / "sha256" / layers[0].digest.split(":")[1]
    blob.write_bytes(im.make_layer({"a": b"2"}).data)
    with pytest.raises(DigestMismatch, match="does not match its digest"):
        open_source("oci:%s" % layout)


def test_oci_dir_platform_index(tmp_path):
    layout = tmp_path / "oci"
    descs = []
    for arch in ("arm64", "amd64"):
        layers = [im.make_layer({"arch": arch.encode()})]
        descs.append(im.write_image(layout, layers, im.image_config(layers, architecture=arch)))
    im.tag(layout, im.write_index(layout, descs), "multi")
    src = open_source("oci:%s:multi" % layout, platform=oci.Platform("linux", "arm64"))
    assert json.loads(src.config_raw)["architecture"] == "arm64"


# --- bad input: every case one clear error --------------------------------

def _evil(tmp_path, *members):
    """A classic archive of a valid image plus ``members`` (name, kw) added."""
    path = classic_archive(tmp_path / "evil.tar", [make_image(1)])
    with tarfile.open(path, "a") as tar:
        for name, kw in members:
            _add(tar, name, kw.pop("data", b""), **kw)
    return path


@pytest.mark.parametrize("member,pattern", [
    (("/etc/passwd", {"data": b"x"}), "absolute path"),
    (("../../outside.txt", {"data": b"x"}), r"leaves the archive"),
    (("a/../../outside.txt", {"data": b"x"}), r"leaves the archive"),
    (("dev/null", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}), "device node"),
    (("dev/sda", {"type": tarfile.BLKTYPE}), "device node"),
    (("fifo", {"type": tarfile.FIFOTYPE}), "device node, FIFO"),
    (("link", {"type": tarfile.SYMTYPE, "linkname": "/etc/shadow"}), "absolute path"),
    (("a/link", {"type": tarfile.SYMTYPE, "linkname": "../../etc/shadow"}),
     "leaves the archive"),
    (("hard", {"type": tarfile.LNKTYPE, "linkname": "../x"}), "leaves the archive"),
    (("manifest.json", {"data": b"[]"}), "appears twice"),
])
def test_unsafe_members_are_refused(tmp_path, member, pattern):
    name, kw = member
    path = _evil(tmp_path, (name, dict(kw)))
    cwd = os.getcwd()
    with pytest.raises(ArchiveError, match=pattern):
        open_source("docker-archive:%s" % path)
    assert not (tmp_path / "outside.txt").exists() and os.getcwd() == cwd


def test_symlinked_layer_escaping_is_refused(tmp_path):
    layers, config, name = make_image(1)
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "l/layer.tar", type=tarfile.SYMTYPE, linkname="../../../etc/passwd")
        _add(tar, _hex(config) + ".json", config)
        _add(tar, "manifest.json", json.dumps([{"Config": _hex(config) + ".json",
                                                "RepoTags": [name],
                                                "Layers": ["l/layer.tar"]}]).encode())
    with pytest.raises(ArchiveError, match="leaves the archive"):
        open_source("docker-archive:%s" % path)


@pytest.mark.parametrize("where", ["layer", "manifest.json", "header"])
def test_truncated_archive(tmp_path, where):
    path = classic_archive(tmp_path / "a.tar", [make_image(2)])
    with tarfile.open(path) as t:
        m = t.getmember(_first_layer(path) if where == "layer" else "manifest.json")
    cut = m.offset + 100 if where == "header" else m.offset_data + m.size // 2
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ArchiveError, match="truncated|corrupt|does not contain|not a docker"):
        open_source("docker-archive:%s" % path)


def test_truncated_gzipped_archive(tmp_path):
    path = classic_archive(tmp_path / "a.tar", [make_image(2)])
    gz = tmp_path / "a.tar.gz"
    data = gzip.compress(path.read_bytes())
    gz.write_bytes(data[:len(data) // 2])
    with pytest.raises(ArchiveError, match="truncated|corrupt"):
        open_source("docker-archive:%s" % gz)


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(ArchiveError, match="not a readable tar"):
        open_source("docker-archive:%s" % junk)
    with pytest.raises(ArchiveError, match="does not exist"):
        open_source("docker-archive:%s" % (tmp_path / "nope.tar"))
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(ArchiveError, match="no manifest.json or index.json"):
        open_source("docker-archive:%s" % empty)


def _rewrite(path, out, change):
    """Copy tar ``path`` to ``out`` with ``change(name, data) -> data|None`` applied."""
    with tarfile.open(path) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isreg() else None
            if data is not None:
                new = change(m.name, data)
                if new is None:
                    continue
                m.size = len(new)
                dst.addfile(m, io.BytesIO(new))
            else:
                dst.addfile(m)
    return out


def test_manifest_refers_to_missing_layer(tmp_path):
    path = classic_archive(tmp_path / "a.tar", [make_image(2)])
    first = _first_layer(path)
    bad = _rewrite(path, tmp_path / "b.tar", lambda n, d: None if n == first else d)
    with pytest.raises(ArchiveError, match="does not contain"):
        open_source("docker-archive:%s" % bad)


def _first_layer(path):
    with tarfile.open(path) as t:
        return json.loads(t.extractfile("manifest.json").read())[0]["Layers"][0]


def test_missing_config_and_malformed_manifest(tmp_path):
    path = classic_archive(tmp_path / "a.tar", [make_image(1)])
    bad = _rewrite(path, tmp_path / "b.tar",
                   lambda n, d: None if n.endswith(".json") and n != "manifest.json" else d)
    with pytest.raises(ArchiveError, match="does not contain"):
        open_source("docker-archive:%s" % bad)
    bad2 = _rewrite(path, tmp_path / "c.tar",
                    lambda n, d: b'{"not": "a list"}' if n == "manifest.json" else d)
    with pytest.raises(ArchiveError, match="manifest.json is malformed"):
        open_source("docker-archive:%s" % bad2)
    bad3 = _rewrite(path, tmp_path / "d.tar",
                    lambda n, d: b"{oops" if n == "manifest.json" else d)
    with pytest.raises(ArchiveError, match="not valid JSON"):
        open_source("docker-archive:%s" % bad3)


def test_diff_id_mismatch(tmp_path):
    path = classic_archive(tmp_path / "a.tar", [make_image(2)])
    other = im.layer_tar({"f0.txt": b"tampered\n"})
    bad = _rewrite(path, tmp_path / "b.tar",
                   lambda n, d: other if n == _first_layer(path) else d)
    with pytest.raises(DigestMismatch, match="diff_id"):
        open_source("docker-archive:%s" % bad)


def test_config_not_matching_its_name(tmp_path):
    path = classic_archive(tmp_path / "a.tar", [make_image(1)])
    bad = _rewrite(path, tmp_path / "b.tar", lambda n, d: d.replace(b"/bin/sh", b"/bin/xx")
                   if n.endswith(".json") and n != "manifest.json" and "/" not in n else d)
    with pytest.raises(ArchiveError, match="does not hash to its name"):
        open_source("docker-archive:%s" % bad)


def test_docker25_blob_not_matching_its_name(tmp_path):
    layers, config, name = make_image(2)
    path = docker25_archive(tmp_path / "a.tar", [(layers, config, name)])
    target = "blobs/sha256/" + layers[0].diff_id.split(":")[1]
    bad = _rewrite(path, tmp_path / "b.tar",
                   lambda n, d: d[:-1] + b"\x01" if n == target else d)
    with pytest.raises(DigestMismatch, match="does not match its digest"):
        open_source("docker-archive:%s" % bad)


def test_corrupt_gzip_layer(tmp_path):
    layers, config, name = make_image(1, "gzip")
    layout = tmp_path / "oci"
    blob = bytearray(layers[0].data)
    blob[len(blob) // 2] ^= 0xff
    bad_layer = im.Layer(bytes(blob), im.sha256(bytes(blob)), layers[0].diff_id,
                         "gzip", layers[0].media_type)
    im.build_image(layout, "t", [bad_layer])
    with pytest.raises((ArchiveError, DigestMismatch), match="corrupt|diff_id"):
        open_source("oci:%s" % layout)


def test_import_errors_are_udocker_errors():
    assert issubclass(ArchiveError, UdockerError)
    assert issubclass(DigestMismatch, UdockerError)


def test_tar_reader_never_extracts(tmp_path):
    path = _evil(tmp_path, ("ok.txt", {"data": b"fine"}))
    before = set(os.listdir(tmp_path))
    with TarReader(path) as r:
        assert r.read("ok.txt") == b"fine"
    assert set(os.listdir(tmp_path)) == before
    with DirReader(tmp_path) as d:
        with pytest.raises(ArchiveError, match="leaves the archive"):
            d.read("../etc/passwd")


def test_skopeo_reads_our_archives(tmp_path):
    manifest, config, paths, _ = _layout_image(tmp_path)
    for fmt in ("docker-archive", "oci-archive"):
        out = tmp_path / (fmt + ".tar")
        with open(out, "wb") as f:
            write_archive(f, manifest, config, paths, ["example.org/t/x:7"], {}, fmt)
        res = subprocess.run(["skopeo", "inspect", "%s:%s" % (fmt, out)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        info = json.loads(res.stdout)
        assert len(info["Layers"]) == 3


def test_verified_layers_are_copied_by_the_kernel_into_the_same_bytes(tmp_path):
    """Layers the caller verified go in by os.sendfile (or, where the kernel refuses,
    e.g. an O_APPEND file, by read/write): the archive is the same bytes as the one
    written hashing every layer through Python; a verified file that has shrunk since is
    still refused."""
    manifest, config, paths, _ = _layout_image(tmp_path)
    ref = io.BytesIO()
    write_archive(ref, manifest, config, paths, ["example.org/t/x:7"])
    verified = {l.digest for l in manifest.layers}
    for mode in ("wb", "ab"):
        out = tmp_path / ("out-" + mode)
        with open(out, mode) as f:
            write_archive(f, manifest, config, paths, ["example.org/t/x:7"],
                          verified=verified)
        assert out.read_bytes() == ref.getvalue(), mode
    victim = paths[manifest.layers[1].digest]
    victim.write_bytes(victim.read_bytes()[:-5])
    with open(tmp_path / "short", "wb") as f, \
            pytest.raises(DigestMismatch, match="shorter"):
        write_archive(f, manifest, config, paths, verified=verified)
