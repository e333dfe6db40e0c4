"""The few git and git-annex plumbing calls the store makes, and nothing else.

Every failure is a one-line UdockerError, never a CalledProcessError.

Each call runs ``git annex`` in the dataset with this Python environment's
script directory on PATH, so git-annex finds ``git-annex-remote-udocker``
even when the venv is not activated.
"""
import errno
import logging
import os
import subprocess
import sys

from ..errors import UdockerError

lgr = logging.getLogger("datalad.udocker.annex")


def script_env(env=None):
    """os.environ (or ``env``) with our console-script directory on PATH."""
    env = dict(os.environ if env is None else env)
    bindir = os.path.dirname(sys.executable)
    parts = env.get("PATH", "").split(os.pathsep)
    if bindir not in parts:
        env["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p])
    return env


def one_line(text, limit=300):
    """``text`` (a subprocess's stderr, an exception) squeezed onto one line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def git(repo_path, *args, input=None, env=None):
    """Run ``git ARGS`` in ``repo_path``; return stdout, or raise a one-line UdockerError."""
    proc = subprocess.run(["git"] + list(args), cwd=repo_path, text=True,
                          input=input, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UdockerError("git %s failed: %s" % (args[0], one_line(
            detail[-1] if detail else "exit %d" % proc.returncode)))
    return proc.stdout


def without_annex_filter():
    """The environment for a ``git add`` of files that stay in git whatever
    git-annex's clean filter would decide (``annex.largefiles=nothing``
    applies to them): git stores them as they are, and no git-annex process
    starts to say so.  Given as environment, not ``-c``, so the command line
    stays ``git add ...``."""
    env = dict(os.environ)
    count = int(env.get("GIT_CONFIG_COUNT") or 0)
    for i, name in enumerate(("filter.annex.process", "filter.annex.clean"),
                             start=count):
        env["GIT_CONFIG_KEY_%d" % i] = name
        env["GIT_CONFIG_VALUE_%d" % i] = ""
    env["GIT_CONFIG_COUNT"] = str(count + 2)
    return env


def annex(repo_path, *args, batch=None, config=()):
    """Run ``git [-c k=v ...] annex ARGS`` and return its stdout.

    ``batch`` is a list of input lines for ``--batch`` commands.
    """
    cmd = ["git"]
    for item in config:
        cmd += ["-c", item]
    cmd += ["annex"] + list(args)
    if batch is not None:
        cmd.append("--batch")
    lgr.debug("running %s", cmd)
    proc = subprocess.run(
        cmd, cwd=repo_path, env=script_env(), text=True,
        input="".join(line + "\n" for line in batch) if batch is not None else None,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UdockerError("git annex %s failed: %s" % (
            args[0], one_line(detail[-1] if detail else "exit %d" % proc.returncode)))
    return proc.stdout


def set_key_content(repo_path, key, verified_file):
    """Move an already verified file into the annex as the content of ``key``.

    The bytes were hashed while they were downloaded, so git-annex is told
    not to hash them a second time.
    """
    annex(repo_path, "setkey", key, verified_file, config=["annex.verify=false"])


def local_uuid(repo_path):
    uuid = git(repo_path, "config", "annex.uuid").strip()
    if not uuid:
        raise UdockerError("%s has no git-annex UUID; run `git annex init` "
                           "there" % repo_path)
    return uuid


def _plain_object_store(repo_path):
    """May content be moved into ``.git/annex/objects`` the way git-annex
    itself does it for a private repository (rename, then remove the write
    bits of file and key directory)?  Not when the repository shares content
    with a group, freezes it with a command of the user's, or lives on a
    crippled filesystem: there ``setkey`` does it."""
    proc = subprocess.run(
        ["git", "config", "-z", "--get-regexp", r"^(core\.sharedrepository|"
         r"annex\.freezecontent-command|annex\.crippledfilesystem)$"],
        cwd=repo_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    for item in filter(None, proc.stdout.split("\0")):
        name, _, value = item.partition("\n")
        value = value.strip().lower()
        if name == "annex.freezecontent-command" and value:
            return False
        if name == "core.sharedrepository" and value not in (
                "", "false", "umask", "0", "no", "off"):
            return False
        if name == "annex.crippledfilesystem" and value in ("true", "yes", "on", "1"):
            return False
    return True


def may_link_objects(repo_path):
    """May this repository's annex objects share their inode with a file
    outside it (an entry of the user's blob cache)?  Only where git-annex
    leaves its objects alone once they are in place: a plain object store
    (see :func:`_plain_object_store`), and not ``annex.thin``, whose
    unlocked files are hardlinks to the objects that may be written in
    place."""
    if not _plain_object_store(repo_path):
        return False
    proc = subprocess.run(["git", "config", "--type=bool", "annex.thin"],
                          cwd=repo_path, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    return proc.stdout.strip() != "true"


def _remove_write_bits(path):
    mode = os.lstat(path).st_mode & 0o7777
    os.chmod(path, mode & ~0o222)


def store_verified(repo_path, files):
    """Make each ``{key: file}`` file the local content of its key, at once.

    The files were verified against their keys' digests as they were
    downloaded (and sit under ``.git/annex/tmp``): they are renamed into
    place and frozen as git-annex does, with no git-annex process per key
    and no second hashing (``setkey``, which copies, where the objects are
    on another filesystem).  Presence is not
    logged here: the caller includes ``KEY <local_uuid> 1`` in its one
    ``setpresentkey`` batch (:func:`set_present`).
    """
    keys = sorted(files)
    if not keys:
        return
    if not _plain_object_store(repo_path):
        for key in keys:
            set_key_content(repo_path, key, str(files[key]))
        return
    locations = annex(repo_path, "examinekey", "--format=${objectpath}\\n",
                      batch=keys).splitlines()
    if len(locations) != len(keys) or not all(locations):
        raise UdockerError("git annex examinekey gave no object path for "
                           "every key; is the repository a git-annex one?")
    for key, location in zip(keys, locations):
        obj = os.path.join(repo_path, location)
        keydir = os.path.dirname(obj)
        if os.path.isdir(keydir):       # left frozen by an earlier drop
            os.chmod(keydir, os.stat(keydir).st_mode | 0o700)
        os.makedirs(keydir, exist_ok=True)
        try:
            os.replace(str(files[key]), obj)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # objects on another filesystem (a symlinked annex): git-annex copies
            try:
                os.rmdir(keydir)
            except OSError:
                pass
            set_key_content(repo_path, key, str(files[key]))
            continue
        _remove_write_bits(obj)
        _remove_write_bits(keydir)


def set_present(repo_path, key_uuids):
    """Record ``(key, uuid)`` pairs as present, in one ``setpresentkey`` call."""
    lines = sorted({"%s %s 1" % pair for pair in key_uuids})
    if lines:
        annex(repo_path, "setpresentkey", batch=lines)


#: Per-remote git config that makes git-annex take what our registry remote
#: retrieves as verified.  git-annex hashes everything an external special
#: remote retrieves (annex.security.allow-unverified-downloads policy), even
#: with annex-verify=false, unless that remote's downloads are allowed
#: unverified ("ACKTHPPT" is git-annex's literal for yes).  Sound for this
#: remote only: it retrieves nothing but ``SHA256-s<size>--<hex>`` keys, and
#: every byte it writes (a resumed partial file included) has been hashed
#: and checked against that digest and size before it reports success.
TRUSTED_VERIFICATION = (("annex-verify", "false"),
                        ("annex-security-allow-unverified-downloads", "ACKTHPPT"))


def trust_remote_verification(git_dir, remote_name):
    """Tell git-annex in ``git_dir`` not to hash again what remote
    ``remote_name`` (our registry remote) retrieved and verified.

    Only an optimisation: where it cannot be set, git-annex hashes each
    layer once more, as it would anyway.  False then.
    """
    if not remote_name:
        return False
    ok = True
    for name, value in TRUSTED_VERIFICATION:
        ok = subprocess.run(
            ["git", "--git-dir", git_dir, "config",
             "remote.%s.%s" % (remote_name, name), value],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ).returncode == 0 and ok
    return ok


def keys_present(repo_path, keys):
    """The subset of ``keys`` whose content is in the local annex (one call)."""
    keys = list(keys)
    if not keys:
        return set()
    out = annex(repo_path, "contentlocation", batch=keys).split("\n")
    return {k for k, loc in zip(keys, out) if loc.strip()}


def keys_in_tree(repo_path, treeish="HEAD"):
    """Every annex key that a file of ``treeish`` points to (present or not)."""
    out = annex(repo_path, "find", "--branch=" + treeish, "--include=*",
                "--format=${key}\\n")
    return set(out.split())


def drop_key(repo_path, key):
    """Remove ``key``'s content from the local annex (the caller checked
    that nothing committed refers to it)."""
    annex(repo_path, "dropkey", "--force", key)


def remote_uuid(repo_path, name):
    proc = subprocess.run(["git", "config", "remote.%s.annex-uuid" % name],
                          cwd=repo_path, stdout=subprocess.PIPE, text=True)
    return proc.stdout.strip() or None


def ensure_special_remote(repo_path, name, externaltype):
    """Initialise (or enable) our read-only registry remote; return its UUID."""
    uuid = remote_uuid(repo_path, name)
    if uuid:
        return uuid
    if _remote_known(repo_path, name):      # initialised in another clone
        annex(repo_path, "enableremote", name)
    else:
        annex(repo_path, "initremote", name, "type=external",
              "externaltype=" + externaltype, "encryption=none",
              "autoenable=true")
    uuid = remote_uuid(repo_path, name)
    if not uuid:
        raise UdockerError("could not set up the git-annex special remote %s"
                           % name)
    return uuid


def _remote_known(repo_path, name):
    """Is a special remote ``name`` recorded in the git-annex branch?"""
    proc = subprocess.run(["git", "cat-file", "-p", "git-annex:remote.log"],
                          cwd=repo_path, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    return any(("name=%s" % name) in line.split()
               for line in proc.stdout.splitlines())
