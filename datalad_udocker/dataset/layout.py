"""The OCI image layout (``oci-layout``, ``index.json``, ``blobs/``): read and
written here only.

The layout a dataset holds is a plain OCI image layout that skopeo and umoci
read: ``index.json`` names one OCI image manifest (annotated with where it
came from), ``blobs/sha256/<hex>`` holds the manifest, the config and the
layers.  An image the registry serves with Docker media types keeps the
registry's manifest blob untouched (the image is keyed on its digest) and
``index.json`` names an OCI manifest over the same config and layer blobs,
annotated with the registry manifest's digest (``org.datalad.udocker.manifest``);
:meth:`OCILayout.manifest_descriptor` returns the registry's.  Layouts
written before that (a Docker manifest in ``index.json``) read the same.
In a dataset the JSON blobs are in git and the layer blobs are git-annex
symlinks.  The same :class:`OCILayout` reads an ``oci:DIR`` source, an
``oci-archive:`` tar and the OCI part of a Docker >= 25 ``docker save``:
its files are read through a member reader (:mod:`..members`: a directory
or a tar), so this module knows the format and nothing about where it is.
:func:`layout_files` gives the ``oci-layout`` and ``index.json`` bytes that
the dataset's layout and an exported archive are written with.
"""
import json
import os
from pathlib import Path

from .. import oci
from ..digest import Digest, sha256_digest
from ..errors import LayoutError, UdockerError
from ..members import DirReader

OCI_LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}
MAX_NESTING = 4        # index -> index -> ... -> manifest


def blob_name(digest):
    """The member name of a blob: ``blobs/<algorithm>/<hex>``."""
    digest = Digest(digest)
    return "blobs/%s/%s" % (digest.algorithm, digest.hex)


class OCILayout:
    """One OCI image layout, read-only.

    ``source`` is a directory path (a dataset's layout, ``oci:DIR``) or a
    member reader (:class:`..members.TarReader` for a tar).  Problems are
    raised as ``error``: LayoutError for a dataset's layout, ArchiveError
    for an image source.
    """

    def __init__(self, source, error=LayoutError):
        self.error = error
        if isinstance(source, (str, os.PathLike)):
            self.path, self._members = Path(source), None
        else:
            self.path, self._members = Path(source.path), source

    @property
    def members(self):
        if self._members is None:
            self._members = DirReader(self.path, self.error)
        return self._members

    # --- paths (a directory) ------------------------------------------
    def blob_path(self, digest):
        return self.path / blob_name(digest)

    @property
    def index_path(self):
        return self.path / "index.json"

    def exists(self):
        return (self.path / "oci-layout").exists() and self.index_path.exists()

    # --- reading -------------------------------------------------------
    def entries(self):
        """The descriptors ``index.json`` lists (checked)."""
        if not self.members.exists("index.json"):
            raise self.error("%s has no index.json: not an OCI image layout "
                             "(import an image with `datalad "
                             "udocker-import`)" % self.path)
        index = self.members.read_json("index.json")
        entries = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(entries, list):
            raise self.error("OCI layout %s: index.json is malformed (no "
                             "manifests list)" % self.path)
        try:
            return [oci.Descriptor.from_dict(e, "index.json entry")
                    for e in entries]
        except UdockerError as exc:
            raise self.error("OCI layout %s: index.json is malformed: %s"
                             % (self.path, exc)) from None

    def manifest_descriptor(self):
        """The descriptor of the image: its SOURCE manifest.

        ``index.json`` names one image (the first entry).  When that entry
        is an OCI manifest re-describing the registry's Docker manifest
        (written so that OCI tools read the layout, see
        :func:`write_json_files`), the descriptor returned is the registry's
        manifest's, which its annotation names, with the entry's other
        annotations: the image is keyed on that digest everywhere.
        """
        entries = self.entries()
        if not entries:
            raise self.error("%s names no image" % self.index_path)
        return self.source_descriptor(entries[0])

    def source_descriptor(self, entry):
        """The descriptor of the manifest ``entry`` re-describes (its
        :data:`..oci.ANNOTATION_MANIFEST`), checked to name the same blobs;
        ``entry`` itself if it re-describes none."""
        source = entry.annotations.get(oci.ANNOTATION_MANIFEST)
        if source is None:
            return entry
        try:
            source = Digest(source)
        except UdockerError:
            raise self.error("OCI layout %s: index.json annotation %s is not "
                             "a digest" % (self.path, oci.ANNOTATION_MANIFEST)
                             ) from None
        raw = self.read_blob(source, "manifest")
        try:
            original = oci.parse_manifest(raw, None, source)
            view = oci.parse_manifest(self.read_blob(entry.digest, "manifest"),
                                      entry.media_type, entry.digest)
        except UdockerError as exc:
            raise self.error("OCI layout %s: manifest %s: %s"
                             % (self.path, source, exc)) from None
        if not (isinstance(original, oci.Manifest)
                and isinstance(view, oci.Manifest)
                and oci.describes_same_blobs(original, view)):
            raise self.error("OCI layout %s: manifest %s does not describe the "
                             "image index.json names (%s)"
                             % (self.path, source, entry.digest))
        return oci.Descriptor(original.media_type, source, len(raw),
                              annotations={
                                  k: v for k, v in entry.annotations.items()
                                  if k != oci.ANNOTATION_MANIFEST})

    def annotations(self):
        return dict(self.manifest_descriptor().annotations)

    def has_blob(self, digest):
        return self.members.exists(blob_name(digest))

    def read_blob(self, digest, what="blob"):
        """A (small) blob's bytes, checked against ``digest``."""
        name = blob_name(digest)
        if not self.members.exists(name):
            raise self.error("OCI layout %s: the image refers to %s %s, "
                             "which is missing from blobs/"
                             % (self.path, what, digest))
        data = self.members.read(name)
        if sha256_digest(data) != digest:
            raise self.error("OCI layout %s: %s %s is corrupt (its content "
                             "does not match its digest)"
                             % (self.path, what, digest))
        return data

    def read_manifest(self, desc):
        """The manifest or index ``desc`` points to, parsed and verified."""
        raw = self.read_blob(desc.digest, "manifest")
        try:
            return oci.parse_manifest(raw, desc.media_type, desc.digest)
        except UdockerError as exc:
            raise self.error("OCI layout %s: manifest %s: %s"
                             % (self.path, desc.digest, exc)) from None

    def resolve(self, desc, platform=None):
        """The image manifest ``desc`` leads to: an index is narrowed to
        ``platform`` (default: the host's)."""
        for _ in range(MAX_NESTING):
            parsed = self.read_manifest(desc)
            if isinstance(parsed, oci.Manifest):
                return parsed
            desc = parsed.select(platform or oci.host_platform())
        raise self.error("OCI layout %s: indexes nested too deeply"
                         % self.path)

    def manifest(self):
        """The image manifest (an oci.Manifest) of :meth:`manifest_descriptor`."""
        parsed = self.read_manifest(self.manifest_descriptor())
        if not isinstance(parsed, oci.Manifest):
            raise self.error("%s points to an index, not an image manifest"
                             % self.index_path)
        return parsed

    def read_config(self, manifest):
        """``(config bytes, oci.ImageConfig)`` of ``manifest``, checked."""
        raw = self.read_blob(manifest.config.digest, "config")
        try:
            return raw, oci.parse_config(raw)
        except UdockerError as exc:
            raise self.error("OCI layout %s: config %s: %s"
                             % (self.path, manifest.config.digest, exc)) \
                from None

    def config(self):
        """The image config as a dict (Env, Entrypoint, Cmd, rootfs...),
        checked by :func:`..oci.parse_config`."""
        return self.read_config(self.manifest())[1].doc

    def image_name(self):
        """``(repository, tag)`` recorded at import, for tagging exports."""
        ann = self.annotations()
        repo = ann.get(oci.ANNOTATION_REPOSITORY)
        registry = ann.get(oci.ANNOTATION_REGISTRY)
        if repo and registry and registry != "docker.io":
            repo = registry + "/" + repo
        return repo, ann.get(oci.ANNOTATION_TAG) or ann.get(
            oci.ANNOTATION_REF_NAME)


