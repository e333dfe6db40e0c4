"""OCI image layouts as image sources: a directory (``oci:DIR``) or a tar.

An OCI layout names its images in ``index.json``; each entry may carry an
``org.opencontainers.image.ref.name`` annotation (the tag skopeo's
``oci:DIR:TAG`` selects) and may point to a multi-platform index, resolved
for the host's platform.  The same parser reads a directory
(:class:`DirReader`) and a tar (an ``oci-archive`` or a Docker >= 25
``docker save`` archive without ``manifest.json``) through
:class:`.docker_archive.TarReader`.  Nothing is extracted or written here.
"""
import json
import os

from . import oci
from .docker_archive import (ANNOTATION_CONTAINERD_NAME, MAX_JSON,
                             ArchiveError, ArchiveImage, ArchiveLayer,
                             _normalize, check_digest, choose)
from .errors import UdockerError


class DirReader:
    """Read files of a directory by archive-style relative names.

    Names are checked like archive members (no absolute paths, no ``..``);
    symlinks are followed (a dataset's layout has annexed layers), since
    nothing here writes anywhere.
    """

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isdir(self.path):
            raise ArchiveError("%s is not a directory holding an OCI image "
                               "layout" % self.path)

    def _p(self, name):
        return os.path.join(self.path, *_normalize(name).split("/"))

    def exists(self, name):
        return os.path.isfile(self._p(name))

    def size(self, name):
        return os.stat(self._p(name)).st_size

    def open(self, name):
        try:
            return open(self._p(name), "rb")
        except OSError as exc:
            raise ArchiveError("cannot read %s from %s: %s"
                               % (name, self.path, exc.strerror))

    def read(self, name, limit=MAX_JSON):
        if not self.exists(name):
            raise ArchiveError("%s refers to %r, which it does not contain "
                               "(layer content not present? try `datalad "
                               "get`)" % (self.path, name))
        if self.size(name) > limit:
            raise ArchiveError("%s: %r is too large" % (self.path, name))
        with self.open(name) as f:
            return f.read()

    def read_json(self, name):
        try:
            return json.loads(self.read(name))
        except ValueError:
            raise ArchiveError("%s in %s is not valid JSON" % (name, self.path))

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _blob(reader, desc, what):
    check_digest(desc.digest, "%s: %s" % (reader.path, what))
    name = "blobs/sha256/" + desc.hex
    if not reader.exists(name):
        raise ArchiveError("%s: the image refers to %s %s, which is missing "
                           "from blobs/" % (reader.path, what, desc.digest))
    return name


def _names(desc):
    ann = desc.annotations
    return [n for n in (ann.get(oci.ANNOTATION_REF_NAME),
                        ann.get(ANNOTATION_CONTAINERD_NAME)) if n]


def read_oci_layout(reader, wanted=None, platform=None):
    """Parse the OCI layout behind ``reader`` into an ArchiveImage.

    ``wanted`` selects an index entry by its ref.name (a tag such as
    ``1.0``) or its full name; ``platform`` (an oci.Platform, default the
    host's) resolves a multi-platform index.
    """
    where = "OCI layout %s" % reader.path
    if not reader.exists("index.json"):
        raise ArchiveError("%s has no index.json: not an OCI image layout"
                           % reader.path)
    index = reader.read_json("index.json")
    try:
        entries = [oci.Descriptor.from_dict(e) for e in index["manifests"]]
    except (KeyError, TypeError, ValueError):
        raise ArchiveError("%s: index.json is malformed" % where)
    top = choose(entries, wanted, _names, where)
    desc = top
    for _ in range(4):       # nested indexes
        raw = reader.read(_blob(reader, desc, "manifest"))
        try:
            parsed = oci.parse_manifest(raw, desc.media_type, desc.digest)
        except UdockerError as exc:
            raise ArchiveError("%s: manifest %s: %s" % (where, desc.digest, exc))
        if isinstance(parsed, oci.Manifest):
            break
        desc = parsed.select(platform or oci.host_platform())
    else:
        raise ArchiveError("%s: indexes nested too deeply" % where)
    manifest = parsed
    config_raw = reader.read(_blob(reader, manifest.config, "config"))
    try:
        config = json.loads(config_raw)
        diff_ids = list(config["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError):
        raise ArchiveError("%s: config %s is malformed (no rootfs.diff_ids)"
                           % (where, manifest.config.digest))
    if len(diff_ids) != len(manifest.layers):
        raise ArchiveError("%s: config lists %d diff_ids but the manifest %d "
                           "layers" % (where, len(diff_ids),
                                       len(manifest.layers)))
    layers = []
    for layer, diff_id in zip(manifest.layers, diff_ids):
        check_digest(diff_id, "%s: config diff_id" % where)
        layers.append(ArchiveLayer(_blob(reader, layer, "layer"), diff_id,
                                   layer.size, layer.digest, layer.media_type))
    names = [n for n in _names(top) if ":" in n or "/" in n]
    return ArchiveImage(config_raw, layers, names, manifest,
                        dict(top.annotations))
