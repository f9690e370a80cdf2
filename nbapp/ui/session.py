"""What the app does, without widgets: load data and models, exports, lifetime; with the 2D
actions (:mod:`nbapp.ui.session2d`) and the 3D ones (:mod:`nbapp.ui.session3d`) as its
bases. It reads and writes :class:`~nbapp.ui.state.AppState`;
results of worker threads reach the state only through :func:`nbapp.ui.threads.call_in_ui`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import traceback
from pathlib import Path

import numpy as np

from nbapp.objects import write_table
from nbapp.errors import InputError, NbappError
from nbapp.intensity import intensity_range
from nbapp.jobs import JobMarker, JobRunner, JobState
from nbapp.ui.state import AppState, DataSet
from nbapp.ui.session2d import COMPARE_FACTORS, SliceActions
from nbapp.ui.session3d import EXPORT_FOLDER, VolumeActions
from nbapp.ui.session_tune import TuneActions
from nbapp.ui.threads import LatestRunner, call_in_ui
from nbapp.workspace import Workspace, claim, release

__all__ = ["Session", "detect_kind", "available_device_names", "describe_error",
           "COMPARE_FACTORS", "ALL_GPUS", "EXPORT_FOLDER"]

#: Device choice that runs 3D jobs on every CUDA device (2D uses the first).
ALL_GPUS = "all GPUs"
UPLOAD_FORMATS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".mrc", ".map", ".rec",
                  ".h5", ".hdf5")
#: Uploads go to a private folder named for this process, removed when the session closes or
#: the process exits; one left by a killed kernel is removed by the next session.
UPLOAD_PREFIX = "nbapp-upload-"


def remove_stale_uploads(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the upload folders of app processes that are gone (a kernel killed before it
    could clean up); returns them. Folders of live processes are left alone."""
    from nbapp.io import pid_alive

    base = Path(folder or tempfile.gettempdir())
    removed = []
    for p in base.glob(f"{UPLOAD_PREFIX}*"):
        pid = p.name[len(UPLOAD_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------- pure helpers

def detect_kind(shape: tuple, voxel_size=None) -> str:
    """Guess what an array is: ``image`` (2D), ``stack`` (few unrelated 2D images) or ``volume``.

    >>> detect_kind((64, 64)), detect_kind((3, 64, 64)), detect_kind((40, 64, 64))
    ('image', 'stack', 'volume')
    """
    if len(shape) == 2:
        return "image"
    if len(shape) != 3:
        raise InputError(f"expected a 2D image or a 3D stack / volume, got shape {tuple(shape)}")
    if voxel_size is None and shape[0] < 8:
        return "stack"
    return "volume"


def available_device_names() -> list[str]:
    """The device choices of the app: every device, and "all GPUs" when there are several."""
    from nbapp.models import device_names, gpu_devices

    names, gpus = device_names(), gpu_devices()
    if len(gpus) > 1:
        names.insert(1 + len(gpus), ALL_GPUS)  # after the GPUs themselves
    return names


def describe_error(exc: BaseException) -> tuple[str, str | None]:
    """(one line for the status, traceback for the log or None) for an exception."""
    from nbapp.memory import is_out_of_memory, out_of_memory_message

    if is_out_of_memory(exc):
        return out_of_memory_message(exc), None
    if isinstance(exc, NbappError):
        return str(exc), None
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"{type(exc).__name__}: {exc}", tb


# ---------------------------------------------------------------- the session

class Session(SliceActions, VolumeActions, TuneActions):
    """The app's actions on one :class:`AppState`: data, model, exports and lifetime here; the
    2D tab's in :class:`~nbapp.ui.session2d.SliceActions`, the 3D tab's in
    :class:`~nbapp.ui.session3d.VolumeActions`, proofreading and fine-tuning in
    :class:`~nbapp.ui.session_tune.TuneActions`.

    Parameters
    ----------
    state : AppState
    data_root : path, optional
        Paths typed by the user must stay inside it; exports go there (a notebook's owner).
    workspace : Workspace, optional
        Where this user reads, writes and loads models from (a served page's visitor:
        :func:`nbapp.workspace.from_environment`); default: the owner's, on ``data_root``.
    upload_limit_mb : float
        Largest accepted upload.
    synchronous : bool
        Run 2D requests and 3D jobs in the caller's thread (tests, scripts).
    debounce_s : float
        Slider requests closer than this are coalesced (threaded mode).
    """

    def __init__(self, state: AppState, data_root=None, upload_limit_mb: float = 200.0,
                 synchronous: bool = False, debounce_s: float = 0.025,
                 workspace: Workspace | None = None):
        self.state = state
        self.workspace = workspace if workspace is not None else Workspace(root=data_root)
        self.data_root = self.workspace.root
        self.read_root = self.workspace.read_root  # the data root less others' folders
        self.upload_limit_mb = float(upload_limit_mb)
        self.synchronous = synchronous
        self.runner2d = LatestRunner(debounce_s=debounce_s, synchronous=synchronous)
        self.jobs = JobRunner(on_update=self._job_update, synchronous=synchronous)
        self.downloads = JobRunner(on_update=lambda snap: call_in_ui(lambda: self._downloaded(snap)),
                                   synchronous=synchronous)
        self._pending_load: tuple | None = None  # (spec, device) to load once downloaded
        self.tuning = JobRunner(on_update=self._tuned, synchronous=synchronous)
        self._editors: dict = {}  # proofreading edits per (data, plane, index)
        self._merge_from: tuple | None = None  # the first click of a merge
        self.segmenter = None
        self._engines: dict = {}
        self._upload_dir: str | None = None
        remove_stale_uploads()
        self._job_devices: list[str] | None = None  # None: the model's device
        # blocks of a block-by-block 3D job (None: $NBAPP_BLOCK_SIZE, else from the memory left)
        self.block_params = None
        self._marker: JobMarker | None = None  # served app: tells the server a job runs
        self._error_2d = False  # the status line shows a 2D inference error
        self._quiet = False  # set while several state changes make one 2D request
        self._overview_cache = None  # (slice key, overview) of the big slice shown last
        state.observe(self._params_changed, names=["slice_params", "plane", "index"])
        state.observe(self._view_moved, names=["view"])
        state.observe(self.score_2d, names=["edited"])  # the score is of what is shown
        # a merge's first pick belongs to one slice, tool and model (issue 30 item 1)
        state.observe(self.clear_merge_pick, names=["edit_mode", "plane", "index", "data", "model"])

    # -- errors
    def report(self, exc: BaseException, what: str = "") -> None:
        line, tb = describe_error(exc)
        self.state.say(f"{what}: {line}" if what else line, "error", tb)

    # -- data
    def set_volume(self, array, name: str = "array", voxel_size=None, meta: dict | None = None) -> None:
        """Use ``array`` (2D image or 3D stack / volume) as the data. With ``meta["lazy"]``
        a volume stays on disk (read slice by slice; 3D jobs run block by block)."""
        lazy = bool((meta or {}).get("lazy"))
        try:
            arr = np.asarray(array) if not hasattr(array, "shape") else array
            kind = detect_kind(tuple(arr.shape), voxel_size)
            if not hasattr(arr, "dtype") or arr.dtype == bool or np.iscomplexobj(arr):
                raise InputError(f"{name}: cannot segment data of dtype {getattr(arr, 'dtype', '?')}")
            if lazy and kind != "volume":
                raise InputError(f"{name} is too large to load and is not a volume "
                                 f"({'x'.join(map(str, arr.shape))}): crop it")
            arr = arr if lazy else np.asarray(arr)
            if kind == "volume":
                from nbapp.volume import volume_intensity

                intensity = volume_intensity(arr)
            else:
                intensity = intensity_range(arr)
        except Exception as exc:  # noqa: BLE001 - every load problem reaches the status area
            self.report(exc, f"cannot use {name}")
            return
        st = self.state
        ds = DataSet(arr, name, kind, tuple(voxel_size) if voxel_size else None, intensity,
                     dict(meta or {}))
        self._quiet = True
        try:
            self._reset_for(ds, kind)
        finally:
            self._quiet = False
        vs = f", voxel size {'x'.join(f'{v:g}' for v in ds.voxel_size)} nm" if ds.voxel_size else ""
        how = (" (larger than memory: read from disk slice by slice; the 3D job runs block by "
               "block)") if lazy else ""
        why = (f" (fewer than 8 slices and no voxel size: taken as {arr.shape[0]} separate 2D "
               "images, each segmented on its own (Batch mode), so the other planes are off; "
               "untick Batch mode in the 2D tab to treat it as a volume)"
               if kind == "stack" else "")
        st.say(f"loaded {name}: {kind} {'x'.join(map(str, arr.shape))} {arr.dtype}{vs}{how}{why}",
               "ok")
        self.request_2d()

    def _reset_for(self, ds: DataSet, kind: str) -> None:
        st, arr = self.state, ds.array
        with st.hold_trait_notifications():
            st.data = ds
            st.truth = None
            st.score2d = {}
            st.score3d = {}
            st.sweep = {}
            st.view = None
            st.result2d = None
            st.compare = []
            st.batch_labels = None
            st.stacks = {}
            st.labels3d = None
            st.job_output = ""
            st.table = []
            st.plane = "xy"
            st.index = arr.shape[0] // 2 if kind != "image" else 0
            st.result_slice = arr.shape[0] // 2 if arr.ndim == 3 else 0
            st.slice_params = st.slice_params.replace(batch_mode=kind == "stack")
        self.suggest_from_voxel_size()

    def load_path(self, path: str) -> None:
        """Read a file typed in the path box (restricted to the data root in Voila mode)."""
        from nbapp.io import read_image, source_file

        try:
            text = str(path).strip()
            if not text:
                raise InputError("no path given: type a file name (inside the data root)")
            arr, meta = read_image(text, lazy=True, root=self.read_root)
            size = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize
            if len(arr.shape) == 3 and size > self.lazy_above_bytes() and \
                    not isinstance(arr, np.ndarray):  # (a NumPy memmap is read in one go below)
                meta = {**meta, "lazy": True, "source": text}
            else:
                arr, meta = read_image(text, root=self.read_root)
        except Exception as exc:  # noqa: BLE001
            self.report(exc, "cannot load")
            return
        self.set_volume(arr, Path(source_file(text)).name, meta.get("voxel_size"), meta)

    def lazy_above_bytes(self) -> int:
        """Volumes larger than this stay on disk: ``$NBAPP_LAZY_ABOVE_MB``, else a quarter of
        the memory this kernel has left (the rest is for a job's labels)."""
        env = os.environ.get("NBAPP_LAZY_ABOVE_MB")
        if env:
            return int(float(env) * 1e6)
        from nbapp.memory import available_bytes

        return available_bytes() // 4

    def load_upload(self, name: str, content: bytes, size: int | None = None) -> None:
        """Read an uploaded file (size-limited; written to a private temporary folder)."""
        from nbapp.io import read_image

        target = None
        try:
            # the bytes received count, not the size the browser claims (``size`` is ignored)
            received = memoryview(content).nbytes
            if received > self.upload_limit_mb * 1e6:
                raise InputError(f"upload {name!r} is {received / 1e6:.1f} MB, over the limit of "
                                 f"{self.upload_limit_mb:g} MB: put the file in the data folder "
                                 "and give its path instead")
            base = Path(str(name).replace("\\", "/")).name
            ext = Path(base).suffix.lower()
            if ext not in UPLOAD_FORMATS or base.startswith("."):
                raise InputError(f"cannot read upload {base!r}: use one of {', '.join(UPLOAD_FORMATS)}")
            if self._upload_dir is None:  # (dead kernels' folders went at start-up)
                self._upload_dir = tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-")
                atexit.register(shutil.rmtree, self._upload_dir, True)  # the kernel's exit
            target = Path(self._upload_dir) / base
            target.write_bytes(content)
            # confined to the upload folder: an HDF5 upload cannot pull in files of the server
            arr, meta = read_image(target, root=self._upload_dir)
        except Exception as exc:  # noqa: BLE001
            self.report(exc, "upload failed")
            return
        finally:
            if target is not None:
                target.unlink(missing_ok=True)  # read into memory: the copy on disk is not needed
        self.set_volume(arr, base, meta.get("voxel_size"), meta)

    def load_demo(self, shape=None, n_mito=None) -> None:
        from nbapp.samples import DEMO_VOXEL_NM, demo_volume

        kw = {k: v for k, v in (("shape", shape), ("n_mito", n_mito)) if v is not None}
        img, truth = demo_volume(**kw)
        self.set_volume(img, "demo volume", DEMO_VOXEL_NM, {"format": "synthetic"})
        self.state.truth = truth  # the demo's ground truth: live scores in both tabs
        self.score_2d()

    def load_truth(self, path: str) -> bool:
        """Load ground-truth labels (same shape as the data) for live scores."""
        from nbapp.io import read_image

        st = self.state
        if st.data is None:
            st.say("load data first, then its ground truth", "warning")
            return False
        try:
            arr = np.asarray(read_image(str(path).strip(), root=self.read_root)[0])
            if arr.shape != st.data.shape:
                raise InputError(f"ground truth of shape {arr.shape} does not match the data's "
                                 f"{st.data.shape}")
            if not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"ground truth must hold integer labels (0 background), got "
                                 f"{arr.dtype}")
        except NbappError as exc:
            self.report(exc, "cannot load the ground truth")
            return False
        from nbapp.metrics import count_objects, per_slice_truth

        st.truth = arr
        self.score_2d()
        why = per_slice_truth(arr)
        if why is None:
            st.say(f"ground truth loaded ({count_objects(arr)} objects): scores show in the 2D "
                   "and 3D tabs", "ok")
        else:  # count what will be scored (ids that restart per slice are not 3D objects)
            st.say(f"ground truth loaded: {count_objects(arr, True)} objects in {len(arr)} "
                   f"slices, per-slice labels ({why}): the 3D tab scores slice by slice",
                   "ok")
        return True

    # -- model
    def load_model(self, spec=None, device: str | None = None) -> bool:
        """Load a model (``default``, a zoo name, a YAML config, a TorchScript file or a Model);
        True if it is loaded now. A zoo model that is not downloaded yet is downloaded in the
        background first (``state.download`` shows the progress; :meth:`cancel_download`
        stops it) and then loaded; False meanwhile."""
        from nbapp.inference import SliceSegmenter
        from nbapp.models import load_model, zoo

        st = self.state
        spec = st.model_spec if spec is None else spec
        device = device or st.device or "cpu"
        all_gpus = device == ALL_GPUS
        if isinstance(spec, str):
            try:
                entry = zoo.find(spec.strip(), st.quantized)
            except Exception as exc:  # noqa: BLE001
                self.report(exc, "cannot load the model")
                return False
            if entry is not None and not entry.bundled:
                spec = entry.name
                if not zoo.model_path(entry.name).is_file():
                    return self._download(entry, device)
        try:
            if all_gpus:
                from nbapp.models import gpu_devices

                self._job_devices = gpu_devices()
                device = self._job_devices[0] if self._job_devices else "cpu"
            else:
                self._job_devices = None
            root = None  # a Model object passed in (a fine-tune) is already checked
            if isinstance(spec, (str, os.PathLike)):
                spec, root = self.workspace.model_source(str(spec).strip())
            model = load_model(spec, device=device, root=root)
            seg = SliceSegmenter(model)
        except Exception as exc:  # noqa: BLE001
            self.report(exc, "cannot load the model")
            if st.model is not None:  # say what the tabs still use
                st.status = (f"{st.status} ({st.model_info.get('name', 'the model')} loaded "
                             "before stays active)")
            return False
        self.segmenter = seg
        self._engines = {}
        info = model.info()
        with st.hold_trait_notifications():
            st.model = model
            st.model_info = info
            st.device = ALL_GPUS if all_gpus else str(model.device)
            st.result2d = None
            st.compare = []
            st.sweep = {}  # measured with the model before
        self.suggest_scale()
        st.say(f"model {info.get('name')!r} loaded on {model.device} "
               f"({info.get('parameters', 0):,} parameters)", "ok")
        self.request_2d()
        return True

    def use_model(self, model) -> bool:
        """Make an already loaded :class:`~nbapp.models.Model` the active one (a tuned model)."""
        self.state.model_spec = str(model.config.config_path or model.config.name)
        return self.load_model(model, str(model.device))

    def _download(self, entry, device) -> bool:
        """Start downloading a zoo model; it is loaded when the download ends."""
        from nbapp.jobs import JobBusyError, callback_steps
        from nbapp.models import zoo

        def job():
            return (yield from callback_steps(
                lambda report, cancel: zoo.fetch_model(entry, progress=report, cancel=cancel),
                "download"))

        if self.downloads.busy:
            self.state.say("a model is downloading: wait for it or cancel it first", "warning")
            return False
        self.state.say(f"downloading {entry.name} from {zoo.download_url(entry)} (once; it is "
                       f"kept in {zoo.model_path(entry.name).parent})", "info")
        self._pending_load = (entry.name, device)
        try:
            self.downloads.submit(job, name=entry.name)
        except JobBusyError:
            self._pending_load = None
            self.state.say("a model is downloading: wait for it or cancel it first", "warning")
        return False

    def cancel_download(self) -> None:
        """Stop the model download (what arrived is kept: loading the model again resumes it)."""
        self.downloads.cancel()

    def _downloaded(self, snap) -> None:
        st = self.state
        st.download = snap
        if not snap.finished or self._pending_load is None:
            return
        spec, device = self._pending_load
        self._pending_load = None
        if snap.state == JobState.DONE:
            self.load_model(spec, device)
        elif snap.state == JobState.CANCELLED:
            st.say(f"download of {spec} cancelled; Load model again continues it", "warning")
        else:
            st.say(f"cannot load the model: {snap.error}", "error")

    # -- export
    def _export_target(self, path: str) -> Path:
        """Where an export named ``path`` goes (:meth:`Workspace.export_target`), not claimed."""
        return self.workspace.export_target(path)

    def _write_new(self, path: str, write, folder: bool = False) -> Path:
        """Create the export ``path`` exclusively (a taken name gets the next free one, so no
        file is replaced) and ``write(target)`` it; a failed write leaves nothing."""
        target = claim(self._export_target(path), folder=folder)
        try:
            return write(target)
        except BaseException:
            release(target)
            raise

    def current_labels(self) -> tuple[np.ndarray | None, str]:
        """What an export writes, and what it is: the 3D result, the batch's labels, or the
        visible slice as the viewer shows it (the user's edits included)."""
        st = self.state
        if st.labels3d is not None:
            return st.labels3d, "the 3D result"
        if st.batch_labels is not None:
            return st.batch_labels, "the batch's labels"
        r = st.result2d
        if r is None:
            return None, ""
        shown = st.shown_labels()
        what = f"{r.plane} slice {r.index} only" + (
            " with your edits" if shown is not r.labels else "")
        if st.data is not None and st.data.array.ndim == 3:
            what += " (run the 3D job, or Run batch, to export every slice)"
        return shown, what

    def export_labels(self, path: str) -> Path | None:
        from nbapp.io import write_labels

        try:
            labels, what = self.current_labels()
            if labels is None:
                raise InputError("nothing to export yet: segment a slice or run a 3D job")
            zarr = str(path).strip().lower().endswith(".zarr")
            if not isinstance(labels, np.ndarray) and not zarr:
                raise InputError(f"the labels of a blockwise job are larger than memory (already "
                                 f"saved in {self.state.job_output}): export to NAME.zarr")
            target = self._write_new(path, lambda t: write_labels(t, labels), folder=zarr)
        except Exception as exc:  # noqa: BLE001
            self.report(exc, "export failed")
            return None
        self.state.say(f"labels of {what} written to {target}", "ok")
        return target

    def export_table(self, path: str) -> Path | None:
        st = self.state
        try:
            if not st.table:
                raise InputError("no object table yet: run a 3D job first")
            target = self._write_new(path, lambda t: write_table(t, st.table))
        except Exception as exc:  # noqa: BLE001
            self.report(exc, "table export failed")
            return None
        st.say(f"table ({len(st.table)} objects) written to {target}", "ok")
        return target

    # -- lifetime
    def close(self) -> None:
        self.jobs.shutdown()
        self.downloads.shutdown()
        self.tuning.shutdown()
        self._end_marker()
        self.runner2d.shutdown()
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)
            self._upload_dir = None

