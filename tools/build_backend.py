"""PEP 517 build backend: setuptools, run in a temporary copy of the sources.

setuptools writes ``datalad_udocker.egg-info`` and ``build/`` into the source
tree, so ``pip install /path/to/clone`` fails with "Permission denied" when
the clone is not the user's own (a colleague's or a site's read-only
checkout), and leaves build debris in it when it is.  Every hook of a
regular (wheel or sdist) build therefore runs setuptools in a copy of the
tree under ``$TMPDIR``; the source tree is only read.  Editable installs
(``pip install -e``) build in place as before: they need a tree you own.
"""
import contextlib
import os
import shutil
import tempfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (editable hooks)

# what a build never needs (and may not be able to read or copy)
_SKIP = shutil.ignore_patterns(".git", ".venv", ".tox", "__pycache__",
                               "*.egg-info", "build", "dist", "_build",
                               ".pytest_cache", ".hypothesis")


@contextlib.contextmanager
def _in_copy():
    source = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="datalad-udocker-build-") as tmp:
        copy = os.path.join(tmp, "src")
        shutil.copytree(source, copy, symlinks=True, ignore=_SKIP)
        os.chdir(copy)
        try:
            yield
        finally:
            os.chdir(source)


def _copying(hook):
    def run(*args, **kwargs):
        # output directories given relative to the source tree stay there
        args = [os.path.abspath(a) if isinstance(a, str) else a
                for a in args]
        kwargs = {k: os.path.abspath(v) if k.endswith("_directory") and v
                  else v for k, v in kwargs.items()}
        with _in_copy():
            return hook(*args, **kwargs)
    run.__name__ = hook.__name__
    run.__doc__ = hook.__doc__
    return run


get_requires_for_build_wheel = _copying(
    _setuptools.get_requires_for_build_wheel)
get_requires_for_build_sdist = _copying(
    _setuptools.get_requires_for_build_sdist)
prepare_metadata_for_build_wheel = _copying(
    _setuptools.prepare_metadata_for_build_wheel)
build_wheel = _copying(_setuptools.build_wheel)
build_sdist = _copying(_setuptools.build_sdist)
