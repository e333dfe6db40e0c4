"""datalad-udocker: container images from OCI registries, versioned in
DataLad datasets (layers in git-annex with registry URLs) and run with
udocker without root or a daemon.

Data path: registry -> ``registry/`` (client) -> ``dataset/`` (OCI layout in
git, layers as annex keys, special remote) -> ``run/`` (udocker) -> process;
``archive/`` reads image archives and writes what ``docker load`` reads.
At the top: the shared vocabulary (``reference``, ``oci``, ``digest``,
``source``, ``errors``, ``config``) and the DataLad commands (``commands/``).
"""

__version__ = "0.1.0"

command_suite = (
    "Container images from OCI registries, run with udocker",
    [
        ("datalad_udocker.commands.import_image", "UdockerImport",
         "udocker-import", "udocker_import"),
        ("datalad_udocker.commands.export_image", "UdockerExport",
         "udocker-export", "udocker_export"),
        ("datalad_udocker.commands.containers_cache", "UdockerContainers",
         "udocker-containers", "udocker_containers"),
    ],
)

# DataLad imports this package to load the extension, for every command:
# what that does stays cheap (see hooks.py)
import sys as _sys  # noqa: E402
from .callformat import (make_runner_findable,  # noqa: E402
                         title_runs_with_user_command)
make_runner_findable()
title_runs_with_user_command()
if "containers-run" in _sys.argv[1:]:
    from .hooks import enable_for_containers_run
    enable_for_containers_run(_sys.argv[1:])
