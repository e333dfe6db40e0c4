"""Run an image stored in a dataset with udocker: no root, no daemon.

Python API::

    from datalad_udocker.run.runtime import run_image
    result = run_image("/data/ds/.datalad/environments/busybox/image",
                       ["sh", "-c", "echo hello"], dataset="/data/ds")
    result.exit_code, result.stdout, result.stderr   # or: code, out, err = result

Life of a run (:meth:`Runtime.run`):

1. The image's container for the execution mode is taken from the container
   cache, created there once if it is missing (:mod:`.cache`).
2. The command runs with ``udocker run`` while a shared lock is held (a
   prune skips containers in use).  Docker semantics: the image's Env,
   Entrypoint and Cmd (an empty command runs Entrypoint + Cmd), the dataset
   bind-mounted at its own path and the caller's directory inside it as the
   working directory (without a dataset: the image's WorkingDir).  Output
   and exit code are the command's own (see :mod:`.tools`).

udocker is always run as a subprocess (its CLI and on-disk layout are the
contract), from a directory we own since it reads ``u.conf`` from its cwd.
"""
import contextlib
import fcntl
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import config
from ..errors import RuntimeError_
from ..dataset.layout import OCILayout
from .fastpath import FastPath, expected_command
from .udocker_cli import CommandNotFound
from ..digest import sha256_digest
from ..dataset.local import datalad_get as fetch_with_datalad
from .cache import SITE_MODES, ContainerCache, container_name
from .tools import find_tools

__all__ = ["run_image", "RunResult", "Runtime", "CommandNotFound",
           "plan_mounts"]

_ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class RunResult:
    """Outcome of a command; ``stdout``/``stderr`` are bytes when captured."""
    exit_code: int
    stdout: Optional[bytes] = None
    stderr: Optional[bytes] = None

    def __iter__(self):
        return iter((self.exit_code, self.stdout, self.stderr))


class Runtime:
    """Runs commands in the containers of one :class:`.ContainerCache`."""

    def __init__(self, udocker_dir=None, execmode=None, dataset=None):
        self.cache = ContainerCache(udocker_dir, execmode, dataset)
        self.udocker_dir = self.cache.udocker_dir
        self.execmode = self.cache.execmode
        self.state_dir = self.cache.state_dir

    @staticmethod
    def _site_volumes(own):
        """For a site container (not ``own``), the host's /tmp and /var/tmp
        over the image's (as Apptainer does): no user writes into the shared
        container's world-writable directories."""
        if own:
            return []
        return ["--volume=%s:%s" % (d, d) for d in ("/tmp", "/var/tmp")
                if os.path.isdir(d)]

    def run(self, layout, command=(), dataset=None, cwd=None, env=None,
            capture=False, fetch=None, entrypoint=None):
        """Run ``command`` (a list; empty: Entrypoint + Cmd) in the image.

        ``dataset`` (a path) is bind-mounted at its own path and the
        command runs in ``cwd`` (default: the current directory) if that is
        inside it, else in the dataset's root; without a dataset it runs in
        the image's WorkingDir.  ``env`` adds or overrides variables
        (their values never appear on a command line, see
        :meth:`.UdockerCLI.run`),
        ``entrypoint`` replaces the image's Entrypoint (``docker run
        --entrypoint``).
        With ``capture`` the output is returned, else it goes to this
        process's stdout/stderr.  Returns a RunResult; raises UdockerError
        subclasses when the command could not be started.

        Signals sent to this process during the run go to the command as
        under ``docker run``; ``datalad.udocker.stop-timeout`` seconds
        (default 10) after a TERM, INT, HUP or QUIT every process of the run
        is killed and the exit code is 137 (see :meth:`.UdockerCLI.run`).
        """
        bad = [k for k in (env or {}) if not _ENV_NAME.match(str(k))]
        if bad:
            raise RuntimeError_("invalid environment variable name %r: use "
                                "letters, digits and _ (not first a digit)"
                                % bad[0])
        layout = layout if isinstance(layout, OCILayout) else OCILayout(layout)
        name = container_name(layout.manifest_descriptor().digest,
                              self.execmode)
        with self.cache.lock(name) as fd:
            entry = self.cache.ensure_locked(fd, name, layout, fetch)
            with contextlib.suppress(FileNotFoundError):   # site's: none
                os.utime(self.cache.state_path(name))    # last used
            binds, workdir = plan_mounts(dataset, cwd)
            if workdir is None:
                workdir = (layout.config().get("config") or {}).get(
                    "WorkingDir") or "/"
            opts = ["--nobanner", "--workdir=" + workdir]
            opts += volume_options(binds, self.execmode, self.state_dir)
            opts += identity_options(
                self.execmode, layout.config().get("config") or {},
                entry.path, self.state_dir, env)
            udocker = self.cache.udocker_for(entry)    # ours, or the site's
            own = udocker is self.cache.udocker
            opts += self._site_volumes(own)
            if self.execmode in SITE_MODES and own:
                make_mount_points(Path(entry.path) / "ROOT", binds)
            if entrypoint:
                opts.append("--entrypoint=" + entrypoint)
            if self.execmode == "F1":
                # Debian's libfakechroot ignores udocker's FAKECHROOT_DIR_MAP:
                # exclude the bound paths from the chroot instead
                opts += ["--nosysdirs", "--env=FAKECHROOT_EXCLUDE_PATH=" +
                         ":".join(["/dev", "/proc", "/sys", "/etc/resolv.conf",
                                   "/etc/host.conf"] + binds)]
            if self.execmode == "R1":
                # runc's spec (config.json, the env included) is written
                # into the container directory: only the user may read it
                os.chmod(entry.path, 0o700)
            tools = find_tools(self.execmode, self.udocker_dir)
            fast = None
            if self.execmode in SITE_MODES and not env:
                line = expected_command(command, entrypoint, layout.config())
                if line:
                    fast = FastPath(
                        self.state_dir, udocker.udocker_dir, name, entry.path,
                        tools, [o for o in opts if o.startswith("--volume=")],
                        entrypoint, workdir, line)
            try:
                code, out, err = udocker.run(
                    opts, entry.container_id, command, tools, capture, env,
                    grace=config.stop_timeout(), fast=fast)
            finally:
                if self.execmode == "R1":
                    _drop_runc_spec(fd, entry.path)
            return RunResult(code, out, err)


