"""Warm P1/P2 runs without udocker's Python: its recorded PRoot command line.

For a created container, udocker's PRoot engine (``udocker/engine/proot.py``)
builds the same PRoot command line on every run: the binds of /dev, /proc,
/sys, /etc/resolv.conf..., a copy of the container's /etc/passwd and
/etc/group with the user added, ``-i UID:GID`` or ``-0``, ``-k``, ``-r ROOT``,
the image's environment.  Only the run's own parts change: the working
directory (``-w``) and the command, at the end.

So the first run of a container (per set of volumes, entrypoint, user and
environment that udocker reads) goes through udocker as always, with a
recorder in front of our proot wrapper that keeps the arguments and the
environment udocker gives it (and its passwd/group files).  The record is
kept only when it has exactly the expected shape (``... -r ROOT -w WORKDIR
COMMAND...`` with the command udocker derives from the image's Entrypoint
and Cmd, see :func:`expected_command`).  Later runs call the same wrapper
(:mod:`.tools`: supervisor, launcher, proot) directly with that line, the
working directory and command replaced, when nothing the line depends on
has changed (:func:`record_key`: the container's files, the tools, udocker,
its configuration files, our scripts, the user's ids, the host variables
udocker passes on) and udocker would accept the run (the working directory
exists, the command is found in the container: checked conservatively).
In every other case udocker runs, as before, and reports any error.

Runs that set variables (``env``) always go through udocker: their values
are never written to a record.
"""
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

RECORD_FORMAT = 1
# caller variables udocker's run reads or passes on to PRoot
_HOST_VARS = ("TERM", "PROOT_TMP_DIR", "TMPDIR", "PROOT_NO_SECCOMP",
              "PROOT_NEW_SECCOMP", "HOME", "USER", "LOGNAME")
_AUTH = {":/etc/passwd": "passwd", ":/etc/group": "group"}

_RECORDER = """#!/bin/bash
# Written by datalad-udocker for one udocker run: records the PRoot command
# line udocker builds (arguments, environment, passwd/group copies), then
# calls our proot wrapper.
if [ $# -ne 1 ] || [ "$1" != --help ]; then
  printf '%s\\0' "$@" > {rec}/argv
  cat /proc/$$/environ > {rec}/env
  for a in "$@"; do
    case "$a" in
      *:/etc/passwd) cp -- "${{a%:/etc/passwd}}" {rec}/passwd ;;
      *:/etc/group) cp -- "${{a%:/etc/group}}" {rec}/group ;;
    esac
  done
fi
exec {wrapper} "$@"
"""


def fast_record_path(state_dir, name):
    """Where container ``name``'s record is kept."""
    return Path(state_dir) / "fast" / (name + ".json")


