"""Supervise one run's tool (PRoot, runc, env) as ``docker run`` does.

Run as a script (``python -I -S supervise.py PIDFILE GRACE CLEANUP -- TOOL
ARGS...``)
by every wrapper of :mod:`.tools`, between udocker and the tool it runs; it
imports only the standard library, so it starts in milliseconds.  It

1. writes its pid to PIDFILE, so the runner (:meth:`.UdockerCLI.run`) knows
   whom to pass signals to (udocker itself never sees them);
2. passes TERM, INT, HUP, QUIT, USR1 and USR2 on to the tool, which gets
   them to the command: runc forwards them to the container's process,
   :mod:`.proot_launch` to the process PRoot started (PRoot ignores them),
   and under Fakechroot the tool *is* the command;
3. after a TERM, INT, HUP or QUIT, gives the command GRACE seconds to end,
   then kills every process of the run with SIGKILL (all stopped first;
   the tool, when it is runc or PRoot's launcher, CLEANUP seconds after
   the others, so that it can clean up after them: runc removes its state)
   and
   exits 137, as ``docker stop`` does;
4. is a child subreaper: processes of the run that lose their parent
   become its children, not init's, and are killed when the tool ends (the
   container ends with its main process, as under Docker);
5. exits with the tool's status, 128+N when signal N killed it.

Signals are received synchronously (blocked, then ``sigtimedwait``): no
handler runs in the middle of the supervisor's own work.
"""
import contextlib
import ctypes
import os
import signal
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
PR_SET_CHILD_SUBREAPER = 36
KILL_ROUNDS = 10.0     # seconds the killing may take at most


def set_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong, ctypes.c_ulong]
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def live_descendants(root):
    """``[(depth, pid)]`` of the living (not zombie) processes below
    ``root``, from /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:                    # ended meanwhile
            continue
        if fields and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    found, level, depth = [], [root], 0
    while level:
        depth += 1
        level = [c for p in level for c in children.get(p, ())]
        found.extend((depth, pid) for pid in level)
    return found


def exit_status(wait_status):
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


class Supervisor:
    def __init__(self, grace, cleanup):
        self.grace = grace
        self.cleanup = cleanup      # seconds the tool gets after the others
        self.tool = None
        self.status = None          # the tool's wait status, once it ended
        self.deadline = None        # of the grace period, once stopping
        self.killing = None         # since when we kill (grace over)
        self.others_seen = 0.0      # when processes below the tool last were
        self.grace_killed = False
        self.ignored = {s for s in FORWARDED
                        if signal.getsignal(s) == signal.SIG_IGN}

    def start(self, argv, mask):
        pid = os.fork()
        if pid == 0:
            try:
                for signum in (signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(signum, signal.SIG_DFL)   # Python's SIG_IGN
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                os.execvp(argv[0], argv)
            except OSError as exc:
                os.write(2, ("cannot run %s: %s\n" % (argv[0], exc)).encode())
            os._exit(127)
        self.tool = pid

    def reap(self):
        """Collect ended children; False once there are none left."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.tool:
                self.status = wait_status

    def forward(self, signum):
        if signum in self.ignored:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.status is None:
                os.kill(self.tool, signum)
        if signum in STOPPING and self.deadline is None:
            self.deadline = time.monotonic() + self.grace

    def kill_rest(self):
        """SIGKILL the run's processes below the tool; the tool itself
        only once it had time to clean up after them.  Returns whether
        any was still alive."""
        now = time.monotonic()
        others = [pid for _, pid in sorted(live_descendants(os.getpid()))
                  if pid != self.tool or not self.cleanup]
        # stopped top-down, none can react to another's end (a shell would
        # run its next command); killed bottom-up, PRoot after its tracees
        for signum, pids in ((signal.SIGSTOP, others),
                             (signal.SIGKILL, others[::-1])):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
        if others:
            self.others_seen = now
        if self.status is None and (
                not others and now - self.others_seen > self.cleanup or
                now - self.killing > KILL_ROUNDS):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.tool, signal.SIGKILL)
        return bool(others) or self.status is None

    def run(self, watched):
        while self.reap():
            now = time.monotonic()
            if self.killing is None and (self.status is not None or (
                    self.deadline is not None and now >= self.deadline)):
                # grace over, or the tool ended: so does the rest of the run
                self.killing = self.others_seen = now
                self.grace_killed = self.status is None
            if self.killing is not None:
                if not self.kill_rest():
                    continue            # reap the last ones, then end
                timeout = 0.05
            elif self.deadline is not None:
                timeout = self.deadline - now
            else:
                timeout = None
            info = signal.sigwaitinfo(watched) if timeout is None else \
                signal.sigtimedwait(watched, timeout)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self.forward(info.si_signo)
        if self.grace_killed:
            return 128 + signal.SIGKILL     # what `docker stop` reports
        return exit_status(self.status)


def main(argv):
    if len(argv) < 5 or argv[3] != "--":
        sys.stderr.write("usage: supervise.py PIDFILE GRACE CLEANUP -- TOOL "
                         "[ARGS...]\n")
        return 2
    pidfile, grace, cleanup = argv[0], float(argv[1]), float(argv[2])
    command = argv[4:]
    watched = set(FORWARDED) | {signal.SIGCHLD}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    sup = Supervisor(grace, cleanup)
    set_subreaper()
    # before the command starts: a signal for it finds us from then on
    tmp = "%s.%d" % (pidfile, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.replace(tmp, pidfile)
    sup.start(command, mask)
    try:
        return sup.run(watched)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(pidfile)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
