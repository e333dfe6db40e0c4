"""Local images (``docker save`` archives, OCI layouts) as ImageSources.

``open_source(spec, source_ref, client_factory)`` accepts skopeo's syntax:

``docker-archive:FILE[:NAME:TAG]``   a ``docker save`` tarball (both flavours)
``oci-archive:FILE[:TAG]``           a tar of an OCI image layout
``oci:DIR[:TAG]``                    an OCI image layout directory

Every layer is read once up front, before the dataset is touched: its bytes
must hash to the digest its name or descriptor claims, and its uncompressed
bytes to the config's ``rootfs.diff_ids`` entry.  Then, when the image is
known to live in a registry (``source_ref``, or a source recorded in the
archive by an export or a ``RepoDigests`` entry), the registry's manifest
and config are fetched and each local layer is matched by diff_id to a
registry blob: matched layers are stored as the registry's (compressed)
blobs with their URL, unmatched ones from the archive without a URL, and
``ImageSource.notes`` says which.  If everything matches and the configs are
identical, the stored manifest is the registry's own.
"""
import os
import re
import zlib

from .. import oci
from ..digest import CHUNK, Hasher, VerifyingWriter, sha256_digest
from .docker_archive import read_docker_archive
from ..errors import (ArchiveError, DigestMismatch, InvalidReference,
                     UdockerError)
from ..members import DirReader, TarReader
from .oci_archive import read_oci_layout
from ..reference import parse_reference
from ..registry.source import source_annotations
from ..source import ImageSource, LayerSource
from ..transports import LOCAL_TRANSPORTS as TRANSPORTS


def parse_spec(spec):
    """``(transport, path, name_or_None)`` of a skopeo-style source spec.

    Like skopeo, the path ends at the first ``:``, unless the whole rest
    names an existing file or directory.
    """
    transport, sep, rest = spec.partition(":")
    if not sep or transport not in TRANSPORTS or not rest:
        raise ArchiveError("unsupported source %r: use docker-archive:FILE"
                           "[:NAME:TAG], oci-archive:FILE[:TAG] or oci:DIR"
                           "[:TAG]" % spec)
    if os.path.exists(rest):
        return transport, rest, None
    path, _, name = rest.partition(":")
    return transport, path, name or None


def open_source(spec, source_ref=None, client_factory=None, platform=None):
    """Open the local image ``spec`` as a source.ImageSource (see module doc).

    ``source_ref`` names the registry image the archive was pulled from;
    ``client_factory(Reference) -> RegistryClient`` is used to reach it.
    Raises ArchiveError (or another UdockerError) with a one-line message.
    """
    transport, path, wanted = parse_spec(spec)
    with _members(transport, path) as reader:
        if transport == "docker-archive":
            image = read_docker_archive(reader, wanted)
        else:
            image = read_oci_layout(reader, wanted, platform)
        layers = [verify_layer(reader, l) for l in image.layers]
    local = _LocalImage(spec, transport, path, image, layers)
    ref, pinned, explicit = _registry_ref(image, source_ref)
    if ref is not None and client_factory is not None:
        try:
            return _with_registry(local, ref, pinned, client_factory)
        except UdockerError as exc:
            if explicit:
                raise UdockerError("cannot match %s with %s: %s"
                                   % (spec, ref, exc)) from None
            src = local.image_source()
            src.notes.append("the archive names %s as its source, but it "
                             "could not be reached (%s): all layers stored "
                             "from the archive, without URLs" % (ref, exc))
            return src
    return local.image_source()


def _members(transport, path):
    """The member reader of a local source: a directory or a tar."""
    return DirReader(path) if transport == "oci" else TarReader(path)


# --- verification --------------------------------------------------------

class VerifiedLayer:
    """A layer whose stored bytes and uncompressed digest were checked."""

    def __init__(self, member, digest, size, diff_id, compression,
                 media_type):
        self.member, self.digest, self.size = member, digest, size
        self.diff_id, self.compression = diff_id, compression
        self.media_type = media_type or oci.OCI_LAYER_TYPES[compression]


def _compression(head):
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


def _decompressor(kind, where):
    if kind == "gzip":
        return _Gunzip()
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ArchiveError("%s is zstd-compressed: install the "
                               "'zstandard' package to import it" % where)
        return zstandard.ZstdDecompressor().decompressobj()
    return None


