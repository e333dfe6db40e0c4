"""``datalad udocker-containers``: list or prune the cached udocker containers."""
import logging
import time

from datalad.distribution.dataset import (
    EnsureDataset, datasetmethod, require_dataset)
from datalad.interface.base import Interface, build_doc, eval_results
from datalad.interface.results import get_status_dict
from datalad.support.constraints import EnsureFloat, EnsureNone
from datalad.support.param import Parameter

from ..errors import UdockerError
from ..run.runtime import Runtime

lgr = logging.getLogger("datalad.udocker.containers")


@build_doc
class UdockerContainers(Interface):
    """List or prune the containers extracted from imported images.

    The first run of an image in an execution mode extracts its layers into
    a container in the udocker directory (``datalad.udocker.dir``, default
    ``~/.cache/datalad-udocker/udocker``); later runs reuse it.  This command
    lists those containers, or with ``--prune`` deletes them (all, or those
    not used for ``--older-than`` days) to free space; a container a running
    command is using is kept.  Leftovers of interrupted first runs are
    listed as incomplete and always pruned.  A pruned container is re-created from the
    dataset on its next run.  The images in datasets are never touched.
    """

    _params_ = dict(
        prune=Parameter(
            args=("--prune",), action="store_true",
            doc="""delete cached containers instead of listing them"""),
        older_than=Parameter(
            args=("--older-than",), metavar="DAYS",
            constraints=EnsureFloat() | EnsureNone(),
            doc="""with --prune: only containers not used for DAYS days"""),
        dataset=Parameter(
            args=("-d", "--dataset"), constraints=EnsureDataset() | EnsureNone(),
            doc="""dataset whose own .git/config may name the udocker
            directory (its committed .datalad/config never does)
            [Default: the user's configuration]"""),
    )

    @staticmethod
    @datasetmethod(name="udocker_containers")
    @eval_results
    def __call__(prune=False, older_than=None, dataset=None):
        ds = require_dataset(dataset, check_installed=True,
                             purpose="find the udocker directory") \
            if dataset is not None else None
        try:
            runtime = Runtime(execmode="P1", dataset=ds)   # mode-independent
            if not prune:
                for entry in runtime.containers():
                    yield _record(entry, "udocker_containers", "ok")
                return
            removed, busy = runtime.prune(
                None if older_than is None else older_than * 86400)
        except UdockerError as exc:
            yield get_status_dict(action="udocker_containers", path=None,
                                  status="error", message=str(exc),
                                  logger=lgr)
            return
        for entry in removed:
            yield _record(entry, "udocker_prune", "ok", "removed")
        for entry in busy:
            yield _record(entry, "udocker_prune", "impossible",
                          "in use by a running command, kept")

    @staticmethod
    def custom_result_renderer(res, **kwargs):
        from datalad.ui import ui
        if res.get("action") != "udocker_containers" or \
                res.get("status") != "ok":
            from datalad.interface.utils import generic_result_renderer
            generic_result_renderer(res)
            return
        if not res.get("container_id"):
            ui.message("incomplete   %s (left by an interrupted run; "
                       "remove with --prune)" % res["name"])
            return
        ui.message("%-3s %s  %s  (last used %s)" % (
            res["execmode"], res["manifest_digest"][:19], res["image"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(res["last_used"]))))


def _record(entry, action, status, message=None):
    return get_status_dict(
        action=action, path=entry.path, type="directory", status=status,
        message=message, logger=lgr, name=entry.name,
        container_id=entry.container_id,
        manifest_digest=entry.manifest_digest, execmode=entry.execmode,
        image=entry.image, created=entry.created, last_used=entry.last_used)
