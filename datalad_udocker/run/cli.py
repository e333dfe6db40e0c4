"""Command line entry point that runs an imported image: the containers-run adapter.

``datalad containers-run`` calls it through the call format the import
command registers (``datalad.containers.<name>.cmdexec``, see
:data:`..config.CMDEXEC`)::

    datalad-udocker-run -d '{img_dspath}' '{img}' {cmd}

so a run record names the console script and relative paths, never one
user's interpreter: anyone with datalad-udocker installed can rerun it.
Datasets made by 0.1 record ``{python} -m datalad_udocker.runtime_cli ...``,
which still works (that module forwards here).  When DataLad loads this
extension (``containers-run``, ``import datalad.api``) and the console
script is not on PATH (a venv called by absolute path, not activated), the
directory holding it is appended to PATH (:mod:`..callformat`).

Users can call it directly::

    datalad-udocker-run [--dataset DS] [--execmode P1|P2|F1|R1]
                        [--entrypoint PROG] IMAGE [CMD ...]

IMAGE is the image's layout directory in a dataset.  Missing layers are
fetched with ``datalad get`` first; an empty CMD runs the image's Entrypoint
and Cmd.  The command's stdout, stderr and exit status are passed through
unchanged.  Signals sent to this process while the command runs go to it,
as under ``docker run`` (TERM, INT, HUP, QUIT, USR1, USR2); after a TERM,
INT, HUP or QUIT the command gets ``datalad.udocker.stop-timeout`` seconds
(default 10) to end, then every process of the run is killed and the exit
status is 137, as after ``docker stop``.  When the command cannot be
started a single line ``datalad-udocker-run: error: ...`` goes to stderr and
the exit status follows ``docker run``: 127 when the command does not exist
in the container, 125 for every other failure (missing or corrupt layers, a
missing execution tool, an unknown execution mode, ...).
"""
import argparse
import logging
import signal
import sys

from ..callformat import RUNNER as PROG
from ..errors import UdockerError

EXIT_NOT_FOUND = 127
EXIT_FAILED = 125

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a command in a container image stored "
        "in a DataLad dataset, with udocker (no root, no daemon).")
    parser.add_argument("--dataset", "-d", default=None,
                        help="dataset to bind-mount at its own path (the "
                        "command runs in the current directory if inside it)")
    parser.add_argument("--execmode", default=None,
                        help="udocker execution mode (P1, P2, F1, R1); "
                        "default: datalad.udocker.execmode or P1")
    parser.add_argument("--entrypoint", default=None,
                        help="replace the image's Entrypoint")
    parser.add_argument("image", help="the image's layout directory")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="command and arguments (default: the image's "
                        "Entrypoint and Cmd)")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    return args


class Interrupted(BaseException):
    """TERM or HUP before the command ran: like ^C, it unwinds (what a
    first run was creating is removed) and we exit with 128+N."""


def _interrupted(signum, _frame):
    raise Interrupted(signum)


def main(argv=None):
    """Run the image; returns (and as a script exits with) the status.

    While the command runs, the signals we get go to it (see
    :meth:`.UdockerCLI.run`); before, TERM and HUP unwind like ^C.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # datalad's own logging would otherwise mix with the command's stderr
    logging.getLogger("datalad").setLevel(logging.WARNING)
    from .runtime import CommandNotFound, run_image
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, _interrupted)
    try:
        result = run_image(args.image, args.command, dataset=args.dataset,
                           execmode=args.execmode, capture=False,
                           entrypoint=args.entrypoint)
    except CommandNotFound as exc:
        _error(exc)
        return EXIT_NOT_FOUND
    except UdockerError as exc:
        _error(exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Interrupted as exc:
        return 128 + exc.args[0]
    return result.exit_code


def _error(exc):
    sys.stdout.flush()
    message = " ".join(str(exc).split())
    sys.stderr.write("%s: error: %s\n" % (PROG, message))
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
