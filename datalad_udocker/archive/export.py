"""Export a stored image as a ``docker load`` tarball or an OCI archive.

The layout a dataset holds already has everything ``docker load`` needs:
the config, and the layer blobs exactly as the registry served them
(``docker load`` and skopeo accept gzip layers).  The export streams them
into a tar in one pass, nothing staged (see
:func:`.docker_archive.write_archive`), so it can go to a pipe.  Only zstd
layers change, in a docker-archive: Docker before 23 cannot read zstd, so
they go in decompressed (read twice: once for the size, once into the tar).
The image ID Docker computes (the config's digest) is the stored one, and
two exports of an image are the same bytes.

The image is tagged with the name and tag it was imported under (the
``org.datalad.udocker.*`` annotations of the layout's index.json), and the
exported ``index.json`` keeps those annotations, so importing the archive
again (``docker-archive:FILE``) finds the registry the layers came from.
"""
import os
import tempfile
from pathlib import Path

from .docker_archive import write_archive
from ..errors import UdockerError
from ..dataset.layout import OCILayout
from ..dataset.local import ensure_local

FORMATS = ("docker-archive", "oci-archive")


def layer_paths(layout_path):
    """``{digest: path}`` of every layer blob of the layout's image."""
    layout = OCILayout(layout_path)
    return {l.digest: layout.blob_path(l.digest)
            for l in layout.manifest().layers}


def repo_tags(layout):
    """``["name:tag"]`` the image was imported as, or [] if unknown."""
    repo, tag = layout.image_name()
    return ["%s:%s" % (repo, tag or "latest")] if repo else []


def export_image(layout_path, out, fmt="docker-archive", tags=None):
    """Write the image stored at ``layout_path`` to the binary stream ``out``.

    ``tags`` overrides the RepoTags (default: the imported name and tag).
    Raises LayoutError if the layout is broken or layer content is missing
    (nothing is written then), DigestMismatch if a layer file turns out not
    to hold its bytes (the stream is then incomplete).
    """
    if fmt not in FORMATS:
        raise UdockerError("unknown export format %r: use %s"
                           % (fmt, " or ".join(FORMATS)))
    layout = ensure_local(layout_path)
    manifest = layout.manifest()
    config_raw = layout.read_blob(manifest.config.digest)
    paths = layer_paths(layout_path)
    write_archive(out, manifest, config_raw, paths,
                  repo_tags(layout) if tags is None else list(tags),
                  layout.annotations(), fmt)


def export_to_file(layout_path, dest, fmt="docker-archive", tags=None):
    """Export to the file ``dest``, which appears only once complete."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".",
                               dir=str(dest.parent))
    try:
        with os.fdopen(fd, "wb") as out:
            export_image(layout_path, out, fmt, tags)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    return dest
