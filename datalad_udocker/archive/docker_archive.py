"""The docker-save tar format: written as a stream, read safely.

This is the only module that knows what ``docker save`` / ``docker load``
tarballs look like.  Two flavours exist and both are read:

classic (Docker < 25)
    ``manifest.json`` (a list of ``{"Config", "RepoTags", "Layers"}``),
    ``<image-id>.json`` (the config), ``<layer-id>/layer.tar`` (uncompressed
    layers, possibly symlinks to one another) and ``repositories``.
OCI layout (Docker >= 25)
    the same ``manifest.json`` and ``repositories`` next to ``oci-layout``,
    ``index.json`` and ``blobs/sha256/<hex>`` for config, manifests and
    layers (uncompressed, named by diff_id; with the containerd image store
    the registry's compressed blobs, and ``index.json`` names the registry's
    index, of which only the host platform's manifest is in the tar).  A tar with only ``index.json`` (an ``oci-archive``) is handed to
    :mod:`.oci_archive`.

Writing (:func:`write_archive`) produces the second flavour in one pass,
the bytes ``tarfile`` writes in stream mode (``w|``), with layer bodies the
caller has verified copied by the kernel: layers go in exactly as they are
stored (compressed registry blobs; ``docker load`` decompresses them), except
zstd ones, which go in as plain tars (Docker < 23 reads no zstd), so an
export can go to a pipe.  With ``fmt="oci-archive"`` only the OCI layout part
is written, every layer as stored.

Reading never extracts anything: :class:`..members.TarReader` indexes the
members, refuses absolute paths, ``..`` components, device nodes and FIFOs,
links that leave the archive, duplicate names, and truncated or corrupt tars,
then hands out members by name.  The OCI part is read and written by
:mod:`..dataset.layout`.  Digests and diff_ids are checked by :mod:`.source`.
"""
import errno
import json
import os
import re
import tarfile

from .. import oci
from ..dataset.layout import (MAX_NESTING, OCILayout, blob_name,
                               layout_files, oci_entry)
from ..digest import CHUNK, Digest, HashingReader, sha256_digest
from ..errors import ArchiveError, DigestMismatch, UdockerError
from ..members import TarReader, normalize  # noqa: F401 (TarReader: re-export)
from .oci_archive import (ANNOTATION_CONTAINERD_NAME, ArchiveImage,
                          ArchiveLayer, choose, normalize_name,
                          read_oci_layout)

# --- reading docker-save archives ----------------------------------------

def read_docker_archive(reader, wanted=None):
    """Parse the docker-save archive behind ``reader`` into an ArchiveImage.

    ``wanted`` is a ``name:tag`` choosing among several images.  Archives
    without ``manifest.json`` but with ``index.json`` are read as OCI layouts.
    """
    where = "archive %s" % reader.path
    if not reader.exists("manifest.json"):
        if reader.exists("index.json"):
            return read_oci_layout(reader, wanted)
        raise ArchiveError("%s is not a docker-save archive (no manifest.json "
                           "or index.json)" % reader.path)
    entries = reader.read_json("manifest.json")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("Config"), str)
            and isinstance(e.get("Layers"), list) for e in entries):
        raise ArchiveError("%s: manifest.json is malformed (expected a list "
                           "of {Config, RepoTags, Layers})" % where)
    entry = choose(entries, wanted, lambda e: list(e.get("RepoTags") or []),
                   where)
    config_raw = reader.read(entry["Config"])
    try:
        diff_ids = oci.parse_config(config_raw).diff_ids
    except UdockerError as exc:
        raise ArchiveError("%s: config %s: %s" % (where, entry["Config"], exc))
    if len(diff_ids) != len(entry["Layers"]):
        raise ArchiveError("%s: config lists %d diff_ids but manifest.json "
                           "%d layers" % (where, len(diff_ids),
                                          len(entry["Layers"])))
    config_digest = sha256_digest(config_raw)
    named = re.match(r"^(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?$",
                     normalize(entry["Config"]))
    if named and named.group(1) != config_digest.hex:
        raise ArchiveError("%s: config %s does not hash to its name (corrupt "
                           "archive)" % (where, entry["Config"]))
    manifest, annotations = _indexed_manifest(reader, config_digest)
    declared = {l.digest: l for l in manifest.layers} if manifest else {}
    layers = []
    for member, diff_id in zip(entry["Layers"], diff_ids):
        if not isinstance(member, str) or not reader.exists(member):
            raise ArchiveError("%s: manifest.json refers to layer %s, which "
                               "the archive does not contain" % (where, member))
        layer = ArchiveLayer(normalize(member), diff_id,
                             size=reader.size(member))
        m = re.match(r"^blobs/sha256/([0-9a-f]{64})$", layer.member)
        if m:   # Docker >= 25: the blob's name is its digest (verified later)
            layer.digest = Digest("sha256:" + m.group(1))
            if layer.digest in declared:
                layer.media_type = declared[layer.digest].media_type
        layers.append(layer)
    if manifest and [l.digest for l in manifest.layers] != [
            l.digest for l in layers]:
        manifest = None
    return ArchiveImage(config_raw, layers, list(entry.get("RepoTags") or []),
                        manifest, annotations,
                        list(entry.get("RepoDigests") or []))


