"""The containers-run call format (:data:`.config.CMDEXEC`) and what it needs.

``datalad containers-run`` puts the image path, single-quoted, into a shell
command that DataLad records and reruns, and the shell finds our runner
(:data:`RUNNER`, the console script of :mod:`.run.cli`) on PATH.  Import
refuses image paths the quotes cannot carry (:func:`check_image_path`); this
package's import, which is how DataLad loads the extension, makes the runner
findable from an unactivated venv (:func:`make_runner_findable`).  Kept apart
from :mod:`.run` so that loading the extension stays cheap.
"""
import os
import shutil
import sys
import sysconfig

from .errors import UdockerError

RUNNER = "datalad-udocker-run"

# what single quotes in the shell (and DataLad's own {placeholder}
# expansion of a run command) cannot carry literally
_UNQUOTABLE = set("'{}") | {chr(c) for c in range(32)} | {chr(127)}


def check_image_path(relpath):
    """Refuse an image path that the call format cannot carry.

    The path ends up single-quoted in a shell command (:data:`.config.CMDEXEC`)
    which DataLad also expands ``{placeholders}`` in: spaces, ``$``, ``;``,
    backticks and double quotes are fine, a single quote, a brace or a
    control character is not.
    """
    bad = sorted(set(relpath) & _UNQUOTABLE)
    if bad:
        raise UdockerError(
            "cannot store an image at %r: containers-run cannot pass a path "
            "containing %s; choose a path without them"
            % (relpath, " ".join(repr(c) for c in bad)))


def make_runner_findable():
    """Append the directory of our console script to PATH if it is not found.

    ``containers-run`` executes the recorded ``datalad-udocker-run ...`` with
    a shell that searches PATH, which lacks an unactivated venv's bin.
    """
    if shutil.which(RUNNER):
        return
    for scripts in (os.path.dirname(sys.executable),
                    sysconfig.get_path("scripts"),
                    sysconfig.get_path("scripts", "%s_user" % os.name)):
        if scripts and os.access(os.path.join(scripts, RUNNER), os.X_OK):
            path = os.environ.get("PATH")
            os.environ["PATH"] = (path + os.pathsep if path else "") + scripts
            return
