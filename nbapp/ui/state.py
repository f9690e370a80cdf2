"""The one observable state of the app (STYLE #13): views observe it, controls set it.

No widgets here. Values that flow into computations are immutable (params dataclasses,
:class:`DataSet`, :class:`Result2D`, job :class:`~nbapp.jobs.Snapshot`), so a worker thread can
hold them while the user moves on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import traitlets
from traitlets import Any, Bool, Dict, Float, HasTraits, Instance, Int, List, Unicode

from nbapp.jobs import Snapshot
from nbapp.params import SliceParams, VolumeParams

__all__ = ["AppState", "DataSet", "Result2D", "CompareResult", "KINDS"]

#: What the loaded data is: one 2D image, a stack of unrelated 2D images, or a 3D volume.
KINDS = ("image", "stack", "volume")


@dataclass(frozen=True, eq=False)
class DataSet:
    """A loaded image or volume and what is known about it.

    ``array`` is (H, W) for an image and (Z, Y, X) for a stack or volume; ``intensity`` is the
    one grey-value range used for every slice of a volume (as in a 3D job); ``voxel_size`` is
    (Z, Y, X) in nm when the file gives it.
    """

    array: np.ndarray
    name: str
    detected: str
    voxel_size: tuple | None = None
    intensity: tuple | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)


@dataclass(frozen=True, eq=False)
class Result2D:
    """One 2D result: labels of a slice, with the network outputs it came from."""

    image: np.ndarray
    labels: np.ndarray
    heads: object
    centres: np.ndarray
    count: int
    network_s: float
    postprocess_s: float
    cached: bool
    plane: str
    index: int
    params: SliceParams
    #: for a big slice (:mod:`nbapp.region`): the (y0, y1, x0, x1) segmented, the slice's
    #: (H, W) and a coarse overview of it (every ``overview_step``-th pixel); ``image``,
    #: ``labels`` and ``heads`` are then the region's
    region: tuple | None = None
    full_shape: tuple | None = None
    overview: np.ndarray | None = None
    overview_step: int = 1

    def crop(self, array):
        """``array`` of the whole slice cut to what this result covers (itself when whole)."""
        if array is None or self.region is None:
            return array
        y0, y1, x0, x1 = self.region
        return array[y0:y1, x0:x1]


@dataclass(frozen=True, eq=False)
class CompareResult:
    """One panel of "Compare downsampling": labels (or the error) at one factor, and F1@0.5
    against the ground truth where there is one."""

    downsampling: float
    image: np.ndarray
    labels: np.ndarray | None
    count: int
    network_s: float
    postprocess_s: float
    error: str | None = None
    f1: float | None = None


class AppState(HasTraits):
    """Everything the views show; set by the controls and by the session's workers (through
    :func:`nbapp.ui.threads.call_in_ui`)."""

    # data
    data = Instance(DataSet, allow_none=True)
    # model
    model_spec = Unicode("default")
    model = Any(None, allow_none=True)
    model_info = Dict()
    device = Unicode("cpu")
    devices = List(Unicode())
    quantized = Bool(False)  # use a zoo model's quantized CPU file
    download = Instance(Snapshot, default_value=Snapshot())  # the model download in progress
    # parameters
    slice_params = Instance(SliceParams, default_value=SliceParams())
    volume_params = Instance(VolumeParams, default_value=VolumeParams())
    # 2D view
    plane = Unicode("xy")
    index = Int(0)
    opacity = Float(0.5)
    viewer_inches = Float(5.5)  # side of the 2D viewer (grows for large screens and projectors)
    show_heads = Bool(False)
    result2d = Instance(Result2D, allow_none=True)
    busy2d = Bool(False)
    compare = List()
    batch_labels = Any(None, allow_none=True)
    box = Any(None, allow_none=True)  # (height, width) of the last drawn box, in pixels
    view = Any(None, allow_none=True)  # the 2D viewer's visible (y0, y1, x0, x1) of a big slice
    suggestion = Dict()  # min_size, min_extent, median_size (each optional), why
    # proofreading and fine-tuning
    edit_mode = traitlets.Enum(("view", "delete", "merge", "paint", "erase"), default_value="view")
    brush = Int(4)  # brush radius in pixels (paint, erase)
    edited = Any(None, allow_none=True)  # the visible slice's edited labels, or None
    training = Unicode("")  # what the training set holds
    tuning = Instance(Snapshot, default_value=Snapshot())  # the fine-tuning job
    tune_scores = Dict()  # before / after of the last fine-tuning
    # scores against ground truth (the demo's, or a label file the user loads)
    truth = Any(None, allow_none=True)  # labels of the same shape as the data, or None
    score2d = Dict()  # f1, pq, fg_iou of the visible slice's result
    score3d = Dict()  # the same for the last 3D result
    sweep = Dict()  # param, values, f1, pq of the last parameter sweep
    # 3D
    job = Instance(Snapshot, default_value=Snapshot())
    stacks = Dict()  # plane -> (Z, Y, X) labels of the last 3D job; lazy (zarr) when blockwise
    stack_objects = Dict()  # plane -> object count of lazy stacks (read from the job)
    labels3d = Any(None, allow_none=True)  # consensus (or single-plane) labels; lazy (zarr)
    # after a blockwise job
    job_output = Unicode("")  # where a blockwise job wrote its labels (OME-Zarr)
    blockwise = Bool(False)  # run the 3D job block by block (forced for data on disk)
    table = List()  # per-object rows of labels3d
    result_slice = Int(0)
    # messages
    status = Unicode("")
    status_level = traitlets.Enum(("info", "ok", "warning", "error"), default_value="info")
    messages = List(Unicode())

    def shown_labels(self):
        """The visible slice's labels as the viewer shows them: the user's edits when there are
        any, else the 2D result's; None without a result."""
        r = self.result2d
        if r is None:
            return None
        e = self.edited
        return e if e is not None and e.shape == r.labels.shape else r.labels

    def say(self, text: str, level: str = "info", detail: str | None = None) -> None:
        """Show ``text`` in the status line and append it (and ``detail``) to the log."""
        self.status_level = level
        self.status = text
        lines = [f"[{level}] {text}"] + ([detail.rstrip()] if detail else [])
        self.messages = [*self.messages, *lines][-500:]
