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

What is verified when: before anything is written, every layer stored as
it is (all but the zstd ones of a docker-archive) is checked by
:meth:`..run.udocker_repo.UdockerRepo.verify_blob`, the check that feeding
an image to udocker does, with its memo: a file hashed before (by an export
or a run) whose device, inode, size and mtime are unchanged is not hashed
again (git-annex objects are write-protected and never change in place;
writing to one changes its mtime, so it is hashed again).  A corrupt layer
so fails the export before its first byte; the checked layers are then
copied by the kernel (``os.sendfile``), their size checked as they go.
zstd layers of a docker-archive pass through Python anyway and are hashed
as they stream.  Silent corruption of an unchanged file on the disk is for
``git annex fsck`` to find.

The image is tagged with the name and tag it was imported under (the
``org.datalad.udocker.*`` annotations of the layout's index.json), and the
exported ``index.json`` keeps those annotations, so importing the archive
again (``docker-archive:FILE``) finds the registry the layers came from.
"""
import os
import tempfile
from pathlib import Path

from .docker_archive import write_archive
from .. import config, oci
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
    Raises LayoutError if the layout is broken or layer content is missing,
    DigestMismatch if a layer file does not hold its bytes (nothing is
    written then), or, for a file that changes during the export or a zstd
    layer, later (the stream is then incomplete).
    """
    if fmt not in FORMATS:
        raise UdockerError("unknown export format %r: use %s"
                           % (fmt, " or ".join(FORMATS)))
    layout = ensure_local(layout_path)
    manifest = layout.manifest()
    config_raw = layout.read_blob(manifest.config.digest)
    paths = layer_paths(layout_path)
    verified = verify_layers(manifest, paths, fmt)
    write_archive(out, manifest, config_raw, paths,
                  repo_tags(layout) if tags is None else list(tags),
                  layout.annotations(), fmt, verified)


def verify_layers(manifest, paths, fmt):
    """Check the layers the archive holds as stored (DigestMismatch at the
    first corrupt one); returns their digests."""
    from ..run.udocker_repo import UdockerRepo
    repo = UdockerRepo(config.udocker_dir())
    verified = set()
    for layer in manifest.layers:
        if fmt == "docker-archive" and \
                oci.layer_compression(layer.media_type) == "zstd":
            continue        # decompressed, and hashed, by write_archive
        if layer.digest not in verified:
            repo.verify_blob(paths[layer.digest], layer.digest, layer.size)
            verified.add(layer.digest)
    return verified


def export_to_file(layout_path, dest, fmt="docker-archive", tags=None):
    """Export to the file ``dest``, which appears only once complete."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".",
                               dir=str(dest.parent))
    try:
        with os.fdopen(fd, "wb") as out:
            export_image(layout_path, out, fmt, tags)
        try:    # renaming over a file makes ext4 write the new one out first
            os.unlink(dest)
        except FileNotFoundError:
            pass
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    return dest