# --- writing ---------------------------------------------------------------

def layout_files(entry):
    """``[(name, bytes)]`` of ``oci-layout`` and an ``index.json`` naming
    the one image ``entry`` (an oci.Descriptor)."""
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
             "manifests": [entry.to_dict()]}
    return [(name, (json.dumps(doc, indent=2, sort_keys=True) + "\n")
             .encode()) for name, doc in (("oci-layout", OCI_LAYOUT_FILE),
                                          ("index.json", index))]


def oci_entry(manifest, annotations):
    """``(index.json entry, [manifests to store])`` for the image
    ``manifest``: OCI tools read only OCI manifests, so a Docker one is
    stored untouched (its digest and URL stay valid) and the entry names an
    OCI manifest over the same blobs, annotated with the Docker manifest's
    digest (:meth:`OCILayout.source_descriptor` goes back to it)."""
    view = oci.as_oci_manifest(manifest)
    annotations = dict(annotations or {})
    if view is not manifest:
        annotations[oci.ANNOTATION_MANIFEST] = str(manifest.digest)
    entry = oci.Descriptor(view.media_type, view.digest, len(view.raw),
                           annotations=annotations)
    return entry, [manifest] if view is manifest else [manifest, view]


def write_json_files(path, manifest, config_raw, annotations):
    """Write the git-tracked part of a layout into ``path``.

    Writes ``oci-layout``, ``index.json``, the manifest and config blobs
    (exactly the registry's bytes, so their digests hold) and, for a Docker
    manifest, the OCI manifest ``index.json`` names (:func:`oci_entry`).
    Returns the list of paths written.  Layer blobs are the store's business.
    """
    layout = OCILayout(path)
    layout.blob_path(manifest.digest).parent.mkdir(parents=True,
                                                   exist_ok=True)
    entry, manifests = oci_entry(manifest, annotations)
    written = []
    for digest, raw in [(m.digest, m.raw) for m in manifests] + [
            (manifest.config.digest, config_raw)]:
        if sha256_digest(raw) != digest:
            raise LayoutError("refusing to write blob %s: bytes do not match"
                              % digest)
        written.append(layout.blob_path(digest))
        _write_atomic(written[-1], raw)
    for name, data in layout_files(entry):
        written.append(layout.path / name)
        _write_atomic(written[-1], data)
    return written


def _write_atomic(path, data):
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
