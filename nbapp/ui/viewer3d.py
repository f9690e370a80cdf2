"""3D results: the xy / xz / yz stacks and the consensus side by side at one slice, a 3D view of
the labels (an ipyvolume ``Figure`` widget, shown directly), and the per-object table."""

from __future__ import annotations

import html

import numpy as np
import ipywidgets as W
from matplotlib.colors import to_hex

from nbapp.params import PLANES
from nbapp.ui.state import AppState
from nbapp.ui.figures import figure_widget, label_cmap, label_display, setup_image_axes, show_image

__all__ = ["StacksView", "LabelsView3D", "ObjectTable", "object_meshes", "equal_aspect_limits",
           "view_from"]

PANELS = (*PLANES, "consensus")


class StacksView:
    """Four small panels (xy, xz, yz stacks and the consensus) at a shared z slice."""

    def __init__(self, state: AppState):
        self.state = state
        self.figure = figure_widget((10, 2.9), toolbar=False)
        self.axes = list(self.figure.subplots(1, len(PANELS)))
        cmap = label_cmap()
        self.panels = [setup_image_axes(ax, cmap=cmap, opacity=0.6) for ax in self.axes]
        for ax, name in zip(self.axes, PANELS):
            ax.set_title(f"{name}: -", fontsize=9)
        self.figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.9, wspace=0.05)
        self.canvas = self.figure.canvas
        # the label column and width of the 3D tab's sliders above it (controls._LABEL_COLUMN)
        self.slider = W.IntSlider(0, min=0, max=0, description="Result slice (z)",
                                  continuous_update=True, style={"description_width": "250px"},
                                  layout=W.Layout(width="480px"))
        W.link((self.slider, "value"), (state, "result_slice"))
        self.widget = W.VBox([self.slider, self.canvas])
        # shown once there is a result: four black panels titled "-" looked broken
        self.widget.layout.display = "none"
        state.observe(self._update, names=["stacks", "labels3d", "result_slice", "data"])

    def _update(self, change=None) -> None:
        st = self.state
        vols = [st.stacks.get(p) for p in PLANES] + [st.labels3d]
        shape = next((v.shape for v in vols if v is not None), None)
        self.widget.layout.display = None if shape is not None else "none"
        if shape is None:
            return
        self.slider.max = shape[0] - 1
        z = min(max(st.result_slice, 0), shape[0] - 1)
        img = None
        if st.data is not None and st.data.array.ndim == 3 and st.data.shape == tuple(shape):
            img = np.asarray(st.data.array[z], np.float32)
        for (base, over), ax, name, v in zip(self.panels, self.axes, PANELS, vols):
            show_image(base, img if img is not None else np.zeros(shape[1:], np.float32),
                  (float(img.min()), float(img.max()) + 1e-6) if img is not None else (0, 1))
            if v is None:
                show_image(over, np.zeros(shape[1:], np.uint8))
                ax.set_title(f"{name}: -", fontsize=9)
            else:
                show_image(over, label_display(np.asarray(v[z])))
                # labels on disk: the job counted them
                n = int(np.count_nonzero(np.unique(v))) if isinstance(v, np.ndarray) \
                    else len(st.table) if v is st.labels3d else st.stack_objects.get(name, "?")
                ax.set_title(f"{name}: {n} objects", fontsize=9)
        self.canvas.draw_idle()


_PAD = 2  # voxels of background around each object, so the blurred surface stays closed
_SMOOTH_SIGMA = 1.0  # blur of each object's mask before marching cubes, in (downsampled) voxels


