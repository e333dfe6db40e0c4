"""OCI image layouts as image sources: a directory (``oci:DIR``) or a tar.

An OCI layout names its images in ``index.json``; each entry may carry an
``org.opencontainers.image.ref.name`` annotation (the tag skopeo's
``oci:DIR:TAG`` selects) and may point to a multi-platform index, resolved
for the host's platform.  The same parser reads a directory
(:class:`DirReader`) and a tar (an ``oci-archive`` or a Docker >= 25
``docker save`` archive without ``manifest.json``) through
:class:`.docker_archive.TarReader`.  Nothing is extracted or written here.

It also holds what every local image source shares: the
:class:`ArchiveImage` a reader returns, member-name safety checks
(:func:`_normalize`), and choosing one image by name (:func:`choose`).
"""
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .. import oci
from ..digest import Digest
from ..errors import ArchiveError, InvalidDigest, InvalidReference, UdockerError
from ..reference import parse_reference

MAX_JSON = 64 << 20          # refuse absurd JSON members (manifest, config)
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"


# --- the image an archive (or OCI directory) holds ------------------------

@dataclass
class ArchiveLayer:
    """One layer as found in an archive: where its bytes are, what they are."""
    member: str                       # path inside the archive / directory
    diff_id: str                      # sha256 of the uncompressed tar (config)
    size: Optional[int] = None        # bytes stored (None: member size)
    digest: Optional[str] = None      # sha256 of the stored bytes, if declared
    media_type: Optional[str] = None  # declared media type, if any


@dataclass
class ArchiveImage:
    """What a reader found: config bytes, layers, names, provenance hints."""
    config_raw: bytes
    layers: List[ArchiveLayer]
    repo_tags: List[str] = field(default_factory=list)
    manifest: Optional[oci.Manifest] = None   # the stored manifest, if any
    annotations: Dict[str, str] = field(default_factory=dict)
    repo_digests: List[str] = field(default_factory=list)

    @property
    def config(self):
        return json.loads(self.config_raw)


def _normalize(name, what="member"):
    """Archive-relative POSIX path, or ArchiveError if it is unsafe."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise ArchiveError("unsafe archive: %s %r is an absolute path"
                           % (what, name))
    if "\\" in name or "\x00" in name:
        raise ArchiveError("unsafe archive: %s %r has a backslash or NUL"
                           % (what, name))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError("unsafe archive: %s %r leaves the archive (..)"
                           % (what, name))
    return "/".join(parts)


def check_digest(digest, where):
    """``digest`` as a Digest, else ArchiveError naming ``where``."""
    try:
        return Digest(digest)
    except InvalidDigest:
        raise ArchiveError("%s: unsupported or malformed digest %r (only "
                           "sha256 is supported)" % (where, digest)) from None


# --- choosing an image by name -------------------------------------------

def normalize_name(name):
    """``busybox`` -> ``docker.io/library/busybox:latest``; None if invalid."""
    try:
        ref = parse_reference(name)
    except InvalidReference:
        return None
    return "%s/%s:%s" % (ref.registry, ref.repository, ref.tag or "latest")


def choose(entries, wanted, names_of, where):
    """The one entry whose names include ``wanted`` (or the only entry)."""
    if wanted:
        key = normalize_name(wanted) or wanted
        hits = [e for e in entries
                if key in {normalize_name(n) or n for n in names_of(e)}]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ArchiveError("%s holds no image named %s; it holds: %s"
                               % (where, wanted, _listing(entries, names_of)))
        raise ArchiveError("%s holds several images named %s" % (where, wanted))
    if len(entries) == 1:
        return entries[0]
    if not entries:
        raise ArchiveError("%s holds no image" % where)
    raise ArchiveError("%s holds %d images; choose one by appending :NAME:TAG "
                       "to the source (%s)" % (where, len(entries),
                                               _listing(entries, names_of)))


def _listing(entries, names_of):
    out = []
    for i, e in enumerate(entries):
        names = names_of(e)
        out.append(", ".join(names) if names else "untagged image #%d" % (i + 1))
    return "; ".join(out) or "nothing"



# --- OCI layouts -------------------------------------------------------------



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
