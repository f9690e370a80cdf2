"""The model zoo: named models (nbapp's bundled default and empanada-napari's registry) that
download once into the cache and then work offline.

The facts live in ``zoo.yaml`` beside this module. A name with ``_quantized`` appended (for
example ``MitoNet_v1_quantized``) is the model's quantized CPU file. ``$NBAPP_MODEL_MIRROR``
points every download at a facility's copy: ``$NBAPP_MODEL_MIRROR/<file name>``.
"""

from __future__ import annotations

import functools
import os
import threading
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from nbapp.errors import ModelError
from nbapp.models.config import (MIRROR_ENV, ModelConfig, cache_dir, confine_model_path,
                                 is_url)

__all__ = ["ZooModel", "zoo", "find", "model_path", "download_url", "fetch_model", "QUANTIZED",
           "zoo_listing", "trusted_url", "trusted_prefixes", "confine_config"]

QUANTIZED = "_quantized"


@dataclass(frozen=True)
class ZooModel:
    """One named model of the zoo (one file: the full model or its quantized variant)."""

    name: str
    base: str
    quantized: bool
    size_mb: float | None
    config: ModelConfig  # its url (``model``), sha256 and pixel_size_nm
    pixel_size_note: str
    architecture: str
    licence: str
    citation: str
    bundled: bool = False

    @property
    def url(self) -> str | None:
        """Where the file is published (None for the bundled model)."""
        return None if self.bundled else self.config.model

    @property
    def sha256(self) -> str | None:
        return self.config.sha256

    @property
    def pixel_size_nm(self) -> float | None:
        return self.config.pixel_size_nm

    @property
    def file_name(self) -> str:
        """The file name of the download (the URL's last path part)."""
        return Path(urllib.parse.unquote(urllib.parse.urlparse(self.url).path)).name

    def to_dict(self) -> dict:
        path = None if self.bundled else model_path(self.name)
        return {
            "name": self.name,
            "model": self.base,
            "quantized": self.quantized,
            "classes": [self.config.class_names[c] for c in self.config.labels],
            "thing_classes": [self.config.class_names[c] for c in self.config.thing_list],
            "padding_factor": self.config.padding_factor,
            "norms": {"mean": self.config.norms[0], "std": self.config.norms[1]},
            "pixel_size_nm": self.pixel_size_nm,
            "pixel_size_note": self.pixel_size_note,
            "architecture": self.architecture,
            "licence": self.licence,
            "citation": self.citation,
            "url": self.url,
            "download_url": None if self.bundled else download_url(self),
            "sha256": self.sha256,
            "size_mb": self.size_mb,
            "bundled": self.bundled,
            "path": str(path) if path else None,
            "downloaded": self.bundled or bool(path and path.is_file()),
        }


@functools.lru_cache(maxsize=1)
def _raw() -> dict:
    return yaml.safe_load(resources.files("nbapp.models").joinpath("zoo.yaml").read_text())


def _entry(name: str, raw: dict, quantized: bool) -> ZooModel:
    if raw.get("bundled"):
        from nbapp.models.config import default_config_path, read_config

        cfg = read_config(default_config_path())  # its pixel_size_nm included
        return ZooModel(name, name, False, None, cfg,
                        " ".join(str(raw.get("pixel_size_note", "")).split()),
                        raw.get("architecture", ""), raw.get("licence", ""),
                        " ".join(str(raw.get("citation", "")).split()), bundled=True)
    url = raw["quantized_url"] if quantized else raw["url"]
    full = name + QUANTIZED if quantized else name
    cfg = ModelConfig(
        name=full,
        class_names={int(k): str(v) for k, v in raw["class_names"].items()},
        labels=tuple(int(v) for v in raw["labels"]),
        thing_list=tuple(int(v) for v in raw["thing_list"]),
        model=url,
        padding_factor=int(raw["padding_factor"]),
        norms=(float(raw["norms"]["mean"]), float(raw["norms"]["std"])),
        description=" ".join(str(raw.get("description", "")).split()),
        sha256=raw.get("quantized_sha256" if quantized else "sha256"),
        pixel_size_nm=raw.get("pixel_size_nm"),
    )
    return ZooModel(full, name, quantized, raw.get("size_mb"), cfg,
                    " ".join(str(raw.get("pixel_size_note", "")).split()),
                    raw.get("architecture", ""), raw.get("licence", ""),
                    " ".join(str(raw.get("citation", "")).split()))