def object_meshes(labels: np.ndarray, voxel_size=None, max_objects: int = 64,
                  max_side: int = 96, factor: int = 1) -> list[dict]:
    """Surfaces of the largest objects of a (Z, Y, X) label volume (marching cubes on a
    downsampled copy): dicts with id, x, y, z (vertex coordinates in voxels of the original,
    scaled by the voxel size) and triangles. ``factor``: ``labels`` is already a level
    downsampled by that much (of labels larger than memory)."""
    from skimage.measure import marching_cubes

    labels = np.asarray(labels)
    step = max(1, int(np.ceil(max(labels.shape) / max_side)))
    small = labels[::step, ::step, ::step]
    ids, counts = np.unique(small[small > 0], return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")][:max_objects]
    scale = np.asarray(voxel_size if voxel_size else (1.0, 1.0, 1.0), float)
    scale = scale / scale.min()
    from scipy import ndimage as ndi

    objs = ndi.find_objects(small.astype(np.int64, copy=False))
    meshes = []
    for i in sorted(int(k) for k in order):
        sl = objs[i - 1]
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        mask = np.pad(small[sl] == i, _PAD).astype(np.float32)
        if mask.sum() < 2:
            continue
        # a surface of the binary mask is a staircase: its steps face sideways and ipyvolume's
        # shader (brightness = how much a face looks at the camera, at least 0.2) draws them
        # nearly black. The surface of a slightly blurred mask is smooth and keeps the shape
        # (the same 0.5 level); an object too thin to survive the blur keeps its staircase.
        smooth = ndi.gaussian_filter(mask, _SMOOTH_SIGMA / scale, mode="constant")
        surface = smooth if smooth.max() > 0.5 else mask
        try:
            verts, faces, _, _ = marching_cubes(surface, 0.5)
        except (ValueError, RuntimeError):
            continue
        offset = np.array([s.start - _PAD for s in sl], float)
        verts = (verts + offset) * step * factor * scale
        meshes.append({"id": i, "z": verts[:, 0], "y": verts[:, 1], "x": verts[:, 2],
                       "triangles": faces.astype(np.uint32)})
    return meshes


def equal_aspect_limits(shape, voxel_size=None) -> list[tuple[float, float]]:
    """(z, y, x) limits of a 3D view of a volume of ``shape``: ipyvolume stretches each axis's
    limits over the same length of its box, so every axis gets the same span (the longest, in
    voxel-size units), centred on the volume. A 48x256x256 volume is then a flat slab, as it is,
    and not a cube that stretches its objects 5x along z (whose steep sides the shader draws
    nearly black)."""
    size = np.asarray(shape, float) * (np.asarray(voxel_size, float) / min(voxel_size)
                                       if voxel_size else 1.0)
    half = float(size.max()) / 2
    return [(float(c) - half, float(c) + half) for c in size / 2]


def view_from(azimuth: float, elevation: float, farther: float,
              position) -> tuple[float, float, float]:
    """A camera position at ``azimuth`` / ``elevation`` degrees around the box centre (ipyvolume's
    frame: y up, the default camera on +z), ``farther`` times the distance of ``position`` (a
    turned box needs more room to stay whole in the picture)."""
    r = float(np.linalg.norm(position)) * farther
    az, el = np.radians(azimuth), np.radians(elevation)
    return (r * np.sin(az) * np.cos(el), r * np.sin(el), r * np.cos(az) * np.cos(el))


class LabelsView3D:
    """The labels in 3D: one coloured surface per object in an ipyvolume Figure widget."""

    VIEW = (-25.0, -35.0, 1.4)  # azimuth, elevation (degrees), distance (x ipyvolume's default)

    def __init__(self, state: AppState, width: int = 420, height: int = 420):
        self.state = state
        self.size = (width, height)
        self.figure = None  # made on first use: importing ipyvolume costs the first page load
        self.cmap = label_cmap()
        self.note = W.HTML("<i>run a 3D job to see the objects in 3D</i>")
        self.widget = W.VBox([self.note])
        state.observe(self._update, names=["labels3d"])

    def ensure_figure(self):
        """The ipyvolume Figure, made the first time it is needed."""
        if self.figure is None:
            import ipyvolume as ipv

            self.figure = ipv.Figure(width=self.size[0], height=self.size[1])
            self.figure.camera_control = "orbit"
            # looking down on the volume from above and in front, not straight along z: the
            # objects show their depth (drag to turn the view)
            self.figure.camera.position = view_from(*self.VIEW, self.figure.camera.position)
        return self.figure

    def _update(self, change=None) -> None:
        import ipyvolume as ipv

        labels = self.state.labels3d
        if labels is None:
            if self.figure is not None:
                self.figure.meshes = []
            self.widget.children = [self.note]  # (an empty box until there is a result)
            self.note.value = "<i>run a 3D job to see the objects in 3D</i>"
            return
        self.ensure_figure()
        self.widget.children = [self.note, self.figure]
        vs = self.state.data.voxel_size if self.state.data is not None else None
        full_shape = tuple(labels.shape)
        if isinstance(labels, np.ndarray):
            parts = object_meshes(labels, vs)
            n = int(np.count_nonzero(np.unique(labels)))
        else:  # a blockwise job's labels on disk: the coarse level of its pyramid
            from nbapp.blockwise import coarse_level

            small, factor = coarse_level(self.state.job_output)
            parts = object_meshes(small, vs, factor=factor)
            n = len(self.state.table)
        meshes = []
        for m in parts:
            colour = to_hex(self.cmap(label_display(np.array([m["id"]]))[0]))
            meshes.append(ipv.Mesh(x=m["x"].astype(np.float32), y=m["y"].astype(np.float32),
                                   z=m["z"].astype(np.float32), triangles=m["triangles"],
                                   color=colour))
        self.figure.meshes = meshes
        self.figure.zlim, self.figure.ylim, self.figure.xlim = equal_aspect_limits(full_shape, vs)
        self.note.value = (f"{len(meshes)} of {n} objects shown"
                           + (" (the largest)" if len(meshes) < n else ""))


class ObjectTable:
    """Per-object table (id, voxels, bounding box, centroid, extent) as HTML."""

    def __init__(self, state: AppState, max_rows: int = 200):
        self.state = state
        self.max_rows = max_rows
        self.html = W.HTML("")
        # a scroll bar that is always there: more rows than fit must look scrollable
        self.widget = W.VBox([self.html], layout=W.Layout(max_height="320px",
                                                          overflow="hidden scroll"))
        state.observe(self._update, names=["table", "labels3d"])

    @property
    def rows(self) -> int:
        return min(len(self.state.table), self.max_rows)

    def _update(self, change=None) -> None:
        rows = self.state.table
        if not rows:  # before any result the 3D view's note says what to do: nothing here
            # (the two ran together as "... to see the objects in 3D no objects")
            self.html.value = "<i>no objects</i>" if self.state.labels3d is not None else ""
            return
        head = ("<tr><th>id</th><th>class</th><th>voxels</th><th>bounding box (z0, y0, x0)-(z1, y1, x1)</th>"
                "<th>centroid (z, y, x)</th><th>extent (z, y, x)</th></tr>")
        body = []
        for r in rows[: self.max_rows]:
            b = r["bbox"]
            cells = (r["id"], r.get("class", ""), r["voxels"], f"({b[0]}, {b[1]}, {b[2]})-({b[3]}, {b[4]}, {b[5]})",
                     "({}, {}, {})".format(*r["centroid"]), "({}, {}, {})".format(*r["extent"]))
            body.append("<tr class='nbapp-obj'>" + "".join(
                f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        more = (f"<p>{len(rows) - self.max_rows} more rows in the CSV export</p>"
                if len(rows) > self.max_rows else "")
        per_class = {}
        for r in rows:
            per_class[r.get("class", "")] = per_class.get(r.get("class", ""), 0) + 1
        counts = ", ".join(f"{k} {v}" for k, v in per_class.items() if k)
        self.html.value = (f"<p>{len(rows)} objects{': ' + counts if counts else ''}</p><table class='nbapp-table' "
                           "style='border-collapse:separate;border-spacing:10px 1px;font-size:12px'>" + head
                           + "".join(body) + "</table>" + more)
