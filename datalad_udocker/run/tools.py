"""Execution modes, the host tools they need, and the wrappers udocker calls.

udocker 1.3.17 would download its own tools tarball on every command; we set
``UDOCKER_TARBALL=""`` so it never does, and point it at the tools Debian
packages (or at tools a ``udocker install`` left in ``$UDOCKER_DIR/bin``):

====  ============================================  ==========================
mode  engine                                        Debian packages
====  ============================================  ==========================
P1    PRoot, seccomp filter acceleration            ``proot``
P2    PRoot, plain ptrace (slower, most portable)   ``proot``
F1    Fakechroot (LD_PRELOAD; glibc images only)    ``fakechroot``, ``patchelf``
R1    rootless runc / crun (user namespaces)        ``runc`` (or ``crun``)
====  ============================================  ==========================

udocker does not call those tools directly but through small per-run shell
wrappers (:func:`write_wrappers`) that

* drop the ``-k KERNEL`` udocker always passes to PRoot: Debian's PRoot 5.1.0
  breaks on recent kernels with any ``-k`` (``stat`` fails with "Invalid
  argument"), and no udocker setting stops it from passing one;
* start PRoot through :mod:`.proot_launch`, which makes the system calls
  PRoot 5.1 does not translate (``statx``, ``faccessat2``...) fail with
  ENOSYS so programs fall back to ones it does (the command then sees the
  container's files, never the host's), drops PRoot's ``proot info:`` lines
  from stderr and exits with the command's status as Docker reports it
  (128+N after signal N, where PRoot says 255);
* run the tool under :mod:`.supervise`, which passes the runner's signals
  on to the command as ``docker run`` does and kills every process of the
  run after a grace period (no process of an interrupted run survives);
* send the user command's stdout and stderr to the caller's file
  descriptors and report its exit status on a third one.  This keeps
  udocker's own messages (banners, warnings, R1's ``<Popen: returncode: N>``)
  apart from the command's output, works around udocker's R1 engine, which
  otherwise pipes everything through a pseudo-terminal and exits 1 whatever
  the command did, and gives the command's real exit code in every mode.

For F1 udocker runs ``env -i ... COMMAND`` found on ``PATH``, so the wrapper
directory goes first on udocker's ``PATH`` and holds an ``env`` wrapper.
"""
import glob
import os
import shlex
import shutil
import sys
from pathlib import Path

from ..errors import RuntimeError_, ToolMissing

EXEC_MODES = {
    "P1": "PRoot with seccomp acceleration",
    "P2": "PRoot without seccomp (slower)",
    "F1": "Fakechroot (dynamically linked glibc images)",
    "R1": "rootless runc/crun (needs unprivileged user namespaces)",
}

# the stdlib-only script between the proot wrapper and PRoot (isolated, no
# site: it starts in milliseconds)
PROOT_LAUNCHER = (sys.executable, "-I", "-S",
                  str(Path(__file__).with_name("proot_launch.py")))
# the stdlib-only script every wrapper runs its tool under: passes the
# runner's signals on, kills what is left after the grace period
SUPERVISOR = (sys.executable, "-I", "-S",
              str(Path(__file__).with_name("supervise.py")))
STOP_GRACE = 10.0    # seconds, as `docker stop`
TOOL_CLEANUP = 2.0   # seconds runc and PRoot get to end after the command

_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_FAKECHROOT_GLOBS = ("/usr/lib/*/fakechroot/libfakechroot.so",
                     "/usr/lib/fakechroot/libfakechroot.so",
                     "/usr/lib64/fakechroot/libfakechroot.so")


def check_execmode(mode):
    """The upper-cased mode, or RuntimeError_ for a mode we cannot run."""
    mode = str(mode or "").upper()
    if mode not in EXEC_MODES:
        raise RuntimeError_(
            "unknown execution mode %r (datalad.udocker.execmode): use one of "
            "%s" % (mode, ", ".join(EXEC_MODES)))
    return mode


def _which(name):
    path = os.environ.get("PATH", os.defpath) + os.pathsep + \
        os.pathsep.join(_SBIN_DIRS)
    return shutil.which(name, path=path)


def _udocker_own(udocker_dir, prefix):
    """A tool udocker's ``install`` put into ``$UDOCKER_DIR/bin``, if any."""
    found = sorted(glob.glob(os.path.join(udocker_dir, "bin", prefix + "*")))
    return next((f for f in found if os.access(f, os.X_OK)), None)


def _user_setting(var):
    """A tool path the user set in udocker's own variable, if it exists."""
    value = os.environ.get(var)
    return value if value and os.path.exists(value) else None


