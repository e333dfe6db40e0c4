"""Deleting inside udocker's directory without ever following a symlink out.

Container trees hold whatever their image put there (``etc -> /home/you``),
and a name link in ``containers/`` may point anywhere: every delete of this
package goes through :func:`remove_tree`, which removes a symlink itself
(never what it points to), only deletes below a directory it is told to
clean, and makes write-protected directories of the tree writable without
touching anything a symlink leads to.
"""
import os
import shutil
import stat

from ..errors import RunError


def remove_tree(path, inside):
    """Delete ``path`` (a directory, file or symlink) lying in ``inside``.

    A symlink is unlinked, never followed, wherever it is in the tree.
    Raises RunError if ``path`` is not strictly below ``inside`` (its
    parent directories resolved; ``path`` itself is not).
    """
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    base = os.path.realpath(inside)
    if os.path.commonpath([parent, base]) != base:
        raise RunError("refusing to delete %s: it is not inside %s"
                            % (path, inside))
    path = os.path.join(parent, os.path.basename(os.path.abspath(path)))
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(mode):          # a file or a symlink: only the entry
        os.unlink(path)
        return
    _make_dirs_writable(path)
    shutil.rmtree(path)    # fd-based on Linux: symlinks inside are unlinked


def _make_dirs_writable(top):
    """chmod u+rwx every directory of the tree, following no symlink."""
    os.chmod(top, 0o700)
    for root, dirs, _files in os.walk(top):     # does not enter symlinks
        for name in dirs:
            path = os.path.join(root, name)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.chmod(path, 0o700)
