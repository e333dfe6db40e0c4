"""OCI image layouts as image sources: a directory (``oci:DIR``) or a tar.

An OCI layout names its images in ``index.json``; each entry may carry an
``org.opencontainers.image.ref.name`` annotation (the tag skopeo's
``oci:DIR:TAG`` selects) and may point to a multi-platform index, resolved
for the host's platform.  The layout itself is read by
:class:`..dataset.layout.OCILayout` through a member reader
(:mod:`..members`): a directory, or a tar (an ``oci-archive`` or a Docker
>= 25 ``docker save`` archive without ``manifest.json``).  Nothing is
extracted or written here.

It also holds what every local image source shares: the
:class:`ArchiveImage` a reader returns and choosing one image by name
(:func:`choose`).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .. import oci
from ..dataset.layout import OCILayout, blob_name
from ..errors import ArchiveError, InvalidReference
from ..members import DirReader  # noqa: F401 (re-exported)
from ..reference import parse_reference

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
    layout = OCILayout(reader, ArchiveError)
    where = "OCI layout %s" % reader.path
    top = choose(layout.entries(), wanted, _names, where)
    source = layout.source_descriptor(top)    # a Docker manifest we exported
    manifest = layout.resolve(source, platform)
    config_raw, config = layout.read_config(manifest)
    if len(config.diff_ids) != len(manifest.layers):
        raise ArchiveError("%s: config lists %d diff_ids but the manifest %d "
                           "layers" % (where, len(config.diff_ids),
                                       len(manifest.layers)))
    layers = []
    for layer, diff_id in zip(manifest.layers, config.diff_ids):
        if not layout.has_blob(layer.digest):
            raise ArchiveError("%s: the image refers to layer %s, which is "
                               "missing from blobs/" % (where, layer.digest))
        layers.append(ArchiveLayer(blob_name(layer.digest), diff_id,
                                   layer.size, layer.digest, layer.media_type))
    names = [n for n in _names(top) if ":" in n or "/" in n]
    return ArchiveImage(config_raw, layers, names, manifest,
                        dict(source.annotations))