def _decompress_errors():
    try:
        import zstandard
        return (zlib.error, EOFError, zstandard.ZstdError)
    except ImportError:
        return (zlib.error, EOFError)


class _Gunzip:
    """Incremental gzip decoding, concatenated members included."""

    def __init__(self):
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def decompress(self, data):
        out = []
        while data:
            out.append(self._d.decompress(data))
            data = self._d.unused_data
            if data:
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return b"".join(out)


def verify_layer(reader, layer):
    """Hash ``layer``'s bytes and uncompressed bytes; VerifiedLayer or error."""
    where = "layer %s of %s" % (layer.member, reader.path)
    stored, plain = Hasher(), Hasher()
    decomp, kind = None, None
    with reader.open(layer.member) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            if stored.count == 0:
                kind = _compression(chunk)
                decomp = _decompressor(kind, where)
            stored.update(chunk)
            try:
                plain.update(decomp.decompress(chunk) if decomp else chunk)
            except _decompress_errors() as exc:
                raise ArchiveError("%s is corrupt (%s data does not "
                                   "decompress: %s)" % (where, kind, exc))
    digest, size = stored.digest, stored.count
    if layer.digest and digest != layer.digest:
        raise DigestMismatch("%s does not match its digest %s (got %s): "
                             "corrupt archive" % (where, layer.digest, digest))
    if layer.size is not None and size != layer.size:
        raise ArchiveError("%s has %d bytes, its descriptor says %d"
                           % (where, size, layer.size))
    diff_id = plain.digest
    if diff_id != layer.diff_id:
        raise DigestMismatch("%s: uncompressed content is %s but the image "
                             "config says diff_id %s: corrupt or tampered "
                             "archive" % (where, diff_id, layer.diff_id))
    declared = layer.media_type
    if declared and oci.layer_compression(declared) != kind:
        declared = None     # e.g. a Docker 25 blob described loosely
    return VerifiedLayer(layer.member, digest, size, diff_id, kind, declared)


# --- building the ImageSource -------------------------------------------

def _copy_fetch(transport, path, member, digest, size):
    """fetch(dest, progress) copying a member/file into dest, verified."""
    def fetch(dest, progress):
        if os.path.exists(dest):     # a local copy is never resumed
            os.unlink(dest)
        with _members(transport, path) as reader, reader.open(member) as src, \
                VerifyingWriter(dest, digest, size) as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                out.write(chunk)
                progress(len(chunk))
            out.verify()
    return fetch


def _build_manifest(config_raw, descriptors):
    return oci.build_oci_manifest(oci.Descriptor(
        oci.OCI_CONFIG, sha256_digest(config_raw), len(config_raw)),
        descriptors)


class _LocalImage:
    def __init__(self, spec, transport, path, image, layers):
        self.spec, self.transport, self.path = spec, transport, path
        self.image, self.layers = image, layers
        self.config_digest = sha256_digest(image.config_raw)
        if image.manifest and image.manifest.config.digest != self.config_digest:
            raise DigestMismatch("%s: config does not match digest %s"
                                 % (spec, image.manifest.config.digest))
        self.name = _first_name(image)

    def layer_source(self, v):
        desc = oci.Descriptor(v.media_type, v.digest, v.size)
        return LayerSource(desc, _copy_fetch(self.transport, self.path,
                                             v.member, v.digest, v.size))

    def image_source(self):
        manifest = self.image.manifest
        if manifest is None:
            manifest = _build_manifest(self.image.config_raw, [
                oci.Descriptor(v.media_type, v.digest, v.size)
                for v in self.layers])
        layers = []
        for desc, v in zip(manifest.layers, self.layers):
            src = self.layer_source(v)
            src.descriptor = desc
            layers.append(src)
        ann = dict(self.image.annotations)
        ann = {k: v for k, v in ann.items() if k.startswith("org.datalad.")}
        ann[oci.ANNOTATION_SOURCE] = self.spec
        ann.pop(oci.ANNOTATION_SOURCE_DIGEST, None)
        if self.name:
            ann.update(_name_annotations(self.name))
        return ImageSource(manifest, self.image.config_raw, layers, ann,
                           description=self.spec,
                           default_name=_default_name(self.name, self.path))