@functools.lru_cache(maxsize=1)
def zoo() -> dict[str, ZooModel]:
    """Every named model, quantized variants included, in the zoo file's order."""
    out = {}
    for name, raw in _raw().items():
        out[name] = _entry(name, raw, False)
        if raw.get("quantized_url"):
            out[name + QUANTIZED] = _entry(name, raw, True)
    return out


def find(name: str, quantized: bool = False) -> ZooModel | None:
    """The zoo model called ``name`` (its quantized variant with ``quantized``), or None."""
    models = zoo()
    if name not in models:
        return None
    entry = models[name]
    if quantized and not entry.quantized:
        if entry.bundled:
            raise ModelError(f"model {name!r} has no quantized variant; drop --quantized")
        q = models.get(name + QUANTIZED)
        if q is None:
            raise ModelError(f"model {name!r} has no quantized variant in the zoo; drop --quantized")
        return q
    return entry


def model_path(name: str) -> Path:
    """Where the zoo model's file lives once downloaded (put it there by hand when offline)."""
    entry = zoo()[name]
    return cache_dir() / "models" / entry.file_name


def download_url(entry: ZooModel) -> str:
    """The URL a download uses: the zoo's, or ``$NBAPP_MODEL_MIRROR/<file name>``."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(entry.file_name)
    return entry.url


def fetch_model(entry: ZooModel, progress=True, cancel: threading.Event | None = None,
                retries: int = 2) -> Path:
    """The local file of a zoo model, downloaded once (see :func:`nbapp.models.download.download`).

    Offline without the file, the error names the URL and where to put the file by hand.
    """
    from nbapp.models.download import DownloadCancelled, download

    target = model_path(entry.name)
    if target.is_file() and entry.sha256 is None:
        return target
    url = download_url(entry)
    try:
        return download(url, target, entry.sha256, progress=progress, cancel=cancel,
                        retries=retries)
    except DownloadCancelled:
        raise
    except ModelError as exc:
        raise ModelError(f"model {entry.name}: {exc} (`nbapp models --path {entry.name}` "
                         "prints where the file goes)") from None


def zoo_listing() -> list[dict]:
    """``nbapp models --json``: every zoo model as a dict."""
    return [m.to_dict() for m in zoo().values()]


# -- where a confined page may download models from

def trusted_url(url: str) -> bool:
    """True for a URL a confined page may make the server download: one under
    :func:`trusted_prefixes` (the zoo's download folders and the mirror).

    >>> trusted_url("https://zenodo.org/record/6861565/files/MitoNet_v1.pth?download=1")
    True
    >>> trusted_url("http://127.0.0.1:8000/x.pth"), trusted_url("file:///etc/passwd")
    (False, False)
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or ".." in parsed.path.split("/"):
        return False
    return any(url.startswith(p) for p in trusted_prefixes())


def trusted_prefixes() -> list[str]:
    """Where models may be downloaded from when loading is confined to a data root (the app):
    the folders of the zoo's download URLs (``zoo.yaml``: the empanada registry's records) and
    the mirror named by ``$NBAPP_MODEL_MIRROR``."""
    prefixes = sorted({m.url.rsplit("/", 1)[0] + "/" for m in zoo().values() if m.url})
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        prefixes.append(mirror.rstrip("/") + "/")
    return prefixes


def confine_config(config: "ModelConfig", root) -> None:
    """Refuse a config that names weights outside ``root``: local files must resolve inside
    it, URLs must be :func:`trusted_url` (no ``file://``, no other server)."""
    where = Path(config.config_path).name if config.config_path else config.name
    for key in ("model", "model_quantized"):
        location = getattr(config, key)
        if not location:
            continue
        if is_url(location):
            if not trusted_url(location):
                raise ModelError(f"model config {where}: {key} {location!r} is not a known model "
                                 f"download; inside the data root a config may name files in "
                                 f"the root or the model zoo's URLs (or ${MIRROR_ENV})")
            continue
        confine_model_path(location, root, f"model config {where}: {key}")