def _indexed_manifest(reader, config_digest):
    """``(manifest, annotations)`` index.json gives for this config, if any.

    Docker >= 25 archives (and our exports) carry an OCI index next to
    manifest.json; its entry for the image keeps the original manifest (so
    an exported image re-imports under the same digest) and annotations
    naming the source.
    """
    if not reader.exists("index.json"):
        return None, {}
    layout = OCILayout(reader, ArchiveError)
    try:
        entries = layout.entries()
    except UdockerError:
        return None, {}
    for desc in entries:
        try:
            desc = layout.source_descriptor(desc)
            for parsed in _manifests_under(layout, desc):
                if parsed.config.digest == config_digest:
                    return parsed, dict(desc.annotations)
        except UdockerError:
            continue
    return None, {}


def _manifests_under(layout, desc, depth=0):
    """The image manifests ``desc`` leads to that the archive holds: Docker
    with the containerd image store saves the image's index (the registry's)
    with only the host platform's manifest in ``blobs/``."""
    parsed = layout.read_manifest(desc)
    if isinstance(parsed, oci.Manifest):
        yield parsed
    elif depth < MAX_NESTING:
        for m in parsed.manifests:
            if layout.has_blob(m.digest):
                yield from _manifests_under(layout, m, depth + 1)


# --- writing --------------------------------------------------------------