def _first_name(image):
    """The image's ``Reference`` from its RepoTags or recorded source."""
    candidates = list(image.repo_tags)
    ann = image.annotations
    if ann.get(oci.ANNOTATION_REPOSITORY):
        reg = ann.get(oci.ANNOTATION_REGISTRY, "docker.io")
        candidates.append("%s/%s:%s" % (reg, ann[oci.ANNOTATION_REPOSITORY],
                                        ann.get(oci.ANNOTATION_TAG, "latest")))
    for c in candidates:
        try:
            return parse_reference(c)
        except InvalidReference:
            continue
    return None


def _name_annotations(ref):
    ann = {oci.ANNOTATION_REGISTRY: ref.registry,
           oci.ANNOTATION_REPOSITORY: ref.repository}
    if ref.tag:
        ann[oci.ANNOTATION_TAG] = ann[oci.ANNOTATION_REF_NAME] = ref.tag
    return ann


def _default_name(ref, path):
    if ref is not None:
        return ref.name
    stem = os.path.basename(os.path.normpath(path)).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "image"


def _registry_ref(image, source_ref):
    """``(Reference, pinned_digest, explicit)`` of the registry image to match.

    ``pinned_digest`` is the manifest digest an export recorded: resolving
    by it finds the very image even if the tag has moved since.
    """
    if source_ref:
        return parse_reference(source_ref), None, True
    ann = image.annotations
    hints = []
    src = ann.get(oci.ANNOTATION_SOURCE)
    if src and not src.startswith(tuple(t + ":" for t in TRANSPORTS)):
        hints.append(src)
    hints.extend(image.repo_digests)
    for h in hints:
        try:
            ref = parse_reference(h)
        except InvalidReference:
            continue
        pinned = ann.get(oci.ANNOTATION_SOURCE_DIGEST) if h == src else None
        return ref, pinned, False
    return None, None, False


def _with_registry(local, ref, pinned, client_factory):
    client = client_factory(ref)
    platform = oci.parse_config(local.image.config_raw).platform
    resolved = client.resolve(ref.with_digest(pinned) if pinned else ref,
                              platform)
    remote_ids = oci.parse_config(resolved.config_raw).diff_ids
    by_diff = dict(zip(remote_ids, resolved.manifest.layers))
    layers, descs, notes = [], [], []
    for v in local.layers:
        rdesc = by_diff.get(v.diff_id)
        if rdesc is None:
            src = local.layer_source(v)
            notes.append("layer %s (diff_id %s) is not in %s: stored from the "
                         "archive, without a registry URL" % (v.digest,
                                                              v.diff_id, ref))
        elif v.digest == rdesc.digest:   # the archive has the very blob
            src = local.layer_source(v)
            src.descriptor = rdesc
            src.url = client.blob_url(ref.repository, rdesc.digest)
        else:
            url = client.blob_url(ref.repository, rdesc.digest)

            def fetch(dest, progress, url=url, d=rdesc):
                client.download_blob(url, d.digest, d.size, dest, progress)
            src = LayerSource(rdesc, fetch, url)
        layers.append(src)
        descs.append(src.descriptor)
    same_config = resolved.manifest.config.digest == local.config_digest
    if not notes and same_config and len(descs) == len(
            resolved.manifest.layers):
        manifest, config_raw = resolved.manifest, resolved.config_raw
        annotations = source_annotations(ref, resolved)
    else:
        descs = [oci.Descriptor(oci.oci_layer_type(d.media_type), d.digest,
                                d.size) for d in descs]
        manifest = _build_manifest(local.image.config_raw, descs)
        config_raw = local.image.config_raw
        for src, d in zip(layers, descs):
            src.descriptor = d
        annotations = source_annotations(ref, resolved)
        annotations.pop(oci.ANNOTATION_SOURCE_DIGEST, None)
        if not same_config:
            notes.append("the image config differs from %s's: a new manifest "
                         "was written" % ref)
    return ImageSource(manifest, config_raw, layers, annotations,
                       description="%s (layers from %s)" % (local.spec, ref),
                       default_name=ref.name, notes=notes)
