"""Where the app reads and writes, for one user: a notebook's owner or a served page's visitor.

A served page (``nbapp app``) is an untrusted visitor, and a lab group shares one server. Its
workspace holds the rules that keep one visitor's work from another's and from the data:

- **reads** stay inside the data root, and out of every other visitor's folder
  (:class:`nbapp.confine.DataRoot`, the one trust check);
- **writes** go only into the visitor's own folder ``<data root>/nbapp-visitors/<visitor>/``
  (``exports/``, ``training/``, ``training/models/``), under names of letters, digits,
  ``_ . -`` and spaces (:func:`check_name`), and are **created exclusively** (:func:`claim`): a
  name that exists gets the next free one (``labels-2.tif``), so nothing is ever replaced and
  no input is ever written over;
- **models** come from trusted places only (:meth:`Workspace.model_source`): the bundled model,
  the zoo (downloaded and hash-checked by nbapp), the visitor's own fine-tunes, and folders the
  administrator names (``nbapp app --models DIR``); a model file in the data root, which a
  visitor or a colleague could have put there, only where the administrator allows it
  (``--allow-data-root-models``). Every TorchScript file is also checked operator by operator
  (:mod:`nbapp.models.guard`).

A notebook's owner (no visitor) keeps today's folders (``nbapp-exports/`` and ``nbapp-training/``
in the data root, or beside the data) and may load any model file; the app still creates its
files exclusively.

The server passes a visitor's workspace to the page's kernel in environment variables
(:data:`VISITOR_ENV`, :data:`MODEL_DIRS_ENV`, :data:`ROOT_MODELS_ENV`, with
``NBAPP_DATA_ROOT``); :func:`from_environment` reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nbapp.confine import DataRoot, confine
from nbapp.errors import InputError, ModelError
from nbapp.proofread import TRAINING_FOLDER

__all__ = ["Workspace", "from_environment", "check_name", "claim", "release", "reserve_numbered",
           "VISITORS_FOLDER",
           "EXPORT_FOLDER", "TRAINING_FOLDER", "VISITOR_ENV", "MODEL_DIRS_ENV",
           "ROOT_MODELS_ENV", "DATA_ROOT_ENV"]

#: Visitors' own folders, inside the data root.
VISITORS_FOLDER = "nbapp-visitors"
#: A notebook owner's exports and training sets (in the data root, or beside the data).
EXPORT_FOLDER = "nbapp-exports"
#: Environment of a served page's kernel (set by ``nbapp app``).
DATA_ROOT_ENV = "NBAPP_DATA_ROOT"
VISITOR_ENV = "NBAPP_VISITOR"
MODEL_DIRS_ENV = "NBAPP_MODEL_DIRS"
ROOT_MODELS_ENV = "NBAPP_DATA_ROOT_MODELS"

_VISITOR_ID = re.compile(r"[0-9a-f]{8,64}")
_NAME = re.compile(r"[A-Za-z0-9_. -]+")
_MAX_NAME = 120


def check_name(name: str, what: str = "file name") -> str:
    """``name`` stripped, if it is a plain file name: letters, digits, ``_ . -`` and spaces, no
    leading dot, at most 120 characters. Raises :class:`InputError` saying what is wrong.

    >>> check_name(" labels 2.tif ")
    'labels 2.tif'
    >>> check_name("../x.tif")
    Traceback (most recent call last):
    ...
    nbapp.errors.InputError: file name '../x.tif' has '/': use letters, digits, '_', '.', '-' and spaces
    """
    text = str(name).strip()
    if not text:
        raise InputError(f"give a {what}")
    bad = sorted({c for c in text if not _NAME.fullmatch(c)})
    if bad:
        shown = ", ".join(c if c.isprintable() else f"U+{ord(c):04X}" for c in bad)
        raise InputError(f"{what} {text!r} has '{shown}': use letters, digits, '_', '.', '-' "
                         "and spaces" if len(bad) == 1 else
                         f"{what} {text!r} has characters that are not allowed ({shown}): use "
                         "letters, digits, '_', '.', '-' and spaces")
    if text.startswith("."):
        raise InputError(f"{what} {text!r} starts with a dot (a hidden file): remove the dot")
    if len(text) > _MAX_NAME:
        raise InputError(f"{what} is {len(text)} characters long; use at most {_MAX_NAME}")
    return text


def _split(name: str) -> tuple[str, str]:
    for ext in (".ome.zarr", ".ome.tif", ".ome.tiff"):
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, ext = os.path.splitext(name)
    return stem, ext


def claim(path: str | os.PathLike, folder: bool = False, attempts: int = 1000) -> Path:
    """Create ``path`` exclusively (an empty file, or an empty folder with ``folder=True``) and
    return it; if the name is taken, the next free ``STEM-2.EXT``, ``STEM-3.EXT``, ... The
    caller writes its data over this placeholder (a rename onto it) or :func:`release` s it.

    Creation is atomic (``O_EXCL`` / ``mkdir``), so two writers never get the same name and no
    existing file or folder is replaced.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> [claim(d / "a.tif").name for _ in range(3)]
    ['a.tif', 'a-2.tif', 'a-3.tif']
    """
    path = Path(path)
    stem, ext = _split(path.name)
    made = _create_first((path if i == 1 else path.with_name(f"{stem}-{i}{ext}")
                          for i in range(1, attempts + 1)), folder)
    if made is None:
        raise InputError(f"{attempts} files named like {path.name!r} exist in "
                         f"{str(path.parent)!r}: choose another name")
    return made


def _create_first(candidates, folder: bool = False) -> Path | None:
    """Create the first of ``candidates`` that does not exist yet (atomically: ``O_EXCL`` or
    ``mkdir``) and return it; None when all exist."""
    for candidate in candidates:
        try:
            if folder:
                os.mkdir(candidate)
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(f"cannot create {str(candidate)!r}: {exc.strerror or exc}") from None
    return None


def reserve_numbered(folder: str | os.PathLike, prefix: str, ext: str,
                     attempts: int = 10000) -> Path:
    """Create ``folder/PREFIX<n>EXT`` exclusively for the smallest free n >= 1 and return it
    (an empty placeholder to write over): two callers at once get two names.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> [reserve_numbered(d, "tuned_", ".yaml").name for _ in range(2)]
    ['tuned_1.yaml', 'tuned_2.yaml']
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {str(folder)!r}: {exc.strerror or exc}") from None
    made = _create_first(folder / f"{prefix}{n}{ext}" for n in range(1, attempts + 1))
    if made is None:
        raise InputError(f"{attempts} files named {prefix}N{ext} exist in {str(folder)!r}")
    return made