def _tarinfo(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uname = info.gname = ""
    return info


class _TarStream:
    """The bytes ``tarfile.open(fileobj=out, mode="w|", format=PAX_FORMAT)``
    writes for regular files, with file bodies copied by the kernel
    (``os.sendfile``: into a file or a pipe) where nothing needs to see
    them.  Headers come from :class:`tarfile.TarInfo`, so the archive is the
    one ``tarfile`` would write."""

    def __init__(self, out):
        self.out, self.offset = out, 0

    def _write(self, data):
        self.out.write(data)
        self.offset += len(data)

    def _header(self, name, size):
        self._write(_tarinfo(name, size).tobuf(
            tarfile.PAX_FORMAT, tarfile.ENCODING, "strict"))

    def _pad(self, size):
        if size % tarfile.BLOCKSIZE:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add_bytes(self, name, data):
        self._header(name, len(data))
        self._write(data)
        self._pad(len(data))

    def add_stream(self, name, size, reader):
        """Add ``size`` bytes read from ``reader`` (read(n)); returns how
        many it gave (fewer: the member is incomplete, the caller raises)."""
        self._header(name, size)
        copied = 0
        while copied < size:
            data = reader.read(min(CHUNK, size - copied))
            if not data:
                break
            self._write(data)
            copied += len(data)
        self._pad(size)
        return copied

    def add_file(self, name, size, f):
        """Add ``size`` bytes of the open file ``f`` from its position,
        copied by the kernel if ``out`` has a file descriptor; returns the
        count copied."""
        try:
            out_fd = self.out.fileno()
        except (AttributeError, OSError, ValueError):
            return self.add_stream(name, size, f)
        self._header(name, size)
        self.out.flush()
        copied = 0
        while copied < size:
            try:
                n = os.sendfile(out_fd, f.fileno(), None,
                                min(size - copied, 1 << 30))
            except OSError as exc:
                if copied or exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                n = -1          # e.g. out opened O_APPEND: copy in Python
            if n < 0:
                copied = self._copy_rest(f, size)
                break
            if n == 0:
                break
            copied += n
        self.offset += copied
        self._pad(size)
        return copied

    def _copy_rest(self, f, size):
        copied = 0
        while copied < size:
            data = f.read(min(CHUNK, size - copied))
            if not data:
                break
            self.out.write(data)
            copied += len(data)
        return copied

    def close(self):
        """The end of archive: two zero blocks, then zeros up to a record."""
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self.offset % tarfile.RECORDSIZE:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE
                                       - self.offset % tarfile.RECORDSIZE))


def write_archive(out, manifest, config_raw, layer_paths, repo_tags=(),
                  annotations=None, fmt="docker-archive", verified=()):
    """Write one image as a tar stream to the binary file object ``out``.

    ``manifest`` is the stored oci.Manifest, ``config_raw`` its config bytes,
    ``layer_paths`` maps each layer digest to a readable file holding exactly
    those bytes (checked as they stream: DigestMismatch at the first wrong
    layer).  The layers in ``verified`` (digests) the caller has checked
    already: they are copied by the kernel, only their size is checked
    (see :mod:`.export`).  ``repo_tags`` become ``RepoTags`` (docker-archive) and the
    index's ``ref.name`` (oci-archive).

    ``index.json`` names an OCI manifest (a Docker one is written too and
    named by its annotation, as in a dataset's layout), so OCI tools read the
    archive by tag and a re-import finds the registry's manifest.  In a
    docker-archive, zstd layers are written as plain tars named by their
    diff_id (Docker before 23 cannot read zstd; the diff_id, hence the image
    ID, is the same), and ``index.json`` then names a manifest over those.
    The bytes depend on nothing but the image: two exports are identical.
    """
    if fmt not in ("docker-archive", "oci-archive"):
        raise ArchiveError("unknown archive format %r (docker-archive or "
                           "oci-archive)" % fmt)
    plain = _plain_layers(manifest, config_raw, layer_paths) \
        if fmt == "docker-archive" else {}
    exported = manifest
    if plain:
        exported = oci.build_oci_manifest(manifest.config, [
            oci.Descriptor(oci.OCI_LAYER_TYPES[None], *plain[l.digest])
            if l.digest in plain else l for l in manifest.layers])
    index_entry, manifests = oci_entry(exported, annotations)
    if repo_tags:
        index_entry.annotations.setdefault(ANNOTATION_CONTAINERD_NAME,
                                           normalize_name(repo_tags[0])
                                           or repo_tags[0])
        index_entry.annotations[oci.ANNOTATION_REF_NAME] = \
            repo_tags[0].rpartition(":")[2]
    oci_layout, index = layout_files(index_entry)
    tar = _TarStream(out)
    tar.add_bytes(*oci_layout)
    tar.add_bytes(blob_name(manifest.config.digest), config_raw)
    for m in manifests:
        tar.add_bytes(blob_name(m.digest), m.raw)
    seen = set()
    for layer in manifest.layers:
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        with open(layer_paths[layer.digest], "rb") as f:
            if layer.digest in plain:
                _add_unzstd(tar, layer, f, *plain[layer.digest])
            else:
                _add_layer(tar, layer, f, layer.digest in verified)
    tar.add_bytes(*index)
    if fmt == "docker-archive":
        entry = {"Config": blob_name(manifest.config.digest),
                 "RepoTags": list(repo_tags),
                 "Layers": [blob_name(l.digest) for l in exported.layers]}
        tar.add_bytes("manifest.json", _dumps([entry]))
        repos = {}
        for tag in repo_tags:
            name, _, t = tag.rpartition(":")
            repos.setdefault(name, {})[t] = manifest.config.hex
        tar.add_bytes("repositories", _dumps(repos))
    tar.close()


