"""The containers-run call format (:data:`.config.CMDEXEC`) and what it needs.

``datalad containers-run`` puts the image path, single-quoted, into a shell
command that DataLad records and reruns, and the shell finds our runner
(:data:`RUNNER`, the console script of :mod:`.run.cli`) on PATH.  Import
refuses image paths the quotes cannot carry (:func:`check_image_path`); this
package's import, which is how DataLad loads the extension, makes the runner
findable from an unactivated venv (:func:`make_runner_findable`) and titles
run commits with the user's command (:func:`title_runs_with_user_command`).
Kept apart from :mod:`.run` so that loading the extension stays cheap.
"""
import contextlib
import functools
import os
import re
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


# --- run commit titles -------------------------------------------------------
# The command containers-run records is the expanded call format; DataLad
# titles a run commit with its first 40 characters, which would always be
# "datalad-udocker-run -d '.' '.datalad/env...".  Our call formats end with
# the user's command, after the image path (single-quoted, so unambiguous;
# 0.1's unquoted paths held no spaces).
CMDEXEC_0_1 = ("{python} -m datalad_udocker.runtime_cli --dataset "
               "{img_dspath} {img} {cmd}")


def _expanded_pattern(callformat):
    """A regex matching ``callformat`` expanded, the command as group cmd."""
    out = []
    for part in re.split(r"('?\{\w+\}'?)", callformat):
        field = re.fullmatch(r"('?)\{(\w+)\}\1", part)
        if not field:
            out.append(re.escape(part))
        elif field.group(2) == "cmd":
            out.append("(?P<cmd>.*)")
        else:
            out.append("'[^']*'" if field.group(1) else r"\S+")
    return re.compile("".join(out), re.S)


@functools.lru_cache(maxsize=None)
def _expanded_patterns():
    from .config import CMDEXEC
    return [_expanded_pattern(f) for f in (CMDEXEC, CMDEXEC_0_1)]
_CONTAINERS_RUN = "datalad_container.containers_run"


def user_command(cmd):
    """The user's command in ``cmd``, a command line expanded from one of our
    call formats (:data:`.config.CMDEXEC`, 0.1's), else None."""
    for pattern in _expanded_patterns():
        match = pattern.fullmatch(cmd) if isinstance(cmd, str) else None
        if match and match.group("cmd").strip():
            return match.group("cmd")
    return None


def title_runs_with_user_command():
    """Make ``containers-run`` title the run commits of our images with the
    user's command (first 40 characters, as ``datalad run CMD`` does) instead
    of the call format; the run record keeps the whole command, so ``datalad
    rerun`` is unchanged, and a ``--message`` given by the user still wins.

    How: datalad-container's ``containers_run`` calls ``run_command``, a
    name of its module looked up at each call (by the CLI and ``datalad.api``
    alike), with the expanded command and ``message=None`` unless the user
    gave one; we wrap that name to pass the user's command as the message
    (:func:`_titled`), as datalad-next patches DataLad.  Its module is
    wrapped now if it is imported, else right after its import
    (:class:`_AfterImport`): loading it here would slow every other command.
    """
    module = sys.modules.get(_CONTAINERS_RUN)
    if module is not None:
        _wrap_run_command(module)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


def _wrap_run_command(module):
    run_command = getattr(module, "run_command", None)
    if run_command is None or getattr(run_command, "_udocker_titled", False):
        return
    module.run_command = _titled(run_command)


def _titled(run_command):
    @functools.wraps(run_command)
    def run_command_titled(cmd, *args, **kwargs):
        user = user_command(cmd) if kwargs.get("message") is None else None
        if user is not None:
            kwargs["message"] = _shorty(user)
        return run_command(cmd, *args, **kwargs)
    run_command_titled._udocker_titled = True
    return run_command_titled


def _shorty(cmd):
    """DataLad's own short form of a command (a commit title)."""
    try:
        from datalad.core.local.run import _format_cmd_shorty
    except ImportError:     # a DataLad that renamed it: the same by hand
        return cmd[:40] + ("..." if len(cmd) > 40 else "")
    return _format_cmd_shorty(cmd)


class _AfterImport:
    """A ``sys.meta_path`` finder that wraps datalad-container's
    containers_run module when it is imported (then leaves)."""

    def find_spec(self, name, path=None, target=None):
        if name != _CONTAINERS_RUN:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and \
                        hasattr(spec.loader, "exec_module"):
                    spec.loader = _WrappingLoader(spec.loader)
                return spec
        return None


class _WrappingLoader:
    """``loader``, which then wraps the module's run_command."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _wrap_run_command(module)

    def __getattr__(self, name):        # get_source, get_code...
        return getattr(self._loader, name)
