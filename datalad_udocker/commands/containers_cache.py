"""``datalad udocker-containers``: list or prune the cached udocker containers."""
import logging
import os
import time

from datalad.distribution.dataset import (
    EnsureDataset, datasetmethod, require_dataset)
from datalad.interface.base import Interface, build_doc, eval_results
from datalad.interface.results import get_status_dict
from datalad.support.constraints import EnsureFloat, EnsureNone
from datalad.support.param import Parameter
from datalad.utils import bytes2human

from ..errors import UdockerError
from ..run.cache import ContainerCache, disk_usage, known_udocker_dirs
from .results import failure, render_result

lgr = logging.getLogger("datalad.udocker.containers")


@build_doc
class UdockerContainers(Interface):
    """List or prune the containers extracted from imported images.

    The first run of an image in an execution mode extracts its layers into
    a container in the udocker directory (``datalad.udocker.dir``, default
    ``~/.cache/datalad-udocker/udocker``); later runs reuse it.  This command
    lists those containers with their size on disk and the total.

    With ``--prune`` it deletes them to free space, and says what it removed
    and how much it freed: all of them but those in use (a container a
    running command is using is always kept), or with ``--older-than DAYS``
    only those not used for that long.  Leftovers of interrupted first runs
    are listed as incomplete and always pruned.  A pruned container is
    re-created from the dataset on its next run.  The images in datasets are
    never touched.

    Only one udocker directory is listed or pruned: the one configured now.
    Containers left in a directory configured before are listed as such (by
    path, with their number); set ``DATALAD_UDOCKER_DIR`` to that path to
    list or prune them.
    """

    _params_ = dict(
        prune=Parameter(
            args=("--prune",), action="store_true",
            doc="""delete cached containers (all but those in use) instead
            of listing them"""),
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
        action = "udocker_prune" if prune else "udocker_containers"
        if older_than is not None and (not prune or older_than < 0):
            yield get_status_dict(
                action=action, status="impossible", logger=lgr,
                message="--older-than takes a number of days >= 0 and "
                "applies only with --prune")
            return
        ds = require_dataset(dataset, check_installed=True,
                             purpose="find the udocker directory") \
            if dataset is not None else None
        try:
            # the cache is the same for every mode
            cache = ContainerCache(execmode="P1", dataset=ds)
            udir = str(cache.udocker_dir)
            if prune:
                yield from _prune(cache, older_than)
            else:
                yield from _list(cache)
        except (UdockerError, OSError) as exc:
            yield failure(exc, action, None, lgr)
            return
        for other in known_udocker_dirs():
            if other == udir or not os.path.isdir(other):
                continue
            try:
                count = len(ContainerCache(other, "P1").containers())
            except OSError:         # gone or unreadable by now: not ours
                continue
            if count:
                yield get_status_dict(
                    action="udocker_dirs", path=other, type="directory",
                    status="ok", logger=lgr, containers=count, message=(
                        "%d cached container(s) in a udocker directory used "
                        "before (not %s): list or prune them with "
                        "DATALAD_UDOCKER_DIR=%s datalad udocker-containers%s"
                        % (count, udir, other, " --prune" if prune else "")))

    @staticmethod
    def custom_result_renderer(res, **kwargs):
        from datalad.ui import ui
        if res.get("action") != "udocker_containers" or \
                res.get("status") != "ok":
            render_result(res)
            return
        size = bytes2human(res["size"])
        if not res.get("container_id"):
            ui.message("incomplete  %9s  %s (left by an interrupted run; "
                       "remove with --prune)" % (size, res["name"]))
            return
        ui.message("%-3s %s  %9s  %s  (last used %s)" % (
            res["execmode"], res["manifest_digest"][:19], size, res["image"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(res["last_used"]))))

    @staticmethod
    def custom_result_summary_renderer(results):
        from datalad.ui import ui
        listed = [r for r in results if r.get("action") == "udocker_containers"
                  and r.get("status") == "ok"]
        removed = [r for r in results if r.get("action") == "udocker_prune"
                   and r.get("status") == "ok"]
        if listed:
            ui.message("%d cached container(s), %s in total, in %s" % (
                len(listed), bytes2human(sum(r["size"] for r in listed)),
                listed[0]["udocker_dir"]))
        if removed:
            ui.message("removed %d container(s), freed %s, in %s" % (
                len(removed), bytes2human(sum(r["size"] for r in removed)),
                removed[0]["udocker_dir"]))


def _list(cache):
    entries = cache.containers()
    for entry in entries:
        yield _record(cache, entry, "udocker_containers", "ok",
                      size=disk_usage(entry.path))
    if not entries:
        yield get_status_dict(
            action="udocker_containers", path=str(cache.udocker_dir),
            type="directory", status="notneeded", logger=lgr,
            udocker_dir=str(cache.udocker_dir),
            message="no cached containers")


def _prune(cache, older_than):
    # sizes first: what a removal frees is measured before it happens
    sizes = {e.name: disk_usage(e.path) for e in cache.containers()}
    removed, busy = cache.prune(
        None if older_than is None else older_than * 86400)
    for entry in removed:
        size = sizes.get(entry.name, 0)
        yield _record(cache, entry, "udocker_prune", "ok", size=size,
                      message="removed, %s freed" % bytes2human(size))
    for entry in busy:
        yield _record(cache, entry, "udocker_prune", "impossible",
                      size=sizes.get(entry.name, 0),
                      message="in use by a running command, kept")
    if not removed and not busy:
        kept = len(sizes)
        yield get_status_dict(
            action="udocker_prune", path=str(cache.udocker_dir),
            type="directory", status="notneeded", logger=lgr,
            udocker_dir=str(cache.udocker_dir), message=(
                "nothing to prune: no cached containers" if not kept else
                "nothing to prune: all %d cached container(s) were used in "
                "the last %g day(s)" % (kept, older_than or 0)))


def _record(cache, entry, action, status, size, message=None):
    return get_status_dict(
        action=action, path=entry.path, type="directory", status=status,
        message=message, logger=lgr, name=entry.name,
        container_id=entry.container_id,
        manifest_digest=entry.manifest_digest, execmode=entry.execmode,
        image=entry.image, created=entry.created, last_used=entry.last_used,
        size=size, udocker_dir=str(cache.udocker_dir))
