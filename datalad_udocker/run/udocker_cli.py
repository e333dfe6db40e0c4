"""udocker's command line, called in a subprocess: the only way we drive it.

udocker's Python internals keep global state and call ``sys.exit()``, so its
CLI and its on-disk layout are the contract.  Every call here

* runs ``udocker -q`` with the interpreter of this process (``--allow-root``
  when we are root), from ``$UDOCKER_DIR/datalad-udocker`` (udocker reads a
  ``u.conf`` from its working directory: only ours may be there);
* sets ``UDOCKER_DIR`` and ``UDOCKER_TARBALL=""`` (never download tools) and
  points udocker at the host tools (:mod:`.tools`);
* collects udocker's own messages apart, so none reach the user's terminal;
* can take options that must not appear on any command line (``hidden``:
  the user's ``--env=NAME=VALUE``, which may hold secrets): they travel in
  the environment variable :data:`HIDDEN_ARGS_VAR` (readable only by the
  user, like the command's own environment) and the ``-c`` program below
  splices them into udocker's ``sys.argv`` after the subcommand, so
  ``/proc/PID/cmdline`` never holds them.

:meth:`UdockerCLI.run` gives the user command the caller's stdio (or
capture files) through the tool wrappers and returns its real exit code.
"""
import ast
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import CommandNotFound, RuntimeError_  # noqa: F401 (re-export)
from .tools import udocker_environment, write_wrappers

HIDDEN_ARGS_VAR = "DATALAD_UDOCKER_HIDDEN_ARGS"
_UDOCKER_MAIN = (
    "import json, os, sys; from udocker.maincmd import main; "
    "sys.argv[0] = 'udocker'; "
    "at, hidden = json.loads(os.environ.pop(%r, '[0, []]')); "
    "sys.argv[at:at] = hidden; "
    "sys.exit(main())" % HIDDEN_ARGS_VAR)
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                      r"[0-9a-f]{12}$")


def first_error(text):
    """The line of udocker's messages that best says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    return (errors or lines or ["no message"])[0]


def _missing_command(messages, command):
    """The command udocker did not find, from its ``[...]`` message."""
    m = re.search(r"command not found[^\[]*(\[.*\])", messages)
    if m:
        with contextlib.suppress(ValueError, SyntaxError):
            return " ".join(ast.literal_eval(m.group(1)))
    return " ".join(command) or "its Entrypoint/Cmd"


class UdockerCLI:
    """udocker commands on one udocker directory."""

    def __init__(self, udocker_dir, work_dir):
        self.udocker_dir = Path(udocker_dir)
        self.work_dir = Path(work_dir)

    def call(self, args, tool_env=None, bin_dir=None, pass_fds=(),
             stdin=subprocess.DEVNULL, hidden=()):
        """Run ``udocker -q ARGS``; returns (status, its messages as text).

        ``hidden`` options go after the subcommand ``ARGS[0]`` without
        appearing on the command line (see the module doc).
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-c", _UDOCKER_MAIN, "-q"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        env = udocker_environment(self.udocker_dir, tool_env or {}, bin_dir)
        env.pop(HIDDEN_ARGS_VAR, None)
        if hidden:
            # sys.argv of `python -c`: ['-c', '-q', ..., SUBCOMMAND, ...]
            at = len(argv) - 2 + 1
            env[HIDDEN_ARGS_VAR] = json.dumps([at, list(hidden)])
        with tempfile.TemporaryFile(dir=self.work_dir) as messages:
            proc = subprocess.run(
                argv + list(args), cwd=self.work_dir, stdin=stdin,
                stdout=messages, stderr=subprocess.STDOUT, pass_fds=pass_fds,
                env=env)
            messages.seek(0)
            return proc.returncode, messages.read().decode(errors="replace")

    def create(self, name, image_spec):
        """``udocker create --name=NAME SPEC``; returns the container id.

        udocker exits 0 even when extraction failed, so its messages are
        checked too.
        """
        rc, out = self.call(["create", "--name=" + name, image_spec])
        ids = [w for w in out.split() if _UUID_RE.match(w)]
        if rc or not ids or "Error" in out:
            raise RuntimeError_("udocker could not create a container from "
                                "%s: %s" % (image_spec, first_error(out)))
        return ids[-1]

    def setup(self, container, execmode, tools):
        """``udocker setup --execmode=MODE``; for F1 udocker then also
        records the image's loader (:data:`.tools.F1_RECORD_LOADER`) so that
        runs never search for it."""
        from .tools import F1_RECORD_LOADER, fakechroot_env
        (self.work_dir / "run").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.work_dir / "run") as tmp:
            env = fakechroot_env(tmp, tools) if execmode == "F1" else {}
            rc, out = self.call(["setup", "--execmode=" + execmode,
                                 container], env)
            if execmode == "F1" and not (rc or "Error" in out):
                proc = subprocess.run(
                    [sys.executable, "-c", F1_RECORD_LOADER, container],
                    cwd=self.work_dir, stdin=subprocess.DEVNULL,
                    capture_output=True, text=True,
                    env=udocker_environment(self.udocker_dir, env))
                rc, out = proc.returncode, proc.stdout
                if rc:          # a traceback says most in its last line
                    out += "Error: finding the image's loader: " + (
                        proc.stderr.strip().splitlines() or ["?"])[-1]
        if rc or "Error" in out:
            raise RuntimeError_("udocker could not set up execution mode %s: "
                                "%s" % (execmode, first_error(out)))

    def remove(self, container):
        """``udocker rm -f``; True if udocker reported success."""
        rc, _ = self.call(["rm", "-f", container])
        return rc == 0

    def run(self, run_args, container, command, tools, capture, env=None):
        """``udocker run RUN_ARGS CONTAINER COMMAND...``.

        ``env`` (a dict) sets variables in the container, their values kept
        off every command line.  Returns ``(exit code, stdout, stderr)`` of the command, the outputs
        as bytes when ``capture`` (else None: they went to our stdout and
        stderr).  Raises CommandNotFound or RuntimeError_ when udocker did
        not start the command.
        """
        run_root = self.work_dir / "run"
        run_root.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(
                tempfile.TemporaryDirectory(dir=run_root)))
            files = [stack.enter_context(open(tmp / n, "w+b"))
                     for n in ("stdout", "stderr", "status")]
            if capture:
                fds = [f.fileno() for f in files]
            else:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                fds = [os.dup(1), os.dup(2), files[2].fileno()]
                stack.callback(os.close, fds[0])
                stack.callback(os.close, fds[1])
            tool_env = write_wrappers(tmp / "bin", tools, fds)
            rc, messages = self.call(
                ["run"] + list(run_args) + [container] + list(command),
                tool_env, bin_dir=tmp / "bin", pass_fds=fds,
                stdin=subprocess.DEVNULL if capture else None,
                hidden=["--env=%s=%s" % kv for kv in sorted(
                    (env or {}).items())])
            for f in files:      # the children moved the shared offsets
                f.seek(0)
            status = files[2].read().decode().split()
            out = err = None
            if capture:
                out, err = (f.read() for f in files[:2])
        if status:
            return int(status[-1]), out, err
        if "command not found" in messages:
            raise CommandNotFound("command not found in the container: %s"
                                  % _missing_command(messages, command))
        raise RuntimeError_("udocker could not run the container (status "
                            "%d): %s" % (rc, first_error(messages)))
