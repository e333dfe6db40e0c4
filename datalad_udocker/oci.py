"""The OCI / Docker image vocabulary: descriptors, manifests, indexes, platforms.

Pure data, no I/O.  Both Docker (v2 schema 2, manifest list) and OCI media
types are understood; everything else is refused with UnsupportedMediaType.
"""
import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .digest import Digest, check_digest, check_size, sha256_digest
from .errors import (DigestMismatch, MalformedImage, PlatformNotFound,
                     UnsupportedMediaType)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

# layer media type -> compression ("gzip", "zstd" or None)
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

# annotations written into a layout's index.json to remember the source
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_SOURCE = "org.datalad.udocker.source"          # registry/repo:tag
ANNOTATION_REGISTRY = "org.datalad.udocker.registry"
ANNOTATION_REPOSITORY = "org.datalad.udocker.repository"
ANNOTATION_TAG = "org.datalad.udocker.tag"
ANNOTATION_SOURCE_DIGEST = "org.datalad.udocker.source-digest"  # top-level digest
ANNOTATION_PLATFORM = "org.datalad.udocker.platform"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: Optional[str] = None

    @classmethod
    def parse(cls, text):
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise PlatformNotFound(
                "invalid platform %r: use OS/ARCH[/VARIANT], e.g. linux/arm64"
                % text)
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_dict(cls, d, what="platform"):
        d = _object(d, what)
        return cls(_string(d, "os", what), _string(d, "architecture", what),
                   _string(d, "variant", what) or None)

    def matches(self, other):
        """Does ``other`` (an index entry's platform) satisfy this request?"""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return self.variant is None or self.variant == other.variant

    def __str__(self):
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm",
                 "armv6l": "arm", "i686": "386", "i386": "386",
                 "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform():
    """This machine's platform, named as registries name it."""
    machine = _platform.machine().lower()
    arch = _ARCH_ALIASES.get(machine, machine)
    variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine)
    return Platform("linux", arch, variant)


@dataclass(frozen=True)
class Descriptor:
    """A blob's media type, :class:`~.digest.Digest` and size.

    The digest is checked when the descriptor is made (InvalidDigest), so
    every descriptor holds a Digest whatever made it.
    """
    media_type: str
    digest: Digest
    size: int
    platform: Optional[Platform] = None
    annotations: Dict[str, str] = field(default_factory=dict, hash=False)
    urls: Tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "digest", Digest(self.digest))

    @classmethod
    def from_dict(cls, d, what="descriptor"):
        """A descriptor from JSON, every field checked (MalformedImage).

        The digest must be ``sha256:<64 hex>`` and the size a non-negative
        int below MAX_BLOB_SIZE: nothing downstream ever sees other values.
        """
        d = _object(d, what)
        plat = d.get("platform")
        annotations = _object(d.get("annotations") or {}, what + " annotations")
        if not all(isinstance(v, str) for v in annotations.values()):
            raise MalformedImage("malformed %s: an annotation is not a string" % what)
        return cls(_string(d, "mediaType", what),
                   check_digest(d.get("digest"), what + " digest"),
                   check_size(d.get("size"), what + " size"),
                   Platform.from_dict(plat, what + " platform") if plat else None,
                   dict(annotations),
                   tuple(_strings(d.get("urls") or [], what + " urls")))

    def to_dict(self):
        out = {"mediaType": self.media_type, "digest": self.digest,
               "size": self.size}
        if self.platform:
            out["platform"] = {k: v for k, v in (
                ("architecture", self.platform.architecture),
                ("os", self.platform.os),
                ("variant", self.platform.variant)) if v}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @property
    def hex(self):
        return self.digest.hex


@dataclass(frozen=True)
class Manifest:
    """An image manifest (one platform): the config and the ordered layers."""
    media_type: str
    config: Descriptor
    layers: Tuple[Descriptor, ...]
    raw: bytes
    digest: Digest

    def blobs(self):
        return (self.config,) + self.layers


@dataclass(frozen=True)
class Index:
    """An OCI index or Docker manifest list."""
    media_type: str
    manifests: Tuple[Descriptor, ...]
    raw: bytes
    digest: Digest

    def platforms(self):
        return [str(m.platform) for m in self.manifests if m.platform]

    def select(self, wanted):
        """The manifest descriptor for platform ``wanted`` (a Platform)."""
        for m in self.manifests:
            if m.platform and m.platform.os != "unknown" and wanted.matches(m.platform):
                return m
        raise PlatformNotFound(
            "no image for platform %s; available: %s (choose one with "
            "--platform)" % (wanted, ", ".join(
                p for p in self.platforms() if "unknown" not in p) or "none"))


def _object(value, what):
    if not isinstance(value, dict):
        raise MalformedImage("malformed %s: not a JSON object" % what)
    return value


def _string(d, key, what, default=""):
    value = d.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise MalformedImage("malformed %s: field %s is not a string" % (what, key))
    return value


def _strings(value, what):
    if not isinstance(value, list) or not all(isinstance(v, str)
                                              for v in value):
        raise MalformedImage("malformed %s: not a list of strings" % what)
    return value


def _list(d, key, what):
    value = d.get(key)
    if not isinstance(value, list):
        raise MalformedImage("malformed %s: %s is %s, not a list" % (
            what, key, "missing" if value is None else type(value).__name__))
    return value


