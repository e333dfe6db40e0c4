"""Compatibility: datasets made by datalad-udocker 0.1 record the call format
``{python} -m datalad_udocker.runtime_cli ...``; it now lives in :mod:`.run.cli`."""
import sys

from .run.cli import main

if __name__ == "__main__":
    sys.exit(main())