def find_tools(mode, udocker_dir):
    """Host tools for ``mode``: ``{"proot"|"runc"|"fakechroot_so"|"patchelf": path}``.

    Raises ToolMissing with a one-line message naming the Debian package.
    """
    mode = check_execmode(mode)
    tools = {}
    if mode in ("P1", "P2"):
        tools["proot"] = (_user_setting("UDOCKER_USE_PROOT_EXECUTABLE")
                          or _which("proot")
                          or _udocker_own(udocker_dir, "proot"))
        if not tools["proot"]:
            raise ToolMissing(
                "execution mode %s needs PRoot, which is not installed: "
                "install the Debian package 'proot' (apt-get install proot) "
                "or run `udocker install`, or choose another mode with "
                "`git config --global datalad.udocker.execmode R1`" % mode)
    elif mode == "R1":
        tools["runc"] = (_user_setting("UDOCKER_USE_RUNC_EXECUTABLE")
                         or _which("runc") or _which("crun")
                         or _udocker_own(udocker_dir, "runc")
                         or _udocker_own(udocker_dir, "crun"))
        if not tools["runc"]:
            raise ToolMissing(
                "execution mode R1 needs runc or crun, which is not "
                "installed: install the Debian package 'runc' (apt-get "
                "install runc), or choose another mode with `git config "
                "--global datalad.udocker.execmode P1`")
    elif mode == "F1":
        so = _user_setting("UDOCKER_FAKECHROOT_SO") or next(
            (p for g in _FAKECHROOT_GLOBS for p in sorted(glob.glob(g))), None)
        patchelf = (_user_setting("UDOCKER_USE_PATCHELF_EXECUTABLE")
                    or _which("patchelf"))
        missing = [pkg for pkg, have in (("fakechroot", so),
                                         ("patchelf", patchelf)) if not have]
        if missing:
            raise ToolMissing(
                "execution mode F1 needs %s, which is not installed: install "
                "the Debian package%s %s (apt-get install %s), or choose "
                "another mode with `git config --global "
                "datalad.udocker.execmode P1`" % (
                    " and ".join(missing), "s" if len(missing) > 1 else "",
                    " and ".join("'%s'" % m for m in missing),
                    " ".join(missing)))
        tools["fakechroot_so"] = so
        tools["patchelf"] = patchelf
    return tools


_WRAPPER = """#!/bin/bash
# Written by datalad-udocker for one udocker run: calls {real}.
# {purpose}
args=()
dropk={dropk}
while [ $# -gt 0 ]; do
  if [ "$dropk" = 1 ] && [ "$1" = -k ] && [ $# -gt 1 ]; then
    dropk=0; shift 2; continue
  fi
  args+=("$1"); shift
done
if {{ true >&{status}; }} 2>/dev/null; then
  {command} "${{args[@]}}" 1>&{out} 2>&{err} {out}>&- {err}>&- {status}>&-
  rc=$?
  echo "$rc" >&{status}
  exit "$rc"
fi
exec {real_q} "${{args[@]}}"     # udocker's own probes, e.g. 'proot --help'
"""


def write_wrappers(bin_dir, tools, fds, pidfile, grace=STOP_GRACE):
    """Write the wrappers for ``tools`` into ``bin_dir``.

    ``fds`` is ``(stdout, stderr, status)``: descriptor numbers udocker
    inherits from us and passes on to the tool it runs.  Each wrapper runs
    its tool under :mod:`.supervise`, which writes its pid to ``pidfile``
    (signals for the command go there) and kills what is left ``grace``
    seconds after a TERM, INT, HUP or QUIT.  Returns the environment
    entries pointing udocker at the wrappers.
    """
    out, err, status = fds
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = {}

    def wrap(name, real, purpose, dropk=False, launcher=(), cleanup=0.0):
        command = list(SUPERVISOR) + [str(pidfile), repr(float(grace)),
                                      repr(cleanup), "--"] + \
            list(launcher) + [real]
        text = _WRAPPER.format(real=real, real_q=shlex.quote(real),
                               command=shlex.join(command),
                               purpose=purpose, dropk=int(dropk), out=out,
                               err=err, status=status)
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
        return str(path)

    if "proot" in tools:
        env["UDOCKER_USE_PROOT_EXECUTABLE"] = wrap(
            "proot", tools["proot"],
            "Drops udocker's '-k KERNEL' (PRoot 5.1 breaks with it); "
            "proot_launch.py\n# hides the host's file metadata and gives "
            "Docker's exit status.", dropk=True, launcher=PROOT_LAUNCHER,
            cleanup=TOOL_CLEANUP)
    if "runc" in tools:
        name = "crun" if "crun" in os.path.basename(tools["runc"]) else "runc"
        env["UDOCKER_USE_RUNC_EXECUTABLE"] = wrap(
            name, tools["runc"], "Bypasses udocker's pseudo-terminal copy.",
            cleanup=TOOL_CLEANUP)
    if "fakechroot_so" in tools:
        env["UDOCKER_FAKECHROOT_SO"] = tools["fakechroot_so"]
        env["UDOCKER_USE_PATCHELF_EXECUTABLE"] = tools["patchelf"]
        wrap("env", _which("env") or "/usr/bin/env",
             "udocker's F1 engine runs 'env -i VARS... COMMAND'.")
    return env


def udocker_environment(udocker_dir, tool_env, bin_dir=None):
    """The environment for a udocker process: our dir, no tarball, our tools."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("UDOCKER_")}
    env.update(tool_env)
    env["UDOCKER_DIR"] = str(udocker_dir)
    env["UDOCKER_TARBALL"] = ""          # never download the tools tarball
    path = env.get("PATH", os.defpath)
    if bin_dir:
        path = str(bin_dir) + os.pathsep + path
    env["PATH"] = path
    return env