def _stat(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def expected_command(command, entrypoint, image_config):
    """The command line udocker runs for ``command`` (its
    ``_check_executable``), or None when udocker would choose one itself."""
    cfg = (image_config or {}).get("config") or {}
    if entrypoint:
        entry = entrypoint.strip().split(" ")
    else:
        entry = cfg.get("Entrypoint") or []
        if not command:
            command = cfg.get("Cmd") or []
    if not isinstance(entry, list) or not isinstance(command, (list, tuple)):
        return None
    line = list(entry) + list(command)
    if not line or not all(isinstance(a, str) for a in line):
        return None
    return line


class FastPath:
    """The record of one container's PRoot command line, for one set of
    run options; see the module doc."""

    def __init__(self, state_dir, udocker_dir, name, container_path, tools,
                 volumes, entrypoint, workdir, command):
        self.state = fast_record_path(state_dir, name)
        self.udocker_dir = str(udocker_dir)
        self.work_dir = str(state_dir)
        self.root = os.path.join(str(container_path), "ROOT")
        self.container_path = str(container_path)
        self.proot = tools.get("proot")
        self.volumes = list(volumes)
        self.entrypoint = entrypoint
        self.workdir = workdir
        self.command = command          # see expected_command
        self.key = self.record_key()

    def record_key(self):
        """What the recorded command line depends on, cheaply read."""
        here = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.find_spec("udocker")
        udocker_pkg = os.path.dirname(spec.origin) if spec and spec.origin \
            else ""
        home = os.path.expanduser("~")
        return {
            "format": RECORD_FORMAT, "python": sys.executable,
            "container": [self.container_path, _stat(self.container_path),
                          _stat(self.root),
                          _stat(self.root + "/etc/passwd"),
                          _stat(self.root + "/etc/group")],
            "proot": [self.proot, _stat(self.proot)],
            "udocker": [udocker_pkg] + [
                _stat(os.path.join(udocker_pkg, f)) for f in (
                    "__init__.py", "config.py", "engine/proot.py",
                    "engine/base.py")],
            "ours": [_stat(os.path.join(here, f)) for f in (
                "fastpath.py", "tools.py", "supervise.py", "proot_launch.py",
                "udocker_cli.py")],
            "conf": [_stat(p) for p in (
                "/etc/udocker.conf", home + "/.udocker/udocker.conf",
                self.udocker_dir + "/udocker.conf",
                self.work_dir + "/u.conf", "/etc/passwd", "/etc/group")],
            "ids": [os.getuid(), os.getgid(), sorted(os.getgroups()),
                    os.uname().release],
            "host_env": {k: os.environ.get(k) for k in _HOST_VARS},
            "run": [self.udocker_dir, self.volumes, self.entrypoint],
        }

    # --- recording (a run through udocker) ----------------------------------
    def recorder(self, tmp, tool_env):
        """``tool_env`` with udocker's proot being a recorder (writing into
        ``tmp/rec``) in front of our wrapper."""
        wrapper = tool_env.get("UDOCKER_USE_PROOT_EXECUTABLE")
        if not wrapper:
            return tool_env
        import shlex
        rec = Path(tmp) / "rec"
        rec.mkdir()
        path = Path(tmp) / "record-proot"
        path.write_text(_RECORDER.format(rec=shlex.quote(str(rec)),
                                         wrapper=shlex.quote(wrapper)))
        path.chmod(0o755)
        return dict(tool_env, UDOCKER_USE_PROOT_EXECUTABLE=str(path))

    def save(self, tmp):
        """Keep what the recorder saw in ``tmp/rec`` if it has the expected
        shape; never fails (no record then)."""
        with contextlib.suppress(OSError, ValueError, UnicodeError):
            rec = Path(tmp) / "rec"
            argv = (rec / "argv").read_bytes().decode().split("\0")[:-1]
            env = dict(item.split("=", 1) for item in (
                rec / "env").read_bytes().decode().split("\0") if item)
            # as it is now: udocker's first run writes into the container dir
            key, workdir, command = self.record_key(), self.workdir, \
                self.command
            r = argv.index("-r")
            if argv[r + 1] != self.root or argv[r + 2:r + 4] != \
                    ["-w", workdir] or argv[r + 4:] != command or \
                    str(tmp) in env.get("PATH", str(tmp)):
                return
            prefix, auth = argv[:r + 2], {}
            for i, arg in enumerate(prefix):
                for suffix, what in _AUTH.items():
                    if arg.endswith(suffix) and prefix[i - 1] == "-b":
                        auth[what] = [i, (rec / what).read_text()]
            record = {"key": key, "prefix": prefix, "env": env,
                      "auth": auth}
            self.state.parent.mkdir(parents=True, exist_ok=True)
            part = self.state.with_name(".%s.%d" % (self.state.name,
                                                    os.getpid()))
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(part, self.state)

    # --- a warm run -------------------------------------------------------
    def plan(self, tmp):
        """``(proot arguments, environment)`` for running ``command`` in
        ``workdir`` without udocker, its passwd/group copies written into
        ``tmp``; None when udocker must run (no valid record, or a check
        fails)."""
        key, workdir, command = self.key, self.workdir, self.command
        try:
            record = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None
        if record.get("key") != key or workdir != os.path.normpath(workdir) \
                or not workdir.startswith("/"):
            return None
        prefix, env = list(record["prefix"]), record["env"]
        auth = {i for i, _ in record["auth"].values()}
        binds = [prefix[i + 1].split(":", 1) for i, a in enumerate(prefix)
                 if a == "-b" and i + 1 < len(prefix) and i + 1 not in auth]
        if not all(len(b) == 2 and os.path.exists(b[0]) for b in binds):
            return None             # udocker checks (or drops) each bind
        if not (self._is_dir(workdir, binds) and
                self._found(command[0], env.get("PATH", ""), binds)):
            return None
        old = os.umask(0o077)       # as udocker's copies
        try:
            for what, (i, text) in record["auth"].items():
                path = os.path.join(str(tmp), what)
                with open(path, "w") as f:
                    f.write(text)
                prefix[i] = path + ":/etc/" + what
        finally:
            os.umask(old)
        return prefix + ["-w", workdir] + list(command), env

    def _in_root(self, path):
        """``path`` in the container's ROOT, if it resolves inside it."""
        root = os.path.realpath(self.root)
        real = os.path.realpath(self.root + path)
        return real if real.startswith(root + "/") or real == root else None

    @staticmethod
    def _bound(path, binds):
        return [(h, c) for h, c in binds
                if path == c or path.startswith(c.rstrip("/") + "/")]

    def _is_dir(self, workdir, binds):
        bound = self._bound(workdir, binds)
        if bound:
            host, cont = bound[-1]
            return len(bound) == 1 and os.path.isdir(
                host + workdir[len(cont):])
        real = self._in_root(workdir)
        return real is not None and os.path.isdir(real)

    def _found(self, name, path, binds):
        """True only when udocker surely finds ``name`` in the container
        (a regular executable file in ROOT, no bind on the way)."""
        if name.startswith(("./", "../")) or not name:
            return False
        dirs = [""] if name.startswith("/") else path.split(":")
        for d in dirs:
            if not d.startswith("/") and not name.startswith("/"):
                return False
            cand = (d + "/" + name) if d else name
            if self._bound(cand, binds) or self._bound(d or "/x", binds):
                return False
            real = self._in_root(cand)
            if real and os.path.isfile(real) and os.access(real, os.X_OK):
                return True
        return False
