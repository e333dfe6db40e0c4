"""Which images of a dataset follow a registry tag (``udocker-import --update``).

An image imported from a registry by tag records, in the annotations of its
layout's ``index.json`` (see :mod:`..registry.source`), the reference it was
imported as and the digest the registry answered with.  Updating re-resolves
that reference (same platform) and hands the result to ``store_image`` with
the same path and name: the store then says ``notneeded`` when the manifest
is unchanged, and otherwise downloads only the layers the annex lacks.

Not updated, and the result says why:

- an image imported by digest (``repo@sha256:...``): pinning is explicit;
- an image imported from an archive (``docker-archive:``, ``oci:``...),
  including one whose manifest was rebuilt from an archive's layers: it
  follows no registry tag (importing the tag from the registry does);
- a container that datalad-udocker did not import (no OCI layout).
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .. import oci
from ..errors import InvalidReference, NotFoundError, UdockerError
from ..reference import Reference, parse_reference
from .layout import OCILayout

ARCHIVE_TRANSPORTS = ("docker-archive:", "oci-archive:", "oci:")
_IMAGE_KEY = re.compile(r"^datalad\.containers\.(.+)\.image$")


class NotTracking(UdockerError):
    """The image follows no registry tag (pinned, from an archive, foreign)."""


@dataclass
class TrackedImage:
    """A container of the dataset that follows a registry tag."""
    name: str
    path: Path                     # the layout directory (absolute)
    reference: Reference           # the recorded tag reference, no digest
    platform: Optional[str]        # recorded platform, e.g. linux/amd64
    manifest_digest: str           # what the dataset holds now


def container_names(ds) -> List[str]:
    """Names of the containers registered in the dataset, sorted."""
    ds.config.reload()
    return sorted({m.group(1) for m in map(_IMAGE_KEY.match, ds.config.keys())
                   if m})


def tracked_image(ds, name) -> TrackedImage:
    """The tag container ``name`` follows; NotTracking saying why if none.

    Raises NotFoundError for a name the dataset does not have.
    """
    ds.config.reload()
    relpath = ds.config.get("datalad.containers.%s.image" % name)
    if not relpath:
        raise NotFoundError(
            "no container named %r in %s; `datalad containers-list` shows "
            "the ones it has" % (name, ds.path))
    layout = OCILayout(Path(ds.path) / relpath)
    if not layout.exists():
        raise NotTracking(
            "container %r (%s) was not imported by datalad-udocker: nothing "
            "to update" % (name, relpath))
    desc = layout.manifest_descriptor()
    ann = desc.annotations
    source = ann.get(oci.ANNOTATION_SOURCE) or ""
    if source.startswith(ARCHIVE_TRANSPORTS):
        raise NotTracking(
            "container %r was imported from an archive (%s) and follows no "
            "registry tag; to follow one, import it from the registry: "
            "datalad udocker-import -n %s REF '%s'" % (name, source, name,
                                                      relpath))
    try:
        ref = parse_reference(source)
    except InvalidReference:
        raise NotTracking("container %r records no registry reference "
                          "(%s is not one): nothing to update"
                          % (name, source or "none")) from None
    if ref.digest:
        raise NotTracking(
            "container %r is pinned to digest %s (imported as %s) and is never "
            "updated; to change it, import another reference: datalad "
            "udocker-import -n %s REF '%s'" % (name, ref.digest, source, name,
                                              relpath))
    if not ann.get(oci.ANNOTATION_SOURCE_DIGEST):
        raise NotTracking(
            "container %r was stored from an archive with layers from %s, not "
            "as the registry's image; to follow the tag, import it: datalad "
            "udocker-import -n %s %s '%s'" % (name, source, name, source,
                                             relpath))
    return TrackedImage(name, layout.path, ref,
                        ann.get(oci.ANNOTATION_PLATFORM) or None, desc.digest)