def _add_layer(tar, layer, f, verified=False):
    """Add the layer blob ``f`` as it is, checked against ``layer``: hashed
    as it streams, or, if the caller ``verified`` it, by size only."""
    name = blob_name(layer.digest)
    if verified:
        copied = tar.add_file(name, layer.size, f)
    else:
        reader = HashingReader(f)
        copied = tar.add_stream(name, layer.size, reader)
    if copied != layer.size:
        raise DigestMismatch("layer %s is shorter than %d bytes (%s)"
                             % (layer.digest, layer.size,
                                _NOT_THESE_BYTES % layer.digest))
    if f.read(1) or not verified and reader.digest != layer.digest:
        raise DigestMismatch(_NOT_THESE_BYTES % layer.digest)


_NOT_THESE_BYTES = ("layer %s: the stored file does not hold these bytes "
                    "(run `git annex fsck`)")


def _unzstd(f):
    """``(compressed, uncompressed)`` HashingReaders over the zstd file ``f``."""
    try:
        import zstandard
    except ImportError:
        raise ArchiveError("the image has zstd layers, which a docker-archive "
                           "holds uncompressed: install the 'zstandard' "
                           "package to export it") from None
    compressed = HashingReader(f)
    return compressed, HashingReader(zstandard.ZstdDecompressor().stream_reader(
        compressed, read_across_frames=True))


def _plain_layers(manifest, config_raw, layer_paths):
    """``{digest: (diff_id, size)}`` of the zstd layers, each decompressed
    once to learn its size (a tar header comes first) and checked: its
    bytes must be the layer's and decompress to the config's diff_id."""
    zstd = [(l, d) for l, d in zip(manifest.layers,
                                   oci.parse_config(config_raw).diff_ids)
            if oci.layer_compression(l.media_type) == "zstd"]
    plain = {}
    for layer, diff_id in zstd:
        with open(layer_paths[layer.digest], "rb") as f:
            compressed, out = _unzstd(f)
            try:
                out.drain()
                compressed.drain()
            except _zstd_errors() as exc:
                raise DigestMismatch("layer %s is not valid zstd (%s): %s"
                                     % (layer.digest, exc, _NOT_THESE_BYTES
                                        % layer.digest)) from None
        if compressed.digest != layer.digest or out.digest != diff_id:
            raise DigestMismatch(_NOT_THESE_BYTES % layer.digest)
        plain[layer.digest] = (Digest(diff_id), out.count)
    return plain


def _add_unzstd(tar, layer, f, diff_id, size):
    """Add the zstd layer ``f`` decompressed, as ``blobs/sha256/<diff_id>``."""
    compressed, out = _unzstd(f)
    try:
        tar.add_stream(blob_name(diff_id), size, out)
        out.read(1)
        compressed.drain()
    except (OSError,) + _zstd_errors() as exc:
        raise DigestMismatch("layer %s changed during the export (%s)"
                             % (layer.digest, exc)) from None
    if out.digest != diff_id or out.count != size \
            or compressed.digest != layer.digest:
        raise DigestMismatch(_NOT_THESE_BYTES % layer.digest)


def _zstd_errors():
    import zstandard
    return (zstandard.ZstdError,)


def _dumps(doc):
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
