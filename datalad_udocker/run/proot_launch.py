"""Start PRoot: the container's files, the command's stderr, Docker's status.

Run as a script (``python -I -S proot_launch.py PROOT ARGS...``) by the proot
wrapper of :mod:`.tools`; it imports only the standard library, so it starts
in milliseconds.  It

1. installs a seccomp filter that makes ``statx``, ``faccessat2`` and the
   other system calls PRoot 5.1.0 (Debian 12) does not know fail with ENOSYS
   in PRoot and every process it traces.  PRoot passes unknown calls on
   with their paths untranslated, so ``ls``, ``stat``, ``[ -x ]``, perl...
   would see the HOST's file at the same path; with ENOSYS, glibc (and
   musl, Go, Rust) fall back to ``newfstatat``, ``faccessat``..., which
   PRoot translates.  Needs ``no_new_privs`` (setuid programs never gain
   privileges under PRoot anyway).  Newer PRoots translate these calls: the
   fallbacks are correct there too;
2. runs PRoot with ``-v 1`` (so that it reports how each process ended) and
   its stderr through a pipe, passes the command's stderr on unchanged and
   drops PRoot's own ``proot info:`` lines (``pid N: terminated with signal
   S`` and the like).  The command's stderr is thus a pipe, as under
   ``docker run`` without ``-t``;
3. passes TERM, INT, HUP, QUIT, USR1 and USR2 on to the process PRoot
   started (PRoot ignores them), as ``docker run`` does; :mod:`.supervise`
   above kills what is left after a grace period;
4. stops the command (SIGKILL to every process PRoot traces) and exits
   with status 125 and a one-line error if PRoot says it could not enter the
   working directory: PRoot only warns and runs the command in "/" (a bind
   missing in the container), where it would do its work out of sight;
5. exits with the main command's status as Docker reports it: its exit code,
   or 128+N when a signal N killed it.  PRoot itself exits with the status
   of the *last* process that exited normally (255 when none did), so the
   status is taken from its per-process lines: ``vpid 1`` (PRoot >= 5.2
   numbers tracees, 1 being the command) or else the last process to end
   (PRoot 5.1 prints host pids; the command normally ends last).
"""
import ctypes
import errno
import os
import select
import signal
import struct
import sys

# seccomp / BPF constants (linux/seccomp.h, linux/filter.h, linux/audit.h)
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
BPF_LD_W_ABS = 0x20          # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15             # BPF_JMP | BPF_JEQ | BPF_K
BPF_RET_K = 0x06             # BPF_RET | BPF_K
X32_SYSCALL_BIT = 0x40000000

# System calls PRoot 5.1 does not know, so does not translate the paths of
# (or, for clone3, the flags of).  Each is newer than an equivalent that
# glibc, musl, Go and Rust fall back to on ENOSYS, as they do under Docker's
# default seccomp profile (or is an unprivileged no-op, like the mount API).
# Debian's 5.1.0 has a patch for renameat2; other builds may not, and an
# untranslated rename would move the HOST's files: it stays in the list.
# Per architecture: statx, renameat2, execveat; numbers from 403 on are
# the same on every architecture: open_tree, move_mount, fspick, clone3,
# openat2, faccessat2, mount_setattr, fchmodat2, {set,get,list,remove}xattrat,
# open_tree_attr, file_getattr, file_setattr.
_COMMON = (428, 429, 433, 435, 437, 439, 442, 452, 463, 464, 465, 466, 467,
           468, 469)
UNTRANSLATED = {    # machine -> {audit architecture: numbers}
    "x86_64": {0xC000003E: (332, 316, 322) + _COMMON,      # x86_64
               0x40000003: (383, 353, 358) + _COMMON},     # i386
    "aarch64": {0xC00000B7: (291, 276, 281) + _COMMON,     # aarch64
                0x40000028: (397, 382, 387) + _COMMON},    # arm
}

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
_PREFIX = b"proot info: "
# PRoot could not enter the working directory in the guest (its bind is
# missing): it only warns and runs the command in "/" instead
_NO_CWD = b"proot warning: can't chdir("
NO_CWD_STATUS = 125         # datalad-udocker-run's status for its own failures
HOLD = 0.2    # seconds a partial line that may be PRoot's waits for the rest


