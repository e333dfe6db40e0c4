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
    """

    _params_ = dict(
        ref=Parameter(
            args=("ref",), constraints=EnsureStr(),
            doc="""image reference, e.g. docker.io/library/busybox:1.36, or
            docker-archive:FILE / oci:DIR"""),
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
    )

    @staticmethod
    @datasetmethod(name="udocker_import")
    @eval_results
    def __call__(ref, path=None, dataset=None, name=None, platform=None,
                 source_ref=None):
        ds = require_dataset(dataset, check_installed=True,
                             purpose="import a container image")
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
