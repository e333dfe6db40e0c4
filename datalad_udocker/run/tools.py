"""Execution modes, the host tools they need, and the wrappers udocker calls.

udocker 1.3.17 would download its own tools tarball on every command; we set
``UDOCKER_TARBALL=""`` so it never does, and point it at the host's tools
(Debian packages, or anything on ``PATH``), else at udocker's own statically
built tools in ``$UDOCKER_DIR/bin`` and ``lib``:

====  ============================================  ==========================
mode  engine                                        Debian packages
====  ============================================  ==========================
P1    PRoot, seccomp filter acceleration            ``proot``
P2    PRoot, plain ptrace (slower, most portable)   ``proot``
F1    Fakechroot (LD_PRELOAD; glibc images only)    ``fakechroot``, ``patchelf``
R1    rootless runc / crun (user namespaces)        ``runc`` (or ``crun``)
====  ============================================  ==========================

Where neither exists, :func:`find_tools` installs udocker's tools tarball
from the location the user set (``datalad.udocker.tools-tarball`` in their
own git config, else ``UDOCKER_TARBALL``): a local file or URL in udocker's
layout, or ``udocker`` for udocker's own download locations.  It says on
stderr what it installs and from where; with no location set nothing is
downloaded and the error names both ways out.

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
directory goes first on udocker's ``PATH`` and holds an ``env`` wrapper,
and a ``patchelf`` wrapper that makes Debian's patchelf usable by udocker
(:func:`fakechroot_env`).
"""
import contextlib
import fcntl
import glob
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import RuntimeError_, ToolMissing

lgr = logging.getLogger("datalad.udocker.tools")

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


def _arch():
    """This machine in udocker's names for its tools (``proot-x86_64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "aarch64": "arm64", "i386": "x86",
            "i686": "x86", "armv7l": "arm"}.get(machine, machine)


def _udocker_own(udocker_dir, name):
    """udocker's own build of ``name`` in ``$UDOCKER_DIR/bin``, if any,
    chosen as udocker does (the build for kernels >= 4.8 first)."""
    kernel = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])
    candidates = ["%s-%s" % (name, _arch()), name]
    if kernel >= (4, 8):
        candidates.insert(0, "%s-%s-4_8_0" % (name, _arch()))
    for candidate in candidates:
        path = os.path.join(udocker_dir, "bin", candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _udocker_has_fakechroot(udocker_dir):
    """udocker's own libfakechroot builds are in ``$UDOCKER_DIR/lib`` (it
    picks the one for the image's distribution itself)."""
    return bool(glob.glob(os.path.join(udocker_dir, "lib", "libfakechroot*")))


def _user_setting(var):
    """A tool path the user set in udocker's own variable, if it exists."""
    value = os.environ.get(var)
    return value if value and os.path.exists(value) else None


_WHAT = {"proot": "PRoot", "runc": "runc or crun", "fakechroot": "fakechroot",
         "patchelf": "patchelf"}


def _find(mode, udocker_dir):
    """``(tools, Debian packages of the missing ones)`` for ``mode``."""
    if mode in ("P1", "P2"):
        proot = (_user_setting("UDOCKER_USE_PROOT_EXECUTABLE")
                 or _which("proot") or _udocker_own(udocker_dir, "proot"))
        return {"proot": proot}, [] if proot else ["proot"]
    if mode == "R1":
        runc = (_user_setting("UDOCKER_USE_RUNC_EXECUTABLE")
                or _which("runc") or _which("crun")
                or _udocker_own(udocker_dir, "runc")
                or _udocker_own(udocker_dir, "crun"))
        return {"runc": runc}, [] if runc else ["runc"]
    so = _user_setting("UDOCKER_FAKECHROOT_SO") or next(
        (p for g in _FAKECHROOT_GLOBS for p in sorted(glob.glob(g))), None)
    # with udocker's own libfakechroot (so None) its own patchelf, which
    # takes the options udocker passes
    own = _udocker_own(udocker_dir, "patchelf")
    patchelf = _user_setting("UDOCKER_USE_PATCHELF_EXECUTABLE") or (
        (_which("patchelf") or own) if so else (own or _which("patchelf")))
    missing = [pkg for pkg, have in (
        ("fakechroot", so or _udocker_has_fakechroot(udocker_dir)),
        ("patchelf", patchelf)) if not have]
    return {"fakechroot_so": so, "patchelf": patchelf}, missing