def filter_program():
    """The BPF program, a list of (code, jt, jf, k): ENOSYS for the
    :data:`UNTRANSLATED` calls (x32 ones included), everything else allowed."""
    arches = UNTRANSLATED.get(os.uname().machine)
    if not arches:
        return None
    prog = []
    for arch, numbers in arches.items():
        if arch == 0xC000003E:       # x32 processes share x86_64's audit arch
            numbers = numbers + tuple(X32_SYSCALL_BIT | n
                                      for n in numbers + (545,))  # execveat
        # another architecture jumps over the block
        block = [(BPF_LD_W_ABS, 0, 0, 0)]                   # A = syscall nr
        for i, nr in enumerate(numbers):
            block.append((BPF_JEQ_K, len(numbers) - i, 0, nr))
        block.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
        block.append((BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS))
        prog.append((BPF_LD_W_ABS, 0, 0, 4))                 # A = arch
        prog.append((BPF_JEQ_K, 0, len(block), arch))
        prog.extend(block)
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return prog


def install_filter():
    """Make the :data:`UNTRANSLATED` calls fail with ENOSYS here and in every
    process started from here.

    Returns None, or why it could not (an architecture we have no numbers
    for, a kernel without seccomp filters).
    """
    prog = filter_program()
    if prog is None:
        return "no system call numbers for %s" % os.uname().machine
    code = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p,
                           ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                       ctypes.addressof(fprog), 0, 0) != 0:
        return "seccomp: " + os.strerror(ctypes.get_errno())
    return None


def proot_argv(argv):
    """PRoot's arguments with ``-v 1`` first (a later ``-v`` still wins)."""
    return [argv[0], "-v", "1"] + list(argv[1:])


class StderrFilter:
    """Copies PRoot's stderr to ours without its info lines, noting how
    processes ended."""

    def __init__(self, out_fd):
        self.out_fd = out_fd
        self.pending = b""
        self.last = None      # status of the last process to end (as Docker)
        self.vpid1 = None     # status of PRoot >= 5.2's vpid 1, the command
        self.broken = False
        self.no_cwd = None    # PRoot's warning that it ran the command in /
        # PRoot's start-up note "argv = ..." quotes the command's arguments
        # raw: an argument with newlines continues over the next lines, up to
        # the note "initial cwd = ..." that always follows it
        self.in_argv = False

    def feed(self, data):
        self.pending += data
        if self.in_argv:            # nothing of it may pass half-seen
            cut = self.pending.rfind(b"\n") + 1
            done, self.pending = self.pending[:cut], self.pending[cut:]
            self._write(self._strip(done))
            if self.in_argv:
                return
        cut = self.pending.rfind(b"\n") + 1
        done, self.pending = self.pending[:cut], self.pending[cut:]
        # a partial line that may still become an info line waits for more
        at = self.pending.find(b"p")
        while at >= 0:
            tail = self.pending[at:]
            if _PREFIX.startswith(tail[:len(_PREFIX)]):
                break
            at = self.pending.find(b"p", at + 1)
        if at < 0:
            done, self.pending = done + self.pending, b""
        else:
            done, self.pending = done + self.pending[:at], self.pending[at:]
        self._write(self._strip(done))

    def flush(self):
        self._write(self._strip(self.pending))
        self.pending = b""

    close = flush

    def _strip(self, data):
        """``data`` without PRoot's info notes (each ends its line)."""
        kept = []
        for line in data.splitlines(keepends=True):
            at = line.find(_PREFIX)
            if self.in_argv:
                if at < 0 or not line[at + len(_PREFIX):].startswith(
                        b"initial cwd = "):
                    continue        # more of the quoted arguments
                self.in_argv = False
            if at < 0:
                if line.startswith(_NO_CWD) and self.no_cwd is None:
                    self.no_cwd = line.strip()
                    continue
                kept.append(line)
                continue
            kept.append(line[:at])
            note = line[at + len(_PREFIX):]
            if note.startswith(b"argv = "):
                self.in_argv = True
            self._record(note.split())
        return b"".join(kept)

    def _record(self, words):
        """Note ``[v]pid N: exited with status S`` (or ``terminated with
        signal S``)."""
        if len(words) == 6 and words[0] in (b"pid", b"vpid") and \
                words[1].endswith(b":") and words[1][:-1].isdigit() and \
                words[5].isdigit() and words[2:5] in (
                    [b"exited", b"with", b"status"],
                    [b"terminated", b"with", b"signal"]):
            killed = words[2] == b"terminated"
            self.last = int(words[5]) + (128 if killed else 0)
            if words[:2] == [b"vpid", b"1:"]:
                self.vpid1 = self.last

    def _write(self, data):
        while data and not self.broken:
            try:
                data = data[os.write(self.out_fd, data):]
            except BlockingIOError:    # someone made stderr non-blocking
                select.select([], [self.out_fd], [])
            except OSError:                # EPIPE and the like: stderr is gone
                self.broken = True

    def status(self, proot_status):
        """The command's status (PRoot's own if it reported no process end)."""
        for status in (self.vpid1, self.last, proot_status):
            if status is not None:
                return status


