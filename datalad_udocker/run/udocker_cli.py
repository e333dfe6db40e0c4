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
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import CommandNotFound, RuntimeError_  # noqa: F401 (re-export)
from .supervise import FORWARDED, STOPPING
from .tools import STOP_GRACE, udocker_environment, write_wrappers

HIDDEN_ARGS_VAR = "DATALAD_UDOCKER_HIDDEN_ARGS"
_UDOCKER_MAIN = (
    "import json, os, sys; from udocker.maincmd import main; "
    "sys.argv[0] = 'udocker'; "
    "at, hidden = json.loads(os.environ.pop(%r, '[0, []]')); "
    "sys.argv[at:at] = hidden; "
    "sys.exit(main())" % HIDDEN_ARGS_VAR)
LAST_RESORT = 15      # seconds udocker gets after the grace period to end
# the umask of every run: Docker's, whatever the caller's (files udocker
# writes for a run, such as the container's /etc/passwd, and those the
# command creates)
RUN_UMASK = 0o022


def first_error(text):
    """The line of udocker's messages that best says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    return (errors or lines or ["no message"])[0]


def _missing_command(messages, command):
    """The command udocker did not find, from its ``[...]`` message."""
    m = re.search(r"command not found[^\[]*(\[.*\])", messages)
    if m:
        import ast
        with contextlib.suppress(ValueError, SyntaxError):
            return " ".join(ast.literal_eval(m.group(1)))
    return " ".join(command) or "its Entrypoint/Cmd"


def _signal_supervisor(pidfile, signum):
    """Send ``signum`` to the supervisor whose pid is in ``pidfile``; False
    when it is not running (yet)."""
    try:
        pid = int(Path(pidfile).read_text())
        os.kill(pid, signum)
    except (OSError, ValueError):
        return False
    return True


def forwarding_signals(argv, popen_kwargs, pidfile, grace):
    """Run ``argv`` in a session of its own, passing the signals of
    :data:`.supervise.FORWARDED` we get on to the supervisor (pid in
    ``pidfile``) once it runs; returns the exit status.

    The handlers only note a signal and wake a thread that passes it on
    (retrying until the supervisor runs).  Signals we ignore stay ignored;
    outside the main thread none can be caught.  Should udocker not end
    ``grace`` + :data:`LAST_RESORT` seconds after a TERM, INT, HUP or QUIT,
    its process group is killed.
    """
    pending, stop_at, done = [], [], []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    def on_signal(signum, _frame):
        pending.append(signum)
        if signum in STOPPING and not stop_at:
            stop_at.append(time.monotonic() + grace + LAST_RESORT)
        with contextlib.suppress(OSError):
            os.write(wake_w, b"!")

    def forwarder(proc):
        while not done:
            timeout = 0.2 if pending else (
                max(0.0, stop_at[0] - time.monotonic()) if stop_at else None)
            if select.select([wake_r], [], [], timeout)[0]:
                os.read(wake_r, 512)
            while pending and not done and \
                    _signal_supervisor(pidfile, pending[0]):
                pending.pop(0)
            if stop_at and time.monotonic() >= stop_at[0] and not done:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                stop_at.clear()

    previous = {}
    thread = None
    try:
        try:
            for signum in FORWARDED:
                if signal.getsignal(signum) != signal.SIG_IGN:
                    previous[signum] = signal.signal(signum, on_signal)
        except ValueError:              # not the main thread: none caught
            pass
        proc = subprocess.Popen(argv, start_new_session=True,
                                **popen_kwargs)
        thread = threading.Thread(target=forwarder, args=(proc,),
                                  daemon=True)
        thread.start()
        try:
            return proc.wait()
        except BaseException:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    finally:
        done.append(True)
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None
                          else handler)
        if thread is not None:
            os.write(wake_w, b"!")
            thread.join()
        os.close(wake_r)
        os.close(wake_w)


class UdockerCLI:
    """udocker commands on one udocker directory."""

    def __init__(self, udocker_dir, work_dir):
        self.udocker_dir = Path(udocker_dir)
        self.work_dir = Path(work_dir)

    def call(self, args, tool_env=None, bin_dir=None, pass_fds=(),
             stdin=subprocess.DEVNULL, hidden=(), signals_to=None,
             grace=STOP_GRACE, umask=-1):
        """Run ``udocker -q ARGS``; returns (status, its messages as text).

        ``hidden`` options go after the subcommand ``ARGS[0]`` without
        appearing on the command line (see the module doc).  With
        ``signals_to`` (the supervisor's pid file, see :meth:`run`) udocker
        runs in a session of its own and the signals we get are passed on
        (see :func:`forwarding_signals`).
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
            kwargs = dict(cwd=self.work_dir, stdin=stdin, stdout=messages,
                          stderr=subprocess.STDOUT, pass_fds=pass_fds,
                          env=env, umask=umask)
            if signals_to is None:
                rc = subprocess.run(argv + list(args), **kwargs).returncode
            else:
                rc = forwarding_signals(argv + list(args), kwargs,
                                        signals_to, grace)
            messages.seek(0)
            return rc, messages.read().decode(errors="replace")

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

    def run(self, run_args, container, command, tools, capture, env=None,
            grace=STOP_GRACE, fast=None):
        """``udocker run RUN_ARGS CONTAINER COMMAND...``.

        ``env`` (a dict) sets variables in the container, their values kept
        off every command line.  Returns ``(exit code, stdout, stderr)`` of
        the command, the outputs as bytes when ``capture`` (else None: they
        went to our stdout and stderr).  Raises CommandNotFound or
        RuntimeError_ when udocker did not start the command.

        As under ``docker run``, TERM, INT, HUP, QUIT, USR1 and USR2 sent
        to this process (in its main thread) go to the command; ``grace``
        seconds after a TERM, INT, HUP or QUIT every process of the run is
        killed and the status is 137.  udocker runs in a session of its
        own, so a terminal's ^C reaches the command once, through us.
        The command's umask is Docker's, 022 (:data:`RUN_UMASK`).

        With ``fast`` (a :class:`.fastpath.FastPath`, P1/P2, no ``env``)
        the recorded PRoot command line runs without udocker when it is
        still valid; else udocker runs and the line it builds is recorded.
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
            pidfile = tmp / "supervisor.pid"
            tool_env = write_wrappers(tmp / "bin", tools, fds, pidfile, grace)
            stdin = subprocess.DEVNULL if capture else None
            planned = fast.plan(tmp) if fast is not None and not env \
                else None
            if planned is not None:
                # our proot wrapper, as udocker would call it
                proot_args, proot_env = planned
                with tempfile.TemporaryFile(dir=self.work_dir) as msg:
                    rc = forwarding_signals(
                        [tool_env["UDOCKER_USE_PROOT_EXECUTABLE"]] +
                        proot_args,
                        dict(cwd=self.work_dir, stdin=stdin, stdout=msg,
                             stderr=subprocess.STDOUT, pass_fds=fds,
                             env=proot_env, umask=RUN_UMASK), pidfile, grace)
                    msg.seek(0)
                    messages = msg.read().decode(errors="replace")
            else:
                recording = fast is not None and not env
                if recording:
                    tool_env = fast.recorder(tmp, tool_env)
                rc, messages = self.call(
                    ["run"] + list(run_args) + [container] + list(command),
                    tool_env, bin_dir=tmp / "bin", pass_fds=fds, stdin=stdin,
                    hidden=["--env=%s=%s" % kv for kv in sorted(
                        (env or {}).items())], signals_to=pidfile,
                    grace=grace, umask=RUN_UMASK)
            for f in files:      # the children moved the shared offsets
                f.seek(0)
            status = files[2].read().decode().split()
            if planned is None and recording and status:
                fast.save(tmp)
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
