"""udocker's command line, called in a subprocess: the only way we drive it.

udocker's Python internals keep global state and call ``sys.exit()``, so its
CLI and its on-disk layout are the contract.  Every call here

* runs ``udocker -q`` with the interpreter of this process (``--allow-root``
  when we are root), from ``$UDOCKER_DIR/datalad-udocker`` (udocker reads a
  ``u.conf`` from its working directory: only ours may be there);
* sets ``UDOCKER_DIR`` and ``UDOCKER_TARBALL=""`` (never download tools) and
  points udocker at the host tools (:mod:`.tools`);
* collects udocker's own messages apart, so none reach the user's terminal.

:meth:`UdockerCLI.run` gives the user command the caller's stdio (or
capture files) through the tool wrappers and returns its real exit code.
"""
import ast
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import RuntimeError_
from .tools import udocker_environment, write_wrappers

_UDOCKER_MAIN = ("import sys; from udocker.maincmd import main; "
                 "sys.argv[0] = 'udocker'; sys.exit(main())")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                      r"[0-9a-f]{12}$")


class CommandNotFound(RuntimeError_):
    """The command (or entrypoint) does not exist in the container."""
    exit_code = 127


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
             stdin=subprocess.DEVNULL):
        """Run ``udocker -q ARGS``; returns (status, its messages as text)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-c", _UDOCKER_MAIN, "-q"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        with tempfile.TemporaryFile(dir=self.work_dir) as messages:
            proc = subprocess.run(
                argv + list(args), cwd=self.work_dir, stdin=stdin,
                stdout=messages, stderr=subprocess.STDOUT, pass_fds=pass_fds,
                env=udocker_environment(self.udocker_dir, tool_env or {},
                                        bin_dir))
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
        """``udocker setup --execmode=MODE`` (F1 patches the container)."""
        env = {k: v for k, v in (
            ("UDOCKER_FAKECHROOT_SO", tools.get("fakechroot_so")),
            ("UDOCKER_USE_PATCHELF_EXECUTABLE", tools.get("patchelf"))) if v}
        rc, out = self.call(["setup", "--execmode=" + execmode, container],
                            env)
        if rc or "Error" in out:
            raise RuntimeError_("udocker could not set up execution mode %s: "
                                "%s" % (execmode, first_error(out)))

    def remove(self, container):
        """``udocker rm -f``; True if udocker reported success."""
        rc, _ = self.call(["rm", "-f", container])
        return rc == 0

    def run(self, run_args, container, command, tools, capture):
        """``udocker run RUN_ARGS CONTAINER COMMAND...``.

        Returns ``(exit code, stdout, stderr)`` of the command, the outputs
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
                stdin=subprocess.DEVNULL if capture else None)
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