def find_tools(mode, udocker_dir):
    """Tools for ``mode``: ``{"proot"|"runc"|"fakechroot_so"|"patchelf": path}``.

    The host's (udocker's variables, ``PATH``, the sbin directories) first,
    else udocker's own in ``udocker_dir``, else those of the tools tarball
    the user set, installed there first (:func:`install_tools`).
    ``fakechroot_so`` is None when udocker is to pick its own library.
    Raises ToolMissing with a one-line message naming the Debian package
    and the tarball setting.
    """
    mode = check_execmode(mode)
    tools, missing = _find(mode, udocker_dir)
    if not missing:
        return tools
    what = " and ".join(_WHAT[m] for m in missing)
    locations = tarball_locations()
    if not locations:
        raise ToolMissing(
            "execution mode %s needs %s, which is not installed: install the "
            "Debian package%s %s (apt-get install %s), or have udocker's "
            "tools installed into %s from udocker's download site with `git "
            "config --global datalad.udocker.tools-tarball udocker` (or "
            "from your site's copy: its URL or file instead of 'udocker'), "
            "or choose another mode with `git config --global "
            "datalad.udocker.execmode %s`" % (
                mode, what, "s" if len(missing) > 1 else "",
                " and ".join("'%s'" % m for m in missing), " ".join(missing),
                udocker_dir, "R1" if mode in ("P1", "P2") else "P1"))
    install_tools(locations, udocker_dir)
    tools, missing = _find(mode, udocker_dir)
    if missing:
        raise ToolMissing(
            "execution mode %s needs %s, which udocker's tools tarball "
            "installed in %s does not have for this machine (%s): install "
            "the Debian package%s %s or choose another mode with `git config "
            "--global datalad.udocker.execmode`" % (
                mode, " and ".join(_WHAT[m] for m in missing), udocker_dir,
                _arch(), "s" if len(missing) > 1 else "",
                " and ".join("'%s'" % m for m in missing)))
    return tools


# --- udocker's tools tarball ------------------------------------------------
# Its layout (what ``udocker install`` reads): a gzip tar with
# ``udocker_dir/lib/VERSION``, ``udocker_dir/bin/proot-x86_64``...,
# ``udocker_dir/lib/libfakechroot-*.so``, ``udocker_dir/doc/*``; bin/, lib/
# and doc/ go to ``$UDOCKER_DIR/{bin,lib,doc}``.  We install it ourselves
# rather than with ``udocker install``, which would also fetch a messages
# file from GitHub and may leave half-written tools when interrupted.

TOOLS_TARBALL_MAX = 1 << 30      # bytes; udocker's is about 10 MB


def _udocker_default(key):
    from udocker.config import Config
    return Config.conf[key]


def tarball_locations():
    """Where the user wants udocker's tools tarball installed from.

    ``datalad.udocker.tools-tarball`` (the user's own config only), else
    ``UDOCKER_TARBALL``: space-separated URLs or files, tried in order;
    ``udocker`` stands for udocker's own download locations.  Empty: nowhere.
    """
    from .. import config
    try:
        value = config.get("tools-tarball")
    except OSError:             # no git to read the user's config with
        value = None
    value = value or os.environ.get("UDOCKER_TARBALL")
    locations = str(value or "").split()
    if locations == ["udocker"]:
        locations = _udocker_default("tarball").split()
    return locations


def _version(text):
    return tuple(int(n) for n in re.findall(r"\d+", text))