def _drop_runc_spec(fd, container_path):
    """Remove runc's spec (it holds the run's env values) unless another run
    of this container is using it; the last one to finish removes it.

    udocker writes a new spec for every run.  ``fd`` is the container's lock,
    held shared by every run.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(container_path, "config.json"))


def plan_mounts(dataset, cwd=None):
    """``(bind paths, workdir)`` for a run in ``dataset`` from ``cwd``.

    Without a dataset: nothing bound, workdir None (the image's).
    """
    if dataset is None:
        return [], None
    ds = os.path.abspath(str(dataset))
    cwd = os.path.abspath(cwd or os.getcwd())
    binds = [ds]
    real = os.path.realpath(ds)
    if real != ds:
        binds.append(real)
    for root in binds:
        if cwd == root or cwd.startswith(root.rstrip("/") + "/"):
            return binds, cwd
    return binds, ds


# the host paths udocker's PRoot engine binds at themselves when they exist
# (its ``sysdirs_list``)
PROOT_SYSTEM_BINDS = ("/dev", "/proc", "/sys", "/etc/resolv.conf",
                      "/etc/host.conf", "/lib/modules")


def make_mount_points(root, binds):
    """Make the mount points of a P1/P2 run in the container's ``root``: the
    paths of ``binds`` and udocker's system binds, each a directory or an
    empty file as its host path is; what exists is left as it is.

    PRoot makes a missing one itself and removes it when it ends: in a
    container shared by concurrent runs, one run's removal then races
    another's start, which runs without its bind (without the dataset, in
    /, after a mere PRoot warning).  Ours stay, so PRoot neither makes nor
    removes any.  No symlink in ``root`` is followed (one could lead out of
    it): such a path, or one that cannot be made, is left to PRoot.
    """
    for path in list(binds) + [p for p in PROOT_SYSTEM_BINDS
                               if os.path.exists(p)]:
        for _ in range(3):      # a PRoot of another run removed a parent
            try:
                _make_mount_point(str(root), path, os.path.isdir(path))
                break
            except FileNotFoundError:
                continue
            except OSError:     # a symlink, a non-directory, no permission
                break


def _make_mount_point(root, path, directory):
    parts = path.split("/")[1:]
    if not path.startswith("/") or not all(
            p not in ("", ".", "..") for p in parts):
        return
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(root, nofollow)
    try:
        for name in parts[:-1] if not directory else parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            sub = os.open(name, nofollow, dir_fd=fd)
            os.close(fd)
            fd = sub
        if not directory:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(parts[-1], os.O_WRONLY | os.O_CREAT |
                                 os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def volume_options(binds, execmode, state_dir):
    """``--volume`` options binding each path of ``binds`` at itself.

    udocker splits ``--volume=HOST:CONTAINER`` at the first ``:`` (no
    escaping), and the container side may hold more: a host path with a
    ``:`` is bound through a colon-free symlink to it, made in
    ``state_dir``/binds.  F1 cannot bind such a path at all: Fakechroot's
    path lists are ``:``-separated.
    """
    for path in binds:
        if ":" in path and execmode == "F1":
            raise RuntimeError_(
                "cannot run in execmode F1 in %s: Fakechroot cannot bind a "
                "path containing ':'; use execmode P1 or R1, or move the "
                "dataset" % path)
    return [_volume(path, path, state_dir) for path in binds]


def _volume(host, container, state_dir):
    """``--volume`` binding ``host`` at ``container`` (see volume_options)."""
    if ":" in host:
        host = _bind_alias(Path(state_dir) / "binds", host)
    return "--volume=%s:%s" % (host, container)


def _bind_alias(alias_dir, target):
    """A symlink in ``alias_dir`` (made if need be) to ``target``, named by
    its hash so that every run of ``target`` uses the same one."""
    alias = alias_dir / sha256_digest(target.encode()).hex[:32]
    if ":" in str(alias):
        raise RuntimeError_(
            "cannot bind %s: both it and the udocker directory %s contain "
            "':'; set datalad.udocker.dir to a path without ':'"
            % (target, alias_dir.parent.parent))
    with contextlib.suppress(OSError):
        if os.readlink(alias) == target:
            return str(alias)
    alias_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = alias_dir / (".%s.%d" % (alias.name, os.getpid()))
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, alias)      # atomic: a concurrent run sees old or new
    return str(alias)


def identity_options(execmode, image_config, container_path, state_dir,
                     env=None):
    """udocker options giving the command the identity ``docker run`` gives
    it, as far as ``execmode`` can (docs/runtime.rst, "Identity").

    The image's ``User`` (default root) is looked up in the image's own
    /etc/passwd as Docker does.  PRoot (P1, P2) runs as that uid: udocker is
    told to use the image's /etc/passwd as is (it would otherwise bind a
    copy of it and run a non-root user it finds there as the caller's uid).
    Fakechroot (F1) runs as the caller, runc (R1) as root: each can fake no
    other identity.  ``HOME`` is the user's home in every mode unless the
    image's Env or ``env`` sets it.
    """
    user = _docker_user(image_config.get("User") or "root",
                        _image_passwd(container_path))
    if user is None:                # a name not in /etc/passwd: udocker's way
        return []
    uid, home, found = user
    opts = []
    if execmode in ("P1", "P2"):
        if found:       # udocker then runs the uid it finds there, as it is
            opts.append(_volume(str(Path(container_path) / "ROOT/etc/passwd"),
                                "/etc/passwd", state_dir))
        # else udocker adds the uid to a copy of /etc/passwd, with the
        # caller's gid ("UID:GID" would become the user's name)
        opts.append("--user=" + uid)
    names = [str(e).split("=", 1)[0] for e in image_config.get("Env") or []]
    if "HOME" not in names and "HOME" not in (env or {}):
        opts.append("--env=HOME=" + home)
    return opts


def _image_passwd(container_path):
    """The text of the image's /etc/passwd in the container at
    ``container_path`` ("" if none).  udocker's R1 setup moves it aside
    (``.bind_orig_files``) and leaves a symlink; no symlink is followed,
    in the path either (one could point at the host's files)."""
    root = Path(os.path.realpath(container_path))
    for rel in ("ROOT/etc/passwd", ".bind_orig_files/#etc#passwd"):
        path = root / rel
        if os.path.realpath(path) == str(path) and path.is_file():
            try:
                return path.read_text(errors="replace")
            except OSError:
                return ""
    return ""


def _docker_user(spec, passwd):
    """``(uid, home, found in passwd)`` for a ``User`` of ``spec``
    (``user[:group]``, a name or a uid) as Docker resolves it, or None for a
    user name that is not in ``passwd``."""
    name = spec.partition(":")[0]
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and (fields[0] == name or
                                 (name.isdigit() and fields[2] == name)):
            return fields[2], fields[5] or "/", True
    return (name, "/", False) if name.isdigit() else None


def run_image(image_path, command=(), dataset=None, execmode=None,
              capture=True, env=None, cwd=None, udocker_dir=None,
              entrypoint=None):
    """Run ``command`` in the image stored (as an OCI layout) at ``image_path``.

    ``command`` is a list of arguments or a string (split like a shell);
    empty runs the image's Entrypoint + Cmd.  ``dataset`` is the dataset to
    bind-mount (and to ``datalad get`` missing layers from; default: the one
    holding the image, for fetching only).  ``execmode`` defaults to
    ``datalad.udocker.execmode`` (P1).  ``env`` (a dict) adds variables,
    ``entrypoint`` replaces the image's.  With ``capture`` (default) the
    output is returned as bytes, else it goes to this process's stdout and
    stderr.  Returns a :class:`RunResult`; raises a
    :class:`~.errors.UdockerError` (:class:`CommandNotFound` for a command
    missing in the image) when the command could not be started.
    """
    if isinstance(command, str):
        command = shlex.split(command)
    # settings are read with git in the dataset (a path: no DataLad import
    # on this path), all at once (:func:`.config.reading_once`)
    with config.reading_once():
        runtime = Runtime(udocker_dir, execmode,
                          str(dataset) if dataset is not None else None)
        fetch = fetch_with_datalad(str(dataset) if dataset is not None
                                   else None)
        return runtime.run(image_path, command, dataset=dataset, cwd=cwd,
                           env=env, capture=capture, fetch=fetch,
                           entrypoint=entrypoint)
