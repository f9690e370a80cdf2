"""The trust boundary: every path an untrusted page (or a confined command line) can name is
resolved here and checked against the data root.

One mechanism for every format: :func:`confine` resolves a path the way the operating system
will open it (symbolic links and ``..`` followed) and refuses it unless the result lies inside
the root; :func:`confine_tree` does the same for every entry of a folder store (zarr), where a
chunk folder or array can be a link to another store; readers that follow references inside a
file (HDF5 external storage, OME-TIFF companion files, model configs naming weights) call
:func:`confine` on each reference. ``nbapp.io.read_image(path, root=DIR)`` and
``nbapp.load_model(spec, root=DIR)`` use them; the app always passes its data root.
"""

from __future__ import annotations

import os
from pathlib import Path

from nbapp.errors import InputError

__all__ = ["confine", "confine_tree", "OutsideRootError", "DataRoot"]


class OutsideRootError(InputError):
    """A path resolves outside the data root."""


class DataRoot(os.PathLike):
    """A data root with a private part: the folders under ``private`` (visitors' own folders of
    a served page) are outside the root for everyone but their owner, whose folder is ``own``.
    Pass it wherever a root goes; :func:`confine` applies both rules.

    >>> import tempfile; top = Path(tempfile.mkdtemp())
    >>> root = DataRoot(top, private=top / "v", own=top / "v" / "me")
    >>> confine("v/me/a.tif", root).name
    'a.tif'
    >>> confine("v/you/a.tif", root)
    Traceback (most recent call last):
    ...
    nbapp.confine.OutsideRootError: path 'v/you/a.tif' is in another visitor's folder
    """

    def __init__(self, path: str | os.PathLike, private: str | os.PathLike | None = None,
                 own: str | os.PathLike | None = None):
        self.path = Path(path)
        self.private = None if private is None else Path(private)
        self.own = None if own is None else Path(own)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"DataRoot({os.fspath(self.path)!r})"

    def check(self, real: Path, shown: str, what: str) -> None:
        """Refuse ``real`` (resolved) if it lies in the private part but not in ``own``."""
        if self.private is None:
            return
        private = Path(os.path.realpath(self.private))
        if not _inside(real, private):
            return
        if self.own is not None and _inside(real, Path(os.path.realpath(self.own))):
            return
        if real == private:
            raise OutsideRootError(f"{what} {shown!r} is the folder of the page's visitors")
        raise OutsideRootError(f"{what} {shown!r} is in another visitor's folder")


def _real_root(root: str | os.PathLike) -> Path:
    real = Path(os.path.realpath(os.fspath(root)))
    if not real.is_dir():
        raise InputError(f"data root {os.fspath(root)!r} is not an existing folder")
    return real


def _inside(real: Path, root_real: Path) -> bool:
    return real == root_real or root_real in real.parents


def confine(path: str | os.PathLike, root: str | os.PathLike | None,
            what: str = "path", shown: str | None = None) -> Path:
    """The real path that ``path`` names, refused unless it lies inside ``root``.

    Relative paths are taken from ``root``; symbolic links and ``..`` are resolved first, so a
    link or a ``..`` that leads out of the root is refused wherever it sits in the path. With
    ``root=None`` nothing is confined and the path is returned with ``~`` expanded. Errors
    name the path as ``what`` and ``shown`` (default: the path as given).

    Raises
    ------
    OutsideRootError
        The resolved path is outside the root.
    InputError
        Empty path, or a root that is not a folder.

    >>> import tempfile; root = tempfile.mkdtemp()
    >>> confine("a/../b.tif", root) == Path(os.path.realpath(root)) / "b.tif"
    True
    >>> confine("a/../../etc/passwd", root)
    Traceback (most recent call last):
    ...
    nbapp.confine.OutsideRootError: path 'a/../../etc/passwd' is outside the data root
    """
    text = os.fspath(path).strip() if isinstance(path, str) else os.fspath(path)
    if not text:
        raise InputError(f"no {what} given")
    if "\0" in str(text):
        raise InputError(f"{what} {str(text)!r} contains a NUL character")
    if root is None:
        return Path(os.path.expanduser(text))
    root_real = _real_root(root)
    p = Path(text)
    if not p.is_absolute():
        p = Path(os.fspath(root)) / p
    real = Path(os.path.realpath(p))
    shown = os.fspath(path) if shown is None else shown
    if not _inside(real, root_real):
        raise OutsideRootError(f"{what} {shown!r} is outside the data root")
    if isinstance(root, DataRoot):
        root.check(real, shown, what)
    return real


def confine_tree(folder: str | os.PathLike, root: str | os.PathLike | None,
                 what: str = "store") -> None:
    """Refuse a folder (a zarr store) that contains a symbolic link leading out of ``root``.

    The folder itself must be inside the root (see :func:`confine`); then every symbolic link
    in it, at any depth, must resolve inside the root too. Links are not followed while
    walking (a link to a folder inside the root is checked as a link, and its target is walked
    as part of the root only if it is itself inside the folder).
    """
    if root is None:
        return
    root_real = _real_root(root)
    top = confine(folder, root, what)
    stack = [top]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except NotADirectoryError:
            continue
        except OSError as exc:
            raise InputError(f"cannot read {what} {os.fspath(folder)!r}: "
                             f"{exc.strerror or exc}") from None
        for entry in entries:
            if entry.is_symlink():
                real = Path(os.path.realpath(entry.path))
                if not _inside(real, root_real):
                    rel = os.path.relpath(entry.path, top)
                    raise OutsideRootError(f"{what} {os.fspath(folder)!r} links {rel!r} to a "
                                           "place outside the data root")
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
