"""``datalad udocker-export``: a stored image as a ``docker load`` tarball."""
import logging
import os
import sys
from contextlib import contextmanager

from datalad.distribution.dataset import (
    EnsureDataset, datasetmethod, require_dataset, resolve_path)
from datalad.interface.base import Interface, build_doc, eval_results
from datalad.interface.results import get_status_dict
from datalad.support.constraints import EnsureChoice, EnsureNone, EnsureStr
from datalad.support.exceptions import CapturedException
from datalad.support.param import Parameter

from ..errors import UdockerError
from ..archive.export import FORMATS, export_image, export_to_file
from ..dataset.local import datalad_get, ensure_local
from .results import failure, render_result

lgr = logging.getLogger("datalad.udocker.export")


def resolve_image(ds, name_or_path, dataset=None):
    """``(layout_dir, label)``: a container name of ``ds``, else a path."""
    ds.config.reload()
    image = ds.config.get("datalad.containers.%s.image" % name_or_path)
    if image:
        return os.path.join(ds.path, image), name_or_path
    path = str(resolve_path(name_or_path, dataset))
    if not os.path.isdir(path):
        raise UdockerError(
            "%s is neither a container of %s (see `datalad containers-list`) "
            "nor an image directory" % (name_or_path, ds.path))
    return path, os.path.basename(os.path.normpath(path))


@contextmanager
def reserved_stdout():
    """A binary file on the real stdout, while fd 1 itself goes to stderr.

    Everything else that would print (result rendering, git-annex, log
    handlers) lands on stderr until the context ends, so only the tar
    reaches the pipe.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(os.dup(saved), "wb") as out:
            yield out
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@build_doc
class UdockerExport(Interface):
    """Export an image stored in the dataset for docker load, or as OCI.

    NAME_OR_PATH is a container name registered in the dataset (by
    ``datalad udocker-import``) or the path of an image directory.  Layers
    whose content is not present are fetched first (``datalad get``).

    The default format, docker-archive, is a tarball that ``docker load``
    and ``skopeo ... docker-archive:FILE`` accept; the image is tagged with
    the name and tag it was imported as.  oci-archive is a tar of the OCI
    image layout (``skopeo ... oci-archive:FILE``).  Layers are written as
    stored (compressed, as the registry served them), in one pass, so
    ``datalad udocker-export NAME -o - | docker load`` works.
    """

    _params_ = dict(
        name=Parameter(
            args=("name",), metavar="NAME_OR_PATH", constraints=EnsureStr(),
            doc="container name (see containers-list) or image directory"),
        dataset=Parameter(
            args=("-d", "--dataset"), constraints=EnsureDataset() | EnsureNone(),
            doc="dataset holding the image [Default: the current one]"),
        output=Parameter(
            args=("-o", "--output"), metavar="FILE|-",
            constraints=EnsureStr() | EnsureNone(),
            doc="""file to write, or '-' for stdout (pipe it into ``docker
            load``). [Default: NAME.tar in the current directory]"""),
        format=Parameter(
            args=("--format",), constraints=EnsureChoice(*FORMATS),
            doc="archive format"),
    )

    @staticmethod
    @datasetmethod(name="udocker_export")
    @eval_results
    def __call__(name, dataset=None, output=None, format="docker-archive"):
        ds = require_dataset(dataset, check_installed=True,
                             purpose="export a container image")
        res = dict(action="udocker_export", ds=ds, logger=lgr)
        if output != "-":
            yield from _export(ds, name, dataset, output, format, None, res)
        elif os.isatty(1):
            yield get_status_dict(
                status="impossible", path=ds.path, message=(
                    "refusing to write a tar archive to a terminal: redirect "
                    "stdout or pipe it (e.g. into `docker load`)"), **res)
        else:
            with reserved_stdout() as out:
                yield from _export(ds, name, dataset, output, format, out, res)

    custom_result_renderer = staticmethod(render_result)


def _export(ds, name, dataset, output, fmt, stream, res):
    """Resolve, get missing layers, write; yield one result record."""
    try:
        layout, label = resolve_image(ds, name, dataset)
    except UdockerError as exc:     # an unknown name: the user's to fix
        yield get_status_dict(status="impossible", path=ds.path,
                              message=str(exc),
                              exception=CapturedException(exc), **res)
        return
    try:
        ensure_local(layout, datalad_get(ds))
    except UdockerError as exc:
        yield failure(exc, path=layout, **res)
        return
    dest = None if stream else os.path.abspath(output or "%s.tar" % label)
    try:
        if stream:
            export_image(layout, stream, fmt)
            stream.flush()
        else:
            export_to_file(layout, dest, fmt)
    except (UdockerError, OSError) as exc:
        yield get_status_dict(status="error", path=dest or layout,
                              message="export failed: %s" % exc,
                              exception=CapturedException(exc), **res)
        return
    if stream:
        yield get_status_dict(status="ok", path=layout, type="directory",
                              output="-", message="exported %s to stdout as %s"
                              % (label, fmt), **res)
    else:
        yield get_status_dict(status="ok", path=dest, type="file", image=layout,
                              message="exported %s as %s" % (label, fmt), **res)
