"""Downloading model files: pooch (cache, hash check, retries, atomic rename) with a
downloader that resumes an interrupted transfer, reports progress to tqdm or to a callback,
and can be cancelled from another thread.

The file appears under its final name only when it is complete and its hash matches; what an
interrupted or cancelled transfer left is kept as ``NAME.partial`` beside it and continued by
the next download (an HTTP Range request; a server that ignores it sends the whole file again).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import requests
import urllib3

from nbapp.errors import ModelError

__all__ = ["download", "DownloadCancelled", "Progress", "file_sha256"]

#: ``progress(done_bytes, total_bytes_or_None)``: called as bytes arrive.
Progress = Callable[[int, "int | None"], None]

CHUNK = 1 << 16


class DownloadCancelled(ModelError):
    """The download was cancelled; what arrived is kept and the next download resumes it."""


class _Broken(requests.exceptions.ConnectionError):
    """The connection broke mid-transfer: a network error, so pooch tries again (resuming)."""

    def __init__(self, done: int, total):
        super().__init__(f"the connection broke after {done} of {total or '?'} bytes "
                         "(what arrived is kept; the next try continues it)")


def _read(resp, done: int, total) -> bytes:
    """The bytes that have arrived (up to :data:`CHUNK`); a broken connection is :class:`_Broken`."""
    try:
        return resp.raw.read1(CHUNK)
    except (urllib3.exceptions.HTTPError, OSError):
        raise _Broken(done, total) from None


class _Resuming:
    """A pooch downloader: HTTP(S) GET into ``<target>.partial`` (continued with a Range
    request when it exists), then moved onto pooch's temporary file."""

    def __init__(self, partial: Path, progress, cancel: threading.Event | None, timeout: float):
        self.partial = partial
        self.progress = progress
        self.cancel = cancel
        self.timeout = timeout

    def __call__(self, url: str, output_file, pooch_obj=None, check_only: bool = False):
        if check_only:
            resp = requests.head(url, allow_redirects=True, timeout=self.timeout)
            return resp.status_code == 200
        have = self.partial.stat().st_size if self.partial.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, stream=True, timeout=self.timeout, headers=headers,
                          allow_redirects=True) as resp:
            if have and resp.status_code == 416:  # the partial file is already complete
                os.replace(self.partial, output_file)
                return
            resp.raise_for_status()
            resumed = have and resp.status_code == 206
            length = int(resp.headers.get("Content-Length") or 0) or None
            total = (have + length if resumed else length) if length else None
            done = have if resumed else 0
            bar = self._bar(total, done)
            try:
                with open(self.partial, "ab" if resumed else "wb") as out:
                    # read1: whatever has arrived, so an interrupted transfer keeps every byte
                    while chunk := _read(resp, done, total):
                        out.write(chunk)
                        done += len(chunk)
                        bar(done)
                        if self.cancel is not None and self.cancel.is_set():
                            raise DownloadCancelled(
                                f"download of {self.partial.name[:-len('.partial')]} cancelled "
                                f"after {done / 1e6:.1f} MB; starting it again resumes it")
            finally:
                bar(None)
        if total is not None and done < total:
            raise _Broken(done, total)
        os.replace(self.partial, output_file)

    def _bar(self, total, done):
        """A function taking the bytes done (None: finished) that drives the progress report."""
        if callable(self.progress):
            report = self.progress
            report(done, total)
            return lambda d: report(d, total) if d is not None else None
        if not self.progress:
            return lambda d: None
        from tqdm.auto import tqdm

        name = self.partial.name[:-len(".partial")]
        tq = tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=f"downloading {name}")
        last = [done]

        def update(d):
            if d is None:
                tq.close()
                return
            tq.update(d - last[0])
            last[0] = d

        return update


def download(url: str, target: str | os.PathLike, sha256: str | None = None,
             progress: bool | Progress = True, cancel: threading.Event | None = None,
             retries: int = 2, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``target`` once; return ``target``.

    An existing ``target`` is used as it is when ``sha256`` is None or matches; with a
    ``sha256`` that does not match it is refused (delete the file to download it again).

    Parameters
    ----------
    url : str
        http(s) URL.
    target : path
        Final file; its folder is created.
    sha256 : str, optional
        Expected SHA-256 (hex) of the file; checked before the file gets its final name.
    progress : bool or callable
        True: a tqdm bar on stderr; a callable gets ``(done_bytes, total_bytes_or_None)``.
    cancel : threading.Event, optional
        Set it to stop the transfer (raises :class:`DownloadCancelled`; the next call resumes).
    retries : int
        Further attempts after a network error or a hash mismatch.

    Raises
    ------
    ModelError
        The server cannot be reached, answers with an error, or the hash does not match
        (with the URL and what to do in the message); :class:`DownloadCancelled` on cancel.
    """
    import pooch

    pooch.get_logger().setLevel("WARNING")  # the progress bar says what is downloaded
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    known = f"sha256:{sha256.lower()}" if sha256 else None
    store = pooch.create(path=target.parent, base_url="", registry={target.name: known},
                         urls={target.name: url}, retry_if_failed=retries, allow_updates=False)
    downloader = _Resuming(partial, progress, cancel, timeout)
    try:
        return Path(store.fetch(target.name, downloader=downloader))
    except DownloadCancelled:
        raise
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise ModelError(f"cannot download {url}: the server answered HTTP {code}; check the URL "
                         f"(or $NBAPP_MODEL_MIRROR), or put the file at {target} by hand") from None
    except requests.exceptions.RequestException as exc:
        if isinstance(exc, _Broken):
            raise ModelError(f"cannot download {url}: {exc}") from None
        reason = type(exc).__name__
        raise ModelError(f"cannot download {url} ({reason}: no network?): download it by hand "
                         f"and put it at {target}") from None
    except ValueError as exc:  # pooch: hash mismatch, or an existing file with the wrong hash
        text = str(exc)
        if "hash" in text.lower() or "update" in text.lower():
            got = file_sha256(target) if target.is_file() else None
            where = (f"the file at {target} has SHA-256 {got}" if got
                     else f"the downloaded file's SHA-256 differs ({text.splitlines()[0]})")
            raise ModelError(f"{target.name}: {where}, expected {sha256}; the download is corrupt "
                             f"or the file changed upstream: delete {target} to download it again"
                             ) from None
        raise


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
