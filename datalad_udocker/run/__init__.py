"""Running images: the layout is fed to udocker's repository, a container is
created once per image and execution mode, and commands run in it.

``from datalad_udocker.run import run_image`` is the Python API.
"""
from .runtime import RunResult, run_image  # noqa: F401
