"""Result records and their rendering, shared by our commands.

DataLad's generic renderer prints nothing for a ``notneeded`` result, so a
command that had nothing to do would be silent.  Our commands render every
result, ``notneeded`` included, in the generic one-line style
(:func:`render_result`), and turn a :class:`~..errors.UdockerError` into a
failure record (:func:`failure`): ``impossible`` for what the user can fix
by asking differently, ``error`` for what went wrong on the way.
"""
from datalad.interface.results import get_status_dict
from datalad.support.exceptions import CapturedException

from ..errors import (InvalidReference, NotFoundError, PlatformNotFound,
                      ToolMissing)

# failures caused by what the user asked for (a bad reference, an unknown
# platform, image, name or tag, a missing execution tool): asking
# differently (or installing the tool) fixes them
USER_MISTAKES = (InvalidReference, NotFoundError, PlatformNotFound,
                 ToolMissing)


def failure(exc, action, path, logger=None, **kwargs):
    """The result record for ``exc`` (a UdockerError or OSError), with the
    exception captured for DataLad's reporting."""
    status = "impossible" if isinstance(exc, USER_MISTAKES) else "error"
    return get_status_dict(action=action, path=path, status=status,
                           message=str(exc), exception=CapturedException(exc),
                           logger=logger, **kwargs)


def render_result(res, **kwargs):
    """DataLad's generic one-line rendering, ``notneeded`` results too."""
    from datalad.interface.utils import generic_result_renderer
    if res.get("status") != "notneeded":
        generic_result_renderer(res)
        return
    from datalad.support import ansi_colors as ac
    from datalad.ui import ui
    msg = res.get("message") or ""
    if isinstance(msg, tuple):
        msg = msg[0] % msg[1:]
    ui.message("{action}({status}):{path}{type}{msg}".format(
        action=ac.color_word(res.get("action", ""), ac.BOLD),
        status=ac.color_status("notneeded"),
        path=" %s" % res["path"] if res.get("path") else "",
        type=" (%s)" % ac.color_word(res["type"], ac.MAGENTA)
        if res.get("type") else "",
        msg=" [%s]" % msg if msg else ""))