def load_json_object(raw, what):
    """``raw`` (bytes or str) parsed as a JSON object, else MalformedImage.

    Deep nesting, invalid UTF-8, numbers Python will not convert and
    anything that is not an object all end in MalformedImage.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError, TypeError):
        raise MalformedImage("malformed %s: not valid JSON" % what) from None
    return _object(doc, what)


def media_type_of(raw, declared=None):
    """The media type of manifest bytes: the declared one, else from content."""
    doc = load_json_object(raw, "manifest")
    mt = doc.get("mediaType") or declared
    if not isinstance(mt, (str, type(None))):
        raise MalformedImage("malformed manifest: mediaType is not a string")
    if not mt or mt in ("application/json", "text/plain"):
        mt = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if mt not in MANIFEST_TYPES + INDEX_TYPES:
        raise UnsupportedMediaType(
            "unsupported manifest media type %s (only OCI and Docker v2 "
            "schema 2 images are supported)" % mt)
    return mt, doc


def parse_manifest(raw, declared_media_type=None, expected_digest=None):
    """Parse manifest or index bytes into a Manifest or an Index.

    ``expected_digest`` is checked against the bytes as given.
    """
    digest = sha256_digest(raw)
    if expected_digest and expected_digest != digest:
        raise DigestMismatch("manifest digest is %s, expected %s"
                             % (digest, expected_digest))
    mt, doc = media_type_of(raw, declared_media_type)
    if mt in INDEX_TYPES:
        return Index(mt, tuple(
            Descriptor.from_dict(m, "index entry %d" % i)
            for i, m in enumerate(_list(doc, "manifests", "index"))),
            raw, digest)
    return Manifest(mt, Descriptor.from_dict(doc.get("config"),
                                             "manifest config"),
                    tuple(Descriptor.from_dict(l, "layer %d" % i) for i, l
                          in enumerate(_list(doc, "layers", "manifest"))),
                    raw, digest)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config this package uses, checked.

    ``diff_ids`` are the uncompressed layer digests (``rootfs.diff_ids``);
    ``config`` the run settings (Env, Entrypoint, Cmd, WorkingDir, User...)
    and ``doc`` the whole JSON object.
    """
    platform: Platform
    diff_ids: Tuple[str, ...]
    config: Dict = field(hash=False)
    doc: Dict = field(hash=False)


# run settings: key -> the check its value must pass (None is allowed)
_RUN_FIELDS = {"Env": "strings", "Entrypoint": "strings", "Cmd": "strings",
               "WorkingDir": "string", "User": "string"}


def parse_config(raw, what="image config"):
    """Parse image config bytes into an ImageConfig, else MalformedImage.

    The platform is read here only: a config without ``os`` is a Linux
    image, as Docker takes it.
    """
    doc = load_json_object(raw, what)
    platform = Platform.from_dict(doc, what)
    if not platform.os:
        platform = Platform("linux", platform.architecture, platform.variant)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        raise MalformedImage("malformed %s: no rootfs object (a well-formed image "
                             "config lists its layers in rootfs.diff_ids)"
                             % what)
    diff_ids = tuple(check_digest(d, "%s diff_id" % what)
                     for d in _list(rootfs, "diff_ids", what + " rootfs"))
    run = doc.get("config") or {}
    _object(run, what + " config section")
    for key, kind in _RUN_FIELDS.items():
        value = run.get(key)
        if value is None:
            continue
        if kind == "string" and not isinstance(value, str):
            raise MalformedImage("malformed %s: field config.%s is not a string"
                                 % (what, key))
        if kind == "strings":
            _strings(value, "%s field config.%s" % (what, key))
    return ImageConfig(platform, diff_ids, run, doc)


def check_layers_supported(manifest):
    """Refuse foreign, non-distributable or unknown layer media types."""
    for layer in manifest.layers:
        if layer.media_type in FOREIGN_LAYER_TYPES or layer.urls:
            raise UnsupportedMediaType(
                "layer %s is a foreign/non-distributable layer (%s): its "
                "bytes are not in the registry; such images cannot be stored"
                % (layer.digest, layer.media_type))
        if layer.media_type not in LAYER_TYPES:
            raise UnsupportedMediaType(
                "layer %s has unsupported media type %s (supported: gzip, "
                "zstd and uncompressed tar layers)"
                % (layer.digest, layer.media_type))


def layer_compression(media_type):
    return LAYER_TYPES.get(media_type)


# --- OCI re-descriptions of Docker images ----------------------------------

# the OCI layer media type for each compression
OCI_LAYER_TYPES = {None: "application/vnd.oci.image.layer.v1.tar",
                   "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                   "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
# on the index.json entry of an OCI manifest that re-describes another
# manifest (a Docker v2s2 one) over the same blobs: that manifest's digest
ANNOTATION_MANIFEST = "org.datalad.udocker.manifest"


def oci_layer_type(media_type):
    """The OCI layer media type of a (Docker or OCI) layer media type."""
    return OCI_LAYER_TYPES[layer_compression(media_type)]


def build_oci_manifest(config, layers, annotations=None):
    """An OCI image Manifest over ``config`` and ``layers`` (Descriptors),
    its bytes deterministic (the same blobs give the same digest)."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": config.digest,
                      "size": config.size},
           "layers": [Descriptor(oci_layer_type(l.media_type), l.digest,
                                 l.size, annotations=l.annotations).to_dict()
                      for l in layers]}
    if annotations:
        doc["annotations"] = dict(annotations)
    raw = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    return parse_manifest(raw, OCI_MANIFEST)


def as_oci_manifest(manifest):
    """``manifest`` if it is an OCI one, else the OCI manifest over the same
    config and layer blobs (what ``skopeo copy`` to ``oci:`` writes)."""
    if manifest.media_type == OCI_MANIFEST:
        return manifest
    return build_oci_manifest(manifest.config, manifest.layers)


def describes_same_blobs(a, b):
    """Do the manifests ``a`` and ``b`` name the same config and layers?"""
    return (a.config.digest == b.config.digest
            and [(l.digest, l.size) for l in a.layers]
            == [(l.digest, l.size) for l in b.layers])