def forward(proot, signum):
    """Pass ``signum`` on to the process PRoot started (the command), as
    ``docker run`` does; PRoot itself ignores TERM, INT, HUP and takes QUIT,
    USR1, USR2 for itself."""
    try:
        with open("/proc/%d/task/%d/children" % (proot[0], proot[0])) as f:
            command = int(f.read().split()[0])
        os.kill(command, signum)
    except (IndexError, ValueError, OSError):
        pass        # not started or gone: the supervisor's grace kill ends it


def _descendants(pid):
    """The pids of ``pid``'s children, theirs..., as /proc lists them now."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir("/proc/%d/task" % parent)
        except OSError:
            continue
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/children" % (parent, task)) as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def stop_tracees(proot_pid):
    """SIGKILL every process PRoot traces (never PRoot itself: its tracees
    would go on untraced, seeing the host's files); PRoot then ends."""
    for pid in _descendants(proot_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(argv):
    if len(argv) < 1:
        sys.stderr.write("usage: proot_launch.py PROOT [ARGS...]\n")
        return 2
    failed = install_filter()
    if failed:
        os.write(2, ("datalad-udocker: warning: programs in the container may "
                     "see the host's file metadata (%s): use execution mode "
                     "R1 or F1 if that matters\n" % failed).encode())
    # signals are for the command: PRoot ignores them (a caught signal,
    # unlike an ignored one, is default again after exec)
    proot = []
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, _: forward(proot, signum))
    read_end, write_end = os.pipe()
    pid = os.fork()
    proot.append(pid)
    if pid == 0:                                      # child: PRoot
        try:
            for signum in (signal.SIGPIPE, signal.SIGXFSZ):  # Python's SIG_IGN
                signal.signal(signum, signal.SIG_DFL)
            os.dup2(write_end, 2)
            os.close(read_end)
            os.close(write_end)
            os.execvp(argv[0], proot_argv(argv))
        except OSError as exc:
            os.write(2, ("cannot run %s: %s\n" % (argv[0], exc)).encode())
        os._exit(127)
    os.close(write_end)
    filt = StderrFilter(2)
    while True:
        # a held partial line goes out if nothing follows it soon (a note of
        # PRoot's, written at once up to its message, waits for its newline)
        if filt.pending and not filt.pending.startswith(_PREFIX) and \
                not select.select([read_end], [], [], HOLD)[0]:
            filt.flush()
            continue
        if filt.no_cwd is not None and \
                not select.select([read_end], [], [], HOLD)[0]:
            stop_tracees(pid)   # again: one may have forked meanwhile
            continue
        data = os.read(read_end, 65536)
        if not data:
            break
        filt.feed(data)
        if filt.no_cwd is not None:
            stop_tracees(pid)   # each tracee holds the pipe: we read on
        if filt.broken:       # our stderr is gone: the command's goes too
            break
    os.close(read_end)
    filt.close()
    _, wait_status = os.waitpid(pid, 0)
    if filt.no_cwd is not None:
        os.write(2, ("datalad-udocker: error: the working directory is not in "
                     "the container, its bind is missing (%s): the command "
                     "was stopped\n" % filt.no_cwd.decode(errors="replace")
                     ).encode())
        return NO_CWD_STATUS
    if os.WIFSIGNALED(wait_status):       # PRoot itself was killed
        return 128 + os.WTERMSIG(wait_status)
    return filt.status(os.WEXITSTATUS(wait_status))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