def install_tools(locations, udocker_dir):
    """Install udocker's tools tarball into ``udocker_dir`` from the first
    of ``locations`` that works, saying so on stderr (logger warning).

    Nothing happens when a complete install is already there.  Files are
    written under temporary names and renamed, ``lib/VERSION`` last: an
    interrupted install is finished by the next one.  Raises ToolMissing
    when no location gives a tarball in udocker's layout.
    """
    from ..registry.transport import redact_url
    udocker_dir = Path(udocker_dir)
    udocker_dir.mkdir(parents=True, exist_ok=True)
    required = _udocker_default("tarball_release")
    with open(udocker_dir / ".tools-install.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = udocker_dir / "lib" / "VERSION"
        if version.is_file() and \
                _version(version.read_text()) >= _version(required):
            return
        failures = []
        for location in locations:
            shown = redact_url(location) if "://" in location else location
            lgr.warning("installing udocker's tools (PRoot, runc, "
                        "Fakechroot, patchelf) from %s into %s",
                        shown, udocker_dir)
            try:
                with _tarball_file(location, udocker_dir) as path:
                    _extract_tools(path, udocker_dir, required)
                return
            except (OSError, tarfile.TarError, ToolMissing) as exc:
                failures.append("%s: %s" % (shown, " ".join(
                    str(exc).split()) or type(exc).__name__))
        raise ToolMissing(
            "could not install udocker's tools tarball (set in "
            "datalad.udocker.tools-tarball or UDOCKER_TARBALL) from %s"
            % "; ".join(failures))


@contextlib.contextmanager
def _tarball_file(location, udocker_dir):
    """A local file with the tarball at ``location`` (a URL is downloaded
    into a temporary file in ``udocker_dir``)."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" not in location:
        yield os.path.expanduser(location)
        return
    if not location.startswith(("http://", "https://")):
        raise ToolMissing("only http, https and file URLs are supported")
    import requests
    with tempfile.NamedTemporaryFile(dir=udocker_dir,
                                     prefix=".tools-tarball-") as tmp:
        try:
            with requests.get(location, stream=True, timeout=60) as resp:
                if resp.status_code != 200:
                    raise ToolMissing("HTTP status %d" % resp.status_code)
                size = 0
                for chunk in resp.iter_content(1 << 20):
                    size += len(chunk)
                    if size > TOOLS_TARBALL_MAX:
                        raise ToolMissing("larger than %d bytes"
                                          % TOOLS_TARBALL_MAX)
                    tmp.write(chunk)
        except requests.RequestException as exc:
            raise ToolMissing(type(exc).__name__) from None
        tmp.flush()
        yield tmp.name


def _extract_tools(path, udocker_dir, required):
    """Write the regular files under ``udocker_dir/{bin,lib,doc}/`` of the
    tarball at ``path`` into ``udocker_dir`` (by base name, as udocker
    does; nothing else is extracted)."""
    with tarfile.open(path, "r:gz") as tar:
        files = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            name = parts[-1]
            if len(parts) < 3 or parts[0] != "udocker_dir" or \
                    parts[1] not in ("bin", "lib", "doc") or \
                    not member.isfile() or name in ("", ".", ".."):
                continue
            files.append((parts[1], name, member))
        version = [m for sub, name, m in files
                   if (sub, name) == ("lib", "VERSION")]
        if not version:
            raise ToolMissing("not udocker's tools tarball (it has no "
                              "udocker_dir/lib/VERSION)")
        found = tar.extractfile(version[0]).read(100).decode(
            errors="replace").strip()
        if _version(found) < _version(required):
            raise ToolMissing("tools release %r, udocker needs %s or later"
                              % (found, required))
        files.sort(key=lambda f: (f[0], f[1]) == ("lib", "VERSION"))
        for sub, name, member in files:
            target = udocker_dir / sub
            target.mkdir(exist_ok=True)
            part = target / (".%s.part" % name)
            with tar.extractfile(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.chmod(0o755 if sub == "bin" else 0o644)
            os.replace(part, target / name)


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
        env.update(fakechroot_env(bin_dir, tools))
        wrap("env", _which("env") or "/usr/bin/env",
             "udocker's F1 engine runs 'env -i VARS... COMMAND'.")
    return env


# --- F1: patchelf and the image's loader -------------------------------------
# udocker's F1 engine starts every program through the image's own loader
# (``ROOT/lib64/ld-linux-x86-64.so.2 ROOT/usr/bin/PROGRAM``), found with
# ``patchelf -q --print-interpreter`` on the image's executables and kept in
# the container's ``ld.so.path``.  ``-q`` exists only in udocker's own
# patchelf: Debian's (0.14.3) rejects it, so without our wrapper udocker
# never finds the loader, runs patchelf on every executable of /bin,
# /usr/bin and /lib64 on every run (about 1,000 times for a Debian image)
# and the kernel starts programs with the HOST's loader next to the image's
# libc.  F1 runs no other patchelf command (--set-interpreter, --set-rpath
# and --set-root-prefix belong to F2-F4).

_PATCHELF_WRAPPER = """#!/bin/bash
# Written by datalad-udocker: calls {real}.
# Drops udocker's '-q' (only udocker's own patchelf knows it) and, as '-q'
# means, discards patchelf's messages.
args=()
quiet=0
for arg in "$@"; do
  if [ "$arg" = -q ]; then quiet=1; else args+=("$arg"); fi
done
if [ "$quiet" = 1 ]; then
  exec {real_q} "${{args[@]}}" 2>/dev/null
fi
exec {real_q} "${{args[@]}}"
"""

#: Python program (``python -c F1_RECORD_LOADER CONTAINER``, udocker's
#: environment, udocker's working directory) with which udocker finds the
#: image's loader and records it in the container's ``ld.so.path``, as its
#: first F1 run would; prints the loader's path ("" for static images)
F1_RECORD_LOADER = (
    "import sys; from udocker.config import Config; "
    "from udocker.container.localrepo import LocalRepository; "
    "from udocker.helper.elfpatcher import ElfPatcher; "
    "Config().getconf(); "
    "print(ElfPatcher(LocalRepository(), sys.argv[1]).get_container_loader())")


def fakechroot_env(bin_dir, tools):
    """udocker's F1 settings for ``tools`` (of :func:`find_tools`), its
    patchelf being our wrapper, written into ``bin_dir``, that drops ``-q``.
    """
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = {}
    if tools.get("fakechroot_so"):      # else udocker picks its own
        env["UDOCKER_FAKECHROOT_SO"] = tools["fakechroot_so"]
    if tools.get("patchelf"):
        path = bin_dir / "patchelf"
        path.write_text(_PATCHELF_WRAPPER.format(
            real=tools["patchelf"], real_q=shlex.quote(tools["patchelf"])))
        path.chmod(0o755)
        env["UDOCKER_USE_PATCHELF_EXECUTABLE"] = str(path)
    return env


def udocker_environment(udocker_dir, tool_env, bin_dir=None):
    """The environment for a udocker process: our dir, no tarball, our tools."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("UDOCKER_")}
    env.update(tool_env)
    env["UDOCKER_DIR"] = str(udocker_dir)
    env["UDOCKER_TARBALL"] = ""          # never download the tools tarball
    # a relative keystore (the default) makes udocker create ~/.udocker
    env["UDOCKER_KEYSTORE"] = os.path.join(str(udocker_dir), "keystore")
    path = env.get("PATH", os.defpath)
    if bin_dir:
        path = str(bin_dir) + os.pathsep + path
    env["PATH"] = path
    return env
