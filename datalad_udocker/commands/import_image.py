"""``datalad udocker-import``: an image from a registry or archive into a dataset."""
import logging

from datalad.distribution.dataset import (
    EnsureDataset, datasetmethod, require_dataset, resolve_path)
from datalad.interface.base import Interface, build_doc, eval_results
from datalad.interface.results import get_status_dict
from datalad.support.constraints import EnsureNone, EnsureStr
from datalad.support.param import Parameter

from .. import config, oci
from ..errors import UdockerError
from ..registry.client import RegistryClient
from ..dataset.store import store_image
from ..dataset.update import NotTracking, container_names, tracked_image
from ..transports import open_image
from .results import failure, render_result

lgr = logging.getLogger("datalad.udocker.import")


def open_image_source(ds, ref, platform=None, source_ref=None):
    """The ImageSource for REF: a registry reference or an archive/OCI dir."""
    insecure = config.insecure_registries(ds)

    def client_factory(reference):
        return RegistryClient(reference.registry, insecure_registries=insecure)

    wanted = oci.Platform.parse(platform) if platform else None
    return open_image(ref, client_factory, wanted, source_ref)


@build_doc
class UdockerImport(Interface):
    """Import a container image into the dataset, layers annexed with registry URLs.

    REF is an image reference as Docker parses it (``busybox``,
    ``quay.io/org/img:tag``, ``localhost:5000/repo@sha256:...``), or a local
    source with skopeo's prefixes: ``docker-archive:FILE.tar[:name:tag]`` or
    ``oci:DIR[:tag]`` or ``oci-archive:FILE[:tag]``.

    The image is written to PATH as an OCI image layout: manifest, config and
    index JSON are committed to git; every layer is annexed under the
    git-annex key equal to its registry digest, with its registry blob URL
    registered, so that a clone can ``datalad get`` it from the registry.
    The image is registered with datalad-container under NAME, so that
    ``datalad containers-run -n NAME CMD`` runs it with udocker.

    Importing the same image again does nothing (and says so: status
    notneeded); importing a newer tag to the same PATH updates the layout and
    reuses unchanged layers.  The result names the platform that was stored
    (from a multi-platform image: this machine's, or --platform).

    A reference the registry does not know fails with status impossible,
    saying whether the repository is missing or only the tag (listing tags
    the repository has).

    With --update, REF is the NAME of a container in the dataset (or absent:
    every container) and each image imported from a registry by tag is
    brought up to date: its recorded reference is resolved again (same
    registry, repository, tag and platform) and a changed manifest is stored
    at the same path under the same name, downloading only layers the annex
    lacks; an unchanged one is notneeded.  Images imported by digest are
    pinned and never updated, images from archives follow no tag: naming one
    is impossible, and without a name they are notneeded, saying why.
    """

    _params_ = dict(
        ref=Parameter(
            args=("ref",), nargs="?", constraints=EnsureStr() | EnsureNone(),
            doc="""image reference, e.g. docker.io/library/busybox:1.36, or
            docker-archive:FILE / oci:DIR; with --update: a container NAME
            (default: every container)"""),
        path=Parameter(
            args=("path",), nargs="?", constraints=EnsureStr() | EnsureNone(),
            doc="""where to store the image layout in the dataset.
            [Default: .datalad/environments/NAME/image]"""),
        dataset=Parameter(
            args=("-d", "--dataset"), constraints=EnsureDataset() | EnsureNone(),
            doc="dataset to import into [Default: the current one]"),
        name=Parameter(
            args=("-n", "--name"), constraints=EnsureStr() | EnsureNone(),
            doc="""container name for containers-run. [Default: the last
            component of the repository name]"""),
        platform=Parameter(
            args=("--platform",), metavar="OS/ARCH[/VARIANT]",
            constraints=EnsureStr() | EnsureNone(),
            doc="""platform to pick from a multi-platform image.
            [Default: this machine's]"""),
        source_ref=Parameter(
            args=("--source-ref",), metavar="REF",
            constraints=EnsureStr() | EnsureNone(),
            doc="""for archive imports: the registry reference the image was
            pulled from, so its layers get registry URLs"""),
        update=Parameter(
            args=("--update",), action="store_true",
            doc="""update the named container (REF), or every container,
            from the registry tag it was imported from"""),
    )

    @staticmethod
    @datasetmethod(name="udocker_import")
    @eval_results
    def __call__(ref=None, path=None, dataset=None, name=None, platform=None,
                 source_ref=None, update=False):
        ds = require_dataset(dataset, check_installed=True,
                             purpose="import a container image")
        if update or not ref:
            yield from _update_images(ds, ref, update,
                                      path or platform or source_ref or name)
            return
        target = str(resolve_path(path, dataset)) if path else None
        try:
            image = open_image_source(ds, ref, platform, source_ref)
            chosen = str(oci.parse_config(image.config_raw).platform) \
                or "unknown"
            outcome = store_image(ds, image, target, name,
                                  jobs=config.download_jobs(ds))
        except UdockerError as exc:
            yield failure(exc, "udocker_import", target or ds.path, lgr,
                          type="directory" if target else "dataset")
            return
        yield get_status_dict(
            action="udocker_import", ds=ds, path=outcome.path,
            type="directory", status=outcome.status,
            message="%s; platform %s" % (outcome.message, chosen),
            container_name=outcome.name, manifest_digest=outcome.manifest_digest,
            platform=chosen, layers_downloaded=outcome.downloaded,
            layers_reused=outcome.reused, notes=list(image.notes), logger=lgr)

    custom_result_renderer = staticmethod(render_result)


