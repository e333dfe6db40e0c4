"""What loading the extension does, kept cheap: DataLad imports this package
for every ``datalad`` command (and on ``import datalad.api``).

- :func:`.callformat.make_runner_findable`: the shell that containers-run
  starts finds our runner in an unactivated venv;
- :func:`.callformat.title_runs_with_user_command`: run commits of our
  images are titled with the user's command;
- :func:`enable_for_containers_run`: ``datalad containers-run`` gets the
  image's layers with DataLad's own ``get`` before our runner starts, so
  the registry remote that a clone made without our scripts on PATH could
  not enable is enabled first (:func:`.dataset.local.enable_registry_remote`).
  When the dataset's own git config already has the remote enabled, nothing
  else is read, imported or started (:func:`_enabled_in_git_config`).
"""
import logging
import os
import re

from . import config

lgr = logging.getLogger("datalad.udocker.hooks")


def containers_run_dataset(argv):
    """The dataset a ``datalad ... containers-run ...`` command line
    (``argv``, without the program) runs in: its ``-d``/``--dataset``, else
    the current directory (DataLad's ``-C`` applied)."""
    where = chdir = "."
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-d", "--dataset"):
            where = argv[i + 1]
        elif arg == "-C" and i < argv.index("containers-run"):
            chdir = argv[i + 1]
    for arg in argv:
        if arg.startswith("--dataset="):
            where = arg.split("=", 1)[1]
    return os.path.join(chdir, where)


def enable_for_containers_run(argv):
    """Enable the registry remote in the dataset of the ``containers-run``
    command line ``argv`` (program excluded) if it needs it.  Never raises:
    a failure is logged with what to run (the ``get`` that follows then
    fails as it would have)."""
    where = containers_run_dataset(argv)
    if not os.path.isdir(where) or _enabled_in_git_config(where):
        return
    from .dataset.local import enable_registry_remote
    from .errors import UdockerError
    try:
        enable_registry_remote(where)
    except UdockerError as exc:
        lgr.warning("%s", exc)


def _enabled_in_git_config(path):
    """True when the git config file of the repository holding ``path``
    surely has our registry remote enabled (a ``[remote "NAME"]`` section
    with an ``annex-uuid``); False when unsure (then git is asked)."""
    config_file = _git_config_file(os.path.abspath(path))
    try:
        with open(config_file, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except (OSError, TypeError):
        return False
    section = None
    for line in text.splitlines():
        head = _SECTION.match(line)
        if head:
            section = head.group(1)
            line = line[head.end():]
        if section == config.SPECIAL_REMOTE_NAME and _UUID.match(line):
            return True
    return False


_SECTION = re.compile(r'\s*\[\s*remote\s+"((?:[^"\\]|\\.)*)"\s*\]', re.I)
_UUID = re.compile(r"\s*annex-uuid\s*=\s*[0-9a-f-]{8}", re.I)


def _git_config_file(path):
    """``config`` of the git directory of the repository holding ``path``
    (``.git`` a directory, or a file naming it), or None."""
    while True:
        dotgit = os.path.join(path, ".git")
        if os.path.isdir(dotgit):
            gitdir = dotgit
            break
        if os.path.isfile(dotgit):
            try:
                with open(dotgit) as f:
                    line = f.readline()
            except OSError:
                return None
            if not line.startswith("gitdir: "):
                return None
            gitdir = os.path.join(path, line[len("gitdir: "):].strip())
            break
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:       # a linked worktree's config is in the common directory
        with open(os.path.join(gitdir, "commondir")) as f:
            gitdir = os.path.join(gitdir, f.readline().strip())
    except OSError:
        pass
    return os.path.join(gitdir, "config")
