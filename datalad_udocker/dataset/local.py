"""Getting a stored image's blobs onto this machine: one ``ensure_local``.

In a clone the layer blobs of a layout are git-annex symlinks whose content
may not be present.  Export and run both need every blob locally first;
:func:`ensure_local` gets the missing ones (through a ``fetch`` callback,
normally :func:`datalad_get`) and raises one LayoutError if any is still
missing.

A clone made while git-annex could not find ``git-annex-remote-udocker``
(``datalad clone`` called by absolute path from a venv that is not
activated) has our registry remote recorded in its git-annex branch but not
enabled, so git-annex cannot get a layer from it, ever.  Before getting,
:func:`datalad_get` enables it (:func:`enable_registry_remote`), with our
script directory on PATH.  ``datalad containers-run`` gets the image (its
layers) with DataLad's own ``get`` before our runner starts: for it, loading
the extension enables the remote (:func:`..hooks.enable_for_containers_run`).
"""
import logging
import os
import subprocess
import sys

from .. import config
from ..errors import LayoutError, UdockerError
from . import annex
from .layout import OCILayout

lgr = logging.getLogger("datalad.udocker.local")


def missing_blobs(layout):
    """Descriptors of the layout's config and layers whose content is not
    present (a layer git-annex has not fetched is a dangling symlink)."""
    manifest = layout.manifest()
    return [d for d in manifest.blobs()
            if not layout.blob_path(d.digest).exists()]


def enable_registry_remote(path):
    """Enable the registry remote in the repository holding ``path`` if its
    git-annex branch knows the remote but this clone has not enabled it.

    Returns True if it was enabled now (False: nothing to do, or ``path`` is
    not in a repository); raises a one-line UdockerError that says what to
    run if enabling failed.
    """
    name = config.SPECIAL_REMOTE_NAME
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    repo = top.stdout.strip()
    if top.returncode or not repo or annex.remote_uuid(repo, name) \
            or not annex._remote_known(repo, name):
        return False
    try:
        annex.ensure_special_remote(repo, name, config.SPECIAL_REMOTE_TYPE)
    except UdockerError as exc:
        raise UdockerError(
            "could not enable the git-annex special remote %s in %s (%s); run "
            "`git annex enableremote %s` there with %s on PATH" % (
                name, repo, exc, name, os.path.dirname(sys.executable)))
    lgr.info("enabled the git-annex special remote %s in %s (git-annex could "
             "not find git-annex-remote-udocker when it was cloned)", name, repo)
    return True


def datalad_get(dataset=None):
    """A ``fetch(paths)`` callback running ``datalad get`` on ``paths``.

    ``dataset`` is a Dataset, a path or None (the one holding the paths).
    The callback returns None, or a one-line reason why something could
    not be fetched.
    """
    def fetch(paths):
        from datalad.api import get
        try:
            for where in sorted({os.path.dirname(str(p)) for p in paths}):
                enable_registry_remote(where)
        except UdockerError as exc:
            return str(exc)
        try:
            results = get([str(p) for p in paths], dataset=dataset,
                          result_renderer="disabled", on_failure="ignore",
                          return_type="list")
        except Exception as exc:        # noqa: BLE001 -- datalad raises many
            return " ".join(str(exc).split()) or type(exc).__name__
        failed = [r for r in results if r.get("status") in ("error",
                                                             "impossible")]
        if failed:
            res = failed[0]
            msg = res.get("error_message") or res.get("message")
            if isinstance(msg, (tuple, list)) and msg:
                msg = msg[0] % tuple(msg[1:]) if len(msg) > 1 else msg[0]
            first = next((ln.strip() for ln in str(msg or "").splitlines()
                          if ln.strip()), "failed")
            return "datalad get: " + first
        return None
    return fetch


def ensure_local(layout, fetch=None):
    """Make every blob of ``layout`` (an OCILayout or a path) present.

    Missing blobs are handed to ``fetch(paths)`` (see :func:`datalad_get`;
    None: nothing is fetched).  Returns the OCILayout; raises LayoutError
    (one line, with fetch's reason) if a blob is still missing.
    """
    layout = layout if isinstance(layout, OCILayout) else OCILayout(layout)
    missing = missing_blobs(layout)
    if not missing:
        return layout
    reason = fetch([layout.blob_path(d.digest) for d in missing]) \
        if fetch is not None else None
    missing = missing_blobs(layout)
    if missing:
        if fetch is None:
            hint = "; get them with `datalad get %s`" % layout.path
        else:
            hint = ": " + reason if reason else \
                "; see `git annex whereis %s`" % layout.path
        raise LayoutError(
            "cannot get layer content of the image in %s: %d blob(s) are not "
            "present and could not be fetched (first: %s)%s" % (
                layout.path, len(missing), missing[0].digest, hint))
    return layout
