"""The OCI / Docker image vocabulary: descriptors, manifests, indexes, platforms.

Pure data, no I/O.  Both Docker (v2 schema 2, manifest list) and OCI media
types are understood; everything else is refused with UnsupportedMediaType.
"""
import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .digest import sha256_digest
from .errors import DigestMismatch, PlatformNotFound, UnsupportedMediaType

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
    def from_dict(cls, d):
        return cls(d.get("os", ""), d.get("architecture", ""),
                   d.get("variant") or None)

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
    media_type: str
    digest: str
    size: int
    platform: Optional[Platform] = None
    annotations: Dict[str, str] = field(default_factory=dict, hash=False)
    urls: Tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d):
        plat = d.get("platform")
        return cls(d.get("mediaType", ""), d["digest"], int(d["size"]),
                   Platform.from_dict(plat) if plat else None,
                   dict(d.get("annotations") or {}), tuple(d.get("urls") or ()))

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
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class Manifest:
    """An image manifest (one platform): the config and the ordered layers."""
    media_type: str
    config: Descriptor
    layers: Tuple[Descriptor, ...]
    raw: bytes
    digest: str

    def blobs(self):
        return (self.config,) + self.layers


@dataclass(frozen=True)
class Index:
    """An OCI index or Docker manifest list."""
    media_type: str
    manifests: Tuple[Descriptor, ...]
    raw: bytes
    digest: str

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


def media_type_of(raw, declared=None):
    """The media type of manifest bytes: the declared one, else from content."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise UnsupportedMediaType("manifest is not valid JSON")
    if not isinstance(doc, dict):
        raise UnsupportedMediaType("manifest is not a JSON object")
    mt = doc.get("mediaType") or declared
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
    try:
        if mt in INDEX_TYPES:
            return Index(mt, tuple(Descriptor.from_dict(m)
                                   for m in doc.get("manifests", [])),
                         raw, digest)
        return Manifest(mt, Descriptor.from_dict(doc["config"]),
                        tuple(Descriptor.from_dict(l) for l in doc["layers"]),
                        raw, digest)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedMediaType("malformed %s manifest: missing %s"
                                   % (mt, exc))


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
