"""Getting a stored image's blobs onto this machine: one ``ensure_local``.

In a clone the layer blobs of a layout are git-annex symlinks whose content
may not be present.  Export and run both need every blob locally first;
:func:`ensure_local` gets the missing ones (through a ``fetch`` callback,
normally :func:`datalad_get`) and raises one LayoutError if any is still
missing.
"""
from ..errors import LayoutError
from .layout import OCILayout


def missing_blobs(layout):
    """Descriptors of the layout's config and layers whose content is not
    present (a layer git-annex has not fetched is a dangling symlink)."""
    manifest = layout.manifest()
    return [d for d in manifest.blobs()
            if not layout.blob_path(d.digest).exists()]


def datalad_get(dataset=None):
    """A ``fetch(paths)`` callback running ``datalad get`` on ``paths``.

    ``dataset`` is a Dataset, a path or None (the one holding the paths).
    The callback returns None, or a one-line reason why something could
    not be fetched.
    """
    def fetch(paths):
        from datalad.api import get
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