def release(path: str | os.PathLike) -> None:
    """Remove a placeholder made by :func:`claim` if nothing was written into it."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()  # only when empty
        elif path.is_file() and path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass


@dataclass(frozen=True)
class Workspace:
    """One user's places to read, write and load models from.

    Parameters
    ----------
    root : path, optional
        The data root (reads are confined to it); None: a notebook without confinement.
    visitor : str, optional
        A served page's visitor id (hex, from the server); None: a notebook's owner.
    model_dirs : tuple of paths
        Folders of models the administrator offers (read-only to visitors).
    root_models : bool, optional
        Whether model files inside the data root may be loaded; default: yes for a notebook's
        owner, no for a visitor (unless the administrator says so).
    """

    root: Path | None = None
    visitor: str | None = None
    model_dirs: tuple = ()
    root_models: bool | None = None

    def __post_init__(self):
        if self.root_models is None:
            object.__setattr__(self, "root_models", self.visitor is None)
        if self.visitor is not None:
            if not _VISITOR_ID.fullmatch(str(self.visitor)):
                raise InputError(f"visitor id {self.visitor!r} is not a hex id")
            if self.root is None:
                raise InputError("a served page's workspace needs a data root")
        object.__setattr__(self, "root", None if self.root is None else Path(self.root))
        object.__setattr__(self, "model_dirs", tuple(Path(d) for d in self.model_dirs))

    @property
    def served(self) -> bool:
        """A visitor of a served page (untrusted), not a notebook's owner."""
        return self.visitor is not None

    @property
    def home(self) -> Path | None:
        """The visitor's own folder (None for a notebook's owner)."""
        return None if self.visitor is None else self.root / VISITORS_FOLDER / self.visitor

    @property
    def read_root(self) -> DataRoot | None:
        """What every read is confined to: the data root less other visitors' folders."""
        if self.root is None:
            return None
        return DataRoot(self.root, private=self.root / VISITORS_FOLDER, own=self.home)

    def _own(self, *parts: str) -> Path:
        folder = self.home.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def exports(self) -> Path:
        """The folder exports go to (made on first use)."""
        if self.served:
            return self._own("exports")
        folder = (self.root if self.root is not None else Path(".")) / EXPORT_FOLDER
        folder.mkdir(exist_ok=True)
        return folder

    def training(self, beside: str | os.PathLike | None = None) -> Path:
        """The training-set folder: the visitor's own, or ``nbapp-training/`` in the data root
        (else beside the data file ``beside``, else here). Not made here."""
        if self.served:
            return self.home / "training"
        base = self.root if self.root is not None else (
            Path(beside).parent if beside else Path("."))
        return Path(base) / TRAINING_FOLDER

    def export_target(self, text: str) -> Path:
        """Where an export named ``text`` goes (not yet claimed). A visitor gives a name, which
        goes into their exports folder; a notebook's owner may give a path (inside the data
        root, when there is one); a bare name goes into the exports folder."""
        text = str(text).strip()
        if not text:
            raise InputError("give a file name to export to")
        if self.served or ("/" not in text and os.sep not in text):
            return self.exports() / check_name(text)
        if self.root is None:
            return Path(text).expanduser()
        target = Path(text) if Path(text).is_absolute() else self.root / text
        # the folder is resolved (links followed) and must be in the root; the name is checked
        folder = confine(str(target.parent), self.read_root, "export folder")
        return folder / check_name(target.name)

    # -- models
    def model_choices(self) -> list[str]:
        """Model files this user may name (besides ``default`` and the zoo): own fine-tunes and
        the administrator's folders."""
        found = []
        folders = [*self.model_dirs]
        if self.served:
            folders.insert(0, self.training() / "models")
        for folder in folders:
            if folder.is_dir():
                found += sorted(str(p) for p in folder.iterdir()
                                if p.suffix.lower() in (".yaml", ".yml") and p.stat().st_size
                                and not p.name.startswith("."))
        return found

    def model_source(self, spec: str) -> tuple[str, object]:
        """``(spec, root)`` to hand to :func:`nbapp.load_model` for a model named in the page,
        or :class:`~nbapp.errors.ModelError` if this user may not load it.

        ``default`` and zoo names pass as they are; a name or path inside one of the trusted
        folders (the visitor's fine-tunes, then the administrator's folders) is loaded confined
        to that folder; a file in the data root only where :attr:`root_models` allows it.
        """
        from nbapp.models import zoo

        text = str(spec).strip()
        if text == "default" or zoo.find(text) is not None:
            return text, None
        folders = list(self.model_dirs)
        if self.served:
            folders.insert(0, self.training() / "models")
        for folder in folders:
            for candidate in (text, f"{text}.yaml"):
                path = Path(candidate)
                path = path if path.is_absolute() else folder / path
                try:
                    inside = confine(str(path), folder, "model")
                except InputError:
                    continue
                if inside.is_file():
                    return str(inside), folder
        if self.root_models:
            return text, self.read_root
        raise ModelError(
            f"model {text!r} is not one this server offers: load 'default', a model zoo name, "
            "one of your fine-tuned models (tuned_1, ...)"
            + (" or a model of the administrator's folder" if self.model_dirs else "")
            + "; model files in the data root are code and load only where the administrator "
              "allows it")


def from_environment(env: dict | None = None) -> Workspace:
    """The workspace ``nbapp app`` gives its page's kernel (see the module docstring); a
    notebook without those variables gets the owner's workspace with no data root."""
    env = os.environ if env is None else env
    root = env.get(DATA_ROOT_ENV) or None
    visitor = env.get(VISITOR_ENV) or None
    dirs = tuple(d for d in (env.get(MODEL_DIRS_ENV) or "").split(os.pathsep) if d)
    root_models = visitor is None or env.get(ROOT_MODELS_ENV) == "1"
    return Workspace(root=root, visitor=visitor, model_dirs=dirs, root_models=root_models)
