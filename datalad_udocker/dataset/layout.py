"""An OCI image layout on disk (``oci-layout``, ``index.json``, ``blobs/``).

The layout a dataset holds is a plain OCI image layout that skopeo and umoci
read: ``index.json`` names one image manifest (annotated with where it came
from), ``blobs/sha256/<hex>`` holds the manifest, the config and the layers.
In a dataset the JSON blobs are in git and the layer blobs are git-annex
symlinks; this module does not care, it reads and writes paths.
"""
import json
import os
from pathlib import Path

from .. import oci
from ..digest import Digest, sha256_digest
from ..errors import LayoutError

OCI_LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}


class OCILayout:
    """Read access to one image stored as an OCI layout at ``path``."""

    def __init__(self, path):
        self.path = Path(path)

    # --- paths ---------------------------------------------------------
    def blob_path(self, digest):
        digest = Digest(digest)
        return self.path / "blobs" / digest.algorithm / digest.hex

    @property
    def index_path(self):
        return self.path / "index.json"

    def exists(self):
        return (self.path / "oci-layout").exists() and self.index_path.exists()

    # --- reading -------------------------------------------------------
    def read_index(self):
        try:
            return json.loads(self.index_path.read_text())
        except FileNotFoundError:
            raise LayoutError("%s is not an image imported by datalad-udocker "
                              "(no index.json); import one with `datalad "
                              "udocker-import`" % self.path)
        except ValueError:
            raise LayoutError("%s is corrupt (not JSON)" % self.index_path)

    def manifest_descriptor(self):
        """The descriptor of the image manifest index.json points to."""
        entries = self.read_index().get("manifests") or []
        if not entries:
            raise LayoutError("%s names no image" % self.index_path)
        return oci.Descriptor.from_dict(entries[0])

    def annotations(self):
        return dict(self.manifest_descriptor().annotations)

    def read_blob(self, digest):
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise LayoutError("blob %s is missing from %s" % (digest, self.path))
        if sha256_digest(data) != digest:
            raise LayoutError("blob %s in %s is corrupt" % (digest, self.path))
        return data

    def manifest(self):
        """The image manifest (an oci.Manifest), verified against its digest."""
        desc = self.manifest_descriptor()
        parsed = oci.parse_manifest(self.read_blob(desc.digest),
                                    desc.media_type, desc.digest)
        if not isinstance(parsed, oci.Manifest):
            raise LayoutError("%s points to an index, not an image manifest"
                              % self.index_path)
        return parsed

    def config(self):
        """The image config as a dict (Env, Entrypoint, Cmd, rootfs...)."""
        return json.loads(self.read_blob(self.manifest().config.digest))

    def image_name(self):
        """``(repository, tag)`` recorded at import, for tagging exports."""
        ann = self.annotations()
        repo = ann.get(oci.ANNOTATION_REPOSITORY)
        registry = ann.get(oci.ANNOTATION_REGISTRY)
        if repo and registry and registry != "docker.io":
            repo = registry + "/" + repo
        return repo, ann.get(oci.ANNOTATION_TAG) or ann.get(
            oci.ANNOTATION_REF_NAME)


def write_json_files(path, manifest, config_raw, annotations):
    """Write the git-tracked part of a layout into ``path``.

    Writes ``oci-layout``, ``index.json`` and the manifest and config blobs
    (exactly the registry's bytes, so their digests hold).  Returns the list
    of paths written.  Layer blobs are the store's business.
    """
    path = Path(path)
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    written = []
    for digest, raw in ((manifest.digest, manifest.raw),
                        (manifest.config.digest, config_raw)):
        if sha256_digest(raw) != digest:
            raise LayoutError("refusing to write blob %s: bytes do not match"
                              % digest)
        p = OCILayout(path).blob_path(digest)
        _write_atomic(p, raw)
        written.append(p)
    desc = oci.Descriptor(manifest.media_type, manifest.digest,
                          len(manifest.raw), annotations=annotations)
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
             "manifests": [desc.to_dict()]}
    for name, doc in (("oci-layout", OCI_LAYOUT_FILE), ("index.json", index)):
        p = path / name
        _write_atomic(p, (json.dumps(doc, indent=2, sort_keys=True) + "\n")
                      .encode())
        written.append(p)
    return written


def _write_atomic(path, data):
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