def _update_images(ds, name, update, other_options):
    """``--update [NAME]``: re-resolve the tag(s) images were imported by."""
    if not update or other_options:
        yield get_status_dict(
            action="udocker_import", ds=ds, status="impossible", logger=lgr,
            message="give an image reference to import, or --update [NAME] "
            "alone (it keeps each image's path, name and platform)")
        return
    names = [name] if name else container_names(ds)
    if not names:
        yield get_status_dict(
            action="udocker_update", ds=ds, status="notneeded", logger=lgr,
            message="no containers in the dataset")
    for each in names:
        try:
            tracked = tracked_image(ds, each)
        except NotTracking as exc:
            yield get_status_dict(
                action="udocker_update", ds=ds, container_name=each,
                status="impossible" if name else "notneeded",
                message=str(exc), logger=lgr)
            continue
        except UdockerError as exc:
            yield failure(exc, "udocker_update", ds.path, lgr,
                          type="dataset", container_name=each)
            continue
        yield _update_one(ds, tracked)


def _update_one(ds, tracked):
    """Resolve ``tracked``'s tag again and store what it names now."""
    ref = str(tracked.reference)
    try:
        image = open_image_source(ds, ref, tracked.platform)
        outcome = store_image(ds, image, str(tracked.path), tracked.name,
                              jobs=config.download_jobs(ds))
    except UdockerError as exc:
        return failure(exc, "udocker_update", str(tracked.path), lgr,
                       type="directory", container_name=tracked.name)
    if outcome.status == "notneeded":
        message = "%s is up to date with %s (manifest %s)" % (
            tracked.name, ref, outcome.manifest_digest)
    elif outcome.manifest_digest == tracked.manifest_digest:
        message = "%s: manifest %s unchanged, its record of %s rewritten" % (
            tracked.name, outcome.manifest_digest, ref)
    else:
        message = ("updated %s from %s: manifest %s (was %s); %d layer(s) "
                   "downloaded, %d reused" % (
                       tracked.name, ref, outcome.manifest_digest,
                       tracked.manifest_digest, len(outcome.downloaded),
                       len(outcome.reused)))
    return get_status_dict(
        action="udocker_update", ds=ds, path=outcome.path, type="directory",
        status=outcome.status, message=message, container_name=tracked.name,
        reference=ref, manifest_digest=outcome.manifest_digest,
        previous_manifest_digest=tracked.manifest_digest,
        layers_downloaded=outcome.downloaded, layers_reused=outcome.reused,
        notes=list(image.notes), logger=lgr)
