"""Instance tracking across slices and 3D object filters (SPEC.md section 3, per plane, steps 4-6).

Pure numpy/scipy: arrays in, new arrays out; no torch, no devices, no I/O. The recipe of
single-plane mode is :func:`track_and_filter`:

1. :func:`track_stack` links the per-slice 2D instances of one thing class into 3D objects:
   a forward pass from the first slice to the last (:func:`match_to_previous` with new labels
   for unmatched objects), then a backward pass from the last slice to the first with the same
   rule and no new labels, which pulls branches that join into one label.
2. :func:`filter_objects` deletes small objects, then "pancakes".
3. :func:`relabel_by_first_appearance` numbers the objects 1..N in raster order.

Conventions
-----------
- Axes (Z, Y, X); slices are along axis 0 (the caller transposes for the xz and yz planes).
- 0 is background; any other integer value is an object. An object of a slice is the set of
  its pixels with one label value (2D step 8 makes them connected components). Tracking works
  on one thing class at a time: run it once per class.
- Overlaps are counted with a sparse contingency table of the (previous, current) label pairs
  of foreground pixels, so a step costs O(pixels + overlapping pairs), and the Hungarian
  assignment runs only on groups of objects that overlap more than one partner.

>>> stack = np.array([[[1, 1, 0, 0, 2]],
...                   [[7, 7, 0, 0, 8]],
...                   [[0, 5, 5, 0, 9]]])
>>> track_stack(stack)[:, 0].tolist()
[[1, 1, 0, 0, 2], [1, 1, 0, 0, 2], [0, 1, 1, 0, 2]]
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from nbapp.errors import InputError, ParameterError

__all__ = [
    "match_to_previous",
    "track_stack",
    "track_stack_steps",
    "forward_step",
    "backward_step",
    "filter_objects",
    "relabel_by_first_appearance",
    "track_and_filter",
    "first_voxels",
    "IOU_THRESHOLD",
    "IOA_THRESHOLD",
]

#: A Hungarian pair with at least this IoU takes the previous slice's label.
IOU_THRESHOLD = 0.25
#: An unmatched object whose overlap with a previous object covers at least this fraction of its
#: own area takes that object's label (the merge rule).
IOA_THRESHOLD = 0.25

# Label values spanning at most this many times the number of values (plus a constant) are
# counted with np.bincount and a lookup table; wider ranges fall back to sorting (np.unique).
_DENSE_FACTOR = 4
_DENSE_SLACK = 1 << 16
_INT32_MAX = int(np.iinfo(np.int32).max)
# filter_objects zeroes at most this many deleted objects box by box (else one full pass)
_MAX_BOX_LOOP = 10_000


# ----------------------------------------------------------------------------- validation


def _check_labels(name: str, labels, ndim: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise InputError(f"{name} must be an integer label array, got dtype {labels.dtype}")
    if ndim is not None and labels.ndim != ndim:
        axes = {2: "(Y, X)", 3: "(Z, Y, X)"}.get(ndim, f"{ndim}-D")
        raise InputError(f"{name} must be {axes}, got shape {labels.shape}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise InputError(f"{name} has negative labels (min {labels.min()})")
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise InputError(f"{name} has labels above 2**63 - 1 (max {labels.max()})")
    if labels.dtype.kind == "b":
        labels = labels.view(np.uint8)
    return labels


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ParameterError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ParameterError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _check_count(name: str, value, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= hi:
        raise ParameterError(f"{name} must be an integer in [0, {hi}], got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- label counting


def _is_dense(lo: int, hi: int, n: int) -> bool:
    return hi - lo <= _DENSE_FACTOR * n + _DENSE_SLACK


def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct values of a 1D int array, the index of each value into them, and counts."""
    if values.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    lo, hi = int(values.min()), int(values.max())
    if _is_dense(lo, hi, values.size):
        shifted = values - values.dtype.type(lo) if lo else values
        counts = np.bincount(shifted, minlength=hi - lo + 1)
        present = np.flatnonzero(counts)
        lut = np.zeros(counts.size, np.int64)
        lut[present] = np.arange(present.size)
        return present + lo, lut[shifted], counts[present]
    ids, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return ids.astype(np.int64), inverse.reshape(-1), counts


def _pair_counts(keys: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys in [0, n_keys) and how often each occurs."""
    if n_keys <= _DENSE_FACTOR * keys.size + _DENSE_SLACK:
        counts = np.bincount(keys, minlength=n_keys)
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(keys, return_counts=True)


# ----------------------------------------------------------------------------- one slice step


def _assignment(pi: np.ndarray, ci: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Which overlapping pairs the Hungarian assignment (maximum total IoU) selects.

    ``pi`` and ``ci`` are the previous and current object indices of each overlapping pair. A
    pair whose two objects overlap nothing else is selected outright; the other pairs are
    solved with :func:`scipy.optimize.linear_sum_assignment` per connected group of the
    overlap graph (pairs in different groups never compete, so this is the global optimum).
    """
    chosen = np.zeros(pi.size, bool)
    if pi.size == 0:
        return chosen
    deg_p = np.bincount(pi)
    deg_c = np.bincount(ci)
    alone = (deg_p[pi] == 1) & (deg_c[ci] == 1)
    chosen[alone] = True
    rest = np.flatnonzero(~alone)
    if rest.size == 0:
        return chosen
    rows, r_idx = np.unique(pi[rest], return_inverse=True)
    cols, c_idx = np.unique(ci[rest], return_inverse=True)
    n = rows.size + cols.size
    graph = coo_matrix((np.ones(rest.size, np.int8), (r_idx, c_idx + rows.size)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[r_idx]
    order = np.argsort(pair_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
    for group in np.split(order, bounds):
        gr, gr_idx = np.unique(r_idx[group], return_inverse=True)
        gc, gc_idx = np.unique(c_idx[group], return_inverse=True)
        score = np.zeros((gr.size, gc.size))
        score[gr_idx, gc_idx] = iou[rest[group]]
        which = np.full((gr.size, gc.size), -1, np.int64)
        which[gr_idx, gc_idx] = rest[group]
        r, c = linear_sum_assignment(score, maximize=True)
        picked = which[r, c]
        chosen[picked[picked >= 0]] = True
    return chosen


def _match_step(
    prev: np.ndarray,
    curr: np.ndarray,
    next_label: int,
    iou_threshold: float,
    ioa_threshold: float,
    allow_new: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The core of :func:`match_to_previous` on flattened slices.

    Returns the foreground mask of ``curr``, each foreground pixel's object index, the new label
    of each object (int64) and the updated next label.
    """
    fg = curr != 0
    cur_ids, cur_idx, cur_area = _distinct(curr[fg].astype(np.int64, copy=False))
    if cur_ids.size == 0:
        return fg, cur_idx, cur_ids, next_label
    new = np.zeros(cur_ids.size, np.int64)
    done = np.zeros(cur_ids.size, bool)

    prev_fg = prev != 0
    prev_ids, _, prev_area = _distinct(prev[prev_fg].astype(np.int64, copy=False))
    under = prev[fg]  # previous label under each current foreground pixel
    both = under != 0
    if prev_ids.size and both.any():
        p_idx = np.searchsorted(prev_ids, under[both].astype(np.int64, copy=False))
        keys, inter = _pair_counts(p_idx * cur_ids.size + cur_idx[both],
                                   prev_ids.size * cur_ids.size)
        pi, ci = np.divmod(keys, cur_ids.size)
        iou = inter / (prev_area[pi] + cur_area[ci] - inter)
        # 1. Hungarian matching by IoU; a selected pair with IoU >= threshold takes the label
        chosen = _assignment(pi, ci, iou) & (iou >= iou_threshold)
        new[ci[chosen]] = prev_ids[pi[chosen]]
        done[ci[chosen]] = True
        # 2. merge rule: the previous object with the largest overlap (ties: lowest label)
        #    if that overlap covers >= ioa_threshold of the current object's own area
        best = np.lexsort((pi, -inter, ci))
        first = best[np.r_[True, ci[best[1:]] != ci[best[:-1]]]]
        merge = first[~done[ci[first]] & (inter[first] >= ioa_threshold * cur_area[ci[first]])]
        new[ci[merge]] = prev_ids[pi[merge]]
        done[ci[merge]] = True
    # 3. the rest: new labels in ascending order of their current id, or keep their own
    rest = np.flatnonzero(~done)
    if allow_new:
        new[rest] = next_label + np.arange(rest.size)
        next_label += int(rest.size)
    else:
        new[rest] = cur_ids[rest]
    return fg, cur_idx, new, next_label


def match_to_previous(
    prev: np.ndarray,
    curr: np.ndarray,
    next_label: int,
    iou_threshold: float = IOU_THRESHOLD,
    ioa_threshold: float = IOA_THRESHOLD,
    allow_new: bool = True,
) -> tuple[np.ndarray, int]:
    """Relabel the objects of one slice after those of the previous slice (one tracking step).

    1. Current objects are matched one-to-one to previous objects by the Hungarian algorithm,
       maximising the total IoU over all overlapping pairs; a matched pair with
       IoU >= ``iou_threshold`` takes the previous label (the threshold applies after the
       assignment, as in empanada's matcher).
    2. Merge rule: an object left unmatched whose intersection with some previous object covers
       >= ``ioa_threshold`` of its own area takes the label of the previous object it overlaps
       most (ties: the lowest label). Several current objects can so share one label.
    3. Any other object gets ``next_label``, ``next_label + 1``, ... in ascending order of its
       current id if ``allow_new``, else keeps its current id.

    Parameters
    ----------
    prev : (Y, X) int
        Labels of the previous slice (already relabelled), 0 = background.
    curr : (Y, X) int
        Labels of the current slice, ids arbitrary, 0 = background.
    next_label : int
        First label free for new objects.
    iou_threshold, ioa_threshold : float
        In (0, 1]. Pairs that do not overlap never match.
    allow_new : bool
        Whether unmatched objects get new labels (forward pass) or keep theirs (backward pass).

    Returns
    -------
    labels : (Y, X) int64
        ``curr`` relabelled.
    next_label : int
        ``next_label`` plus the number of new labels given.

    Examples
    --------
    The left object continues (IoU 2/3) and the right one is new:

    >>> prev = np.array([[5, 5, 5, 0, 0, 0]])
    >>> curr = np.array([[1, 1, 0, 0, 2, 2]])
    >>> lab, nxt = match_to_previous(prev, curr, next_label=6)
    >>> lab.tolist(), nxt
    ([[5, 5, 0, 0, 6, 6]], 7)

    A split: 1 continues (IoU 3/5); 2 is left unmatched (IoU 1/5) but lies wholly under 5,
    so the merge rule gives it that label too:

    >>> prev = np.array([[5, 5, 5, 5, 5, 0]])
    >>> curr = np.array([[1, 1, 1, 0, 2, 0]])
    >>> match_to_previous(prev, curr, 6)[0].tolist()
    [[5, 5, 5, 0, 5, 0]]
    """
    prev = _check_labels("prev", prev, 2)
    curr = _check_labels("curr", curr, 2)
    if prev.shape != curr.shape:
        raise InputError(
            f"prev and curr must have the same shape, got {prev.shape} and {curr.shape}"
        )
    iou_threshold = _check_fraction("iou_threshold", iou_threshold)
    ioa_threshold = _check_fraction("ioa_threshold", ioa_threshold)
    if (isinstance(next_label, bool) or not isinstance(next_label, (int, np.integer))
            or next_label < 1):
        raise ParameterError(f"next_label must be an integer >= 1, got {next_label!r}")
    fg, idx, new, next_label = _match_step(
        prev.reshape(-1), curr.reshape(-1), int(next_label), iou_threshold, ioa_threshold,
        bool(allow_new),
    )
    out = np.zeros(curr.size, np.int64)
    out[fg] = new[idx]
    return out.reshape(curr.shape), next_label


# ----------------------------------------------------------------------------- whole stack


def track_stack_steps(
    stack: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
    ioa_threshold: float = IOA_THRESHOLD,
) -> Generator[tuple[str, int, int], None, np.ndarray]:
    """Generator form of :func:`track_stack`: yields progress, returns the labels.

    Yields ``("forward", z, nz)`` after slice ``z`` of the forward pass and
    ``("backward", z, nz)`` after slice ``z`` of the backward pass (``z`` counting down); the
    labels are the ``StopIteration`` value (``result = yield from track_stack_steps(...)``).

    >>> gen = track_stack_steps(np.ones((2, 1, 1), np.uint8))
    >>> [next(gen) for _ in range(4)]
    [('forward', 0, 2), ('forward', 1, 2), ('backward', 1, 2), ('backward', 0, 2)]
    >>> try:
    ...     next(gen)
    ... except StopIteration as stop:
    ...     print(stop.value.ravel())
    [1 1]
    """
    stack = _check_labels("stack", stack, 3)
    iou_threshold = _check_fraction("iou_threshold", iou_threshold)
    ioa_threshold = _check_fraction("ioa_threshold", ioa_threshold)
    return _track_steps(stack, iou_threshold, ioa_threshold)  # validated now, run when iterated


def _track_steps(
    stack: np.ndarray, iou_threshold: float, ioa_threshold: float
) -> Generator[tuple[str, int, int], None, np.ndarray]:
    nz = stack.shape[0]
    # every label is a forward-pass object, so labels never exceed the number of voxels
    out = np.zeros(stack.shape, np.int32 if stack.size <= _INT32_MAX else np.int64)
    empty = np.zeros(stack[0].size if nz else 0, stack.dtype)
    next_label = 1
    for z in range(nz):
        prev = out[z - 1].reshape(-1) if z else empty
        fg, idx, new, next_label = _match_step(
            prev, stack[z].reshape(-1), next_label, iou_threshold, ioa_threshold, True
        )
        out[z].reshape(-1)[fg] = new[idx]
        yield "forward", z, nz
    if nz:
        yield "backward", nz - 1, nz
    for z in range(nz - 2, -1, -1):
        # slice z + 1 is already relabelled by this pass: a label pulled in there reaches
        # slice z through this match, and so on down the chain
        flat = out[z].reshape(-1)
        fg, idx, new, _ = _match_step(
            out[z + 1].reshape(-1), flat, next_label, iou_threshold, ioa_threshold, False
        )
        flat[fg] = new[idx]
        yield "backward", z, nz
    return out


def forward_step(prev: np.ndarray, curr: np.ndarray, next_label: int
                 ) -> tuple[np.ndarray, int]:
    """One slice of :func:`track_stack`'s forward pass on flat slices: ``curr`` relabelled
    after ``prev`` (the previous slice's forward labels; zeros for the first slice), and the
    next free label. With :func:`backward_step`, a stack too large for memory is tracked a
    slice at a time with :func:`track_stack`'s result.

    >>> y = np.array([[[11, 0, 12]], [[11, 0, 12]], [[21, 21, 21]], [[31, 31, 31]]])
    >>> fwd, nxt, prev = [], 1, np.zeros(3, np.int64)
    >>> for s in y:
    ...     prev, nxt = forward_step(prev, s.ravel(), nxt)
    ...     fwd.append(prev)
    >>> out = [fwd[-1]]
    >>> for f in fwd[-2::-1]:
    ...     out.insert(0, backward_step(out[0], f))
    >>> np.array_equal(np.stack(out).reshape(y.shape), track_stack(y))
    True
    """
    fg, idx, new, next_label = _match_step(prev, curr, int(next_label), IOU_THRESHOLD,
                                           IOA_THRESHOLD, True)
    out = np.zeros(curr.size, np.int64)
    out[fg] = new[idx]
    return out, next_label


def backward_step(nxt: np.ndarray, curr: np.ndarray) -> np.ndarray:
    """One slice of :func:`track_stack`'s backward pass on flat slices: ``curr`` (its forward
    labels) relabelled after ``nxt`` (the next slice, already relabelled by this pass); see
    :func:`forward_step`."""
    fg, idx, new, _ = _match_step(nxt, curr, 1, IOU_THRESHOLD, IOA_THRESHOLD, False)
    out = np.zeros(curr.size, np.int64)
    out[fg] = new[idx]
    return out


def track_stack(
    stack: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
    ioa_threshold: float = IOA_THRESHOLD,
) -> np.ndarray:
    """Link per-slice 2D instances into 3D objects: forward, then backward matching.

    Forward pass: slice 0 gets labels 1..k (ascending order of its ids); each next slice is
    relabelled by :func:`match_to_previous` against the relabelled previous slice, with new
    labels for objects that match nothing. Backward pass: from the last slice to the first, each
    slice is relabelled against the next one (already relabelled by this pass) with the same
    rule and no new labels, so branches that join later end with one label. Only the
    immediately neighbouring slice is consulted: an object that vanishes for a slice comes back
    with a new label.

    Parameters
    ----------
    stack : (Z, Y, X) int
        Per-slice instance labels of one thing class; each slice numbered independently
        (e.g. 10001, 10002, ...), 0 = background.
    iou_threshold, ioa_threshold : float
        See :func:`match_to_previous`.

    Returns
    -------
    (Z, Y, X) int32
        3D labels, 0 = background (int64 only for volumes of more than 2**31 - 1 voxels).
        Labels are not consecutive after the backward pass; see
        :func:`relabel_by_first_appearance`.

    Examples
    --------
    A Y shape: two branches (slices 0-1) join (slices 2-3) and end as one object.

    >>> y = np.array([[[11, 0, 12]], [[11, 0, 12]], [[21, 21, 21]], [[31, 31, 31]]])
    >>> track_stack(y)[:, 0].tolist()
    [[1, 0, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]]
    """
    gen = track_stack_steps(stack, iou_threshold, ioa_threshold)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ----------------------------------------------------------------------------- 3D objects


def _rows(a: np.ndarray):
    """Flat pieces of ``a`` along its first axis (views when ``a`` is C-contiguous)."""
    if a.ndim <= 1:
        yield a.reshape(-1)
        return
    for b in range(a.shape[0]):
        yield a[b].reshape(-1)


def _map_labels(
    labels: np.ndarray, ids: np.ndarray, values: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """``out[...] =`` the value of each label; ``ids`` (sorted) hold every non-zero label; 0 -> 0.

    ``out`` is C-contiguous and may be ``labels`` itself; works slice by slice so temporaries
    stay one slice large.
    """
    if ids.size == 0:
        out[...] = 0
        return out
    hi = int(ids[-1])
    dense = _is_dense(0, hi, ids.size) or hi <= labels.size
    if dense:
        lut = np.zeros(hi + 1, out.dtype)
        lut[ids] = values
    in_place = np.shares_memory(labels, out)
    for row, target in zip(_rows(labels), _rows(out)):
        if dense and not in_place:
            np.take(lut, row, out=target, mode="clip")  # in range: lut covers every label
        elif dense:
            target[:] = np.take(lut, row, mode="clip")
        else:
            mapped = np.zeros(row.size, out.dtype)
            nz = np.flatnonzero(row)
            mapped[nz] = values[np.searchsorted(ids, row[nz])]
            target[:] = mapped
    return out


def _count_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-zero ids of ``labels`` and their voxel counts."""
    hi = int(labels.max()) if labels.size else 0
    if hi == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    per_row = labels.size // (labels.shape[0] if labels.ndim > 1 else 1)
    if _is_dense(0, hi, per_row):  # slice by slice: no volume-sized temporaries
        counts = np.zeros(hi + 1, np.int64)
        for row in _rows(labels):
            counts += np.bincount(row.astype(np.intp, copy=False), minlength=hi + 1)
    elif hi <= labels.size:
        counts = np.bincount(labels.reshape(-1).astype(np.intp, copy=False), minlength=hi + 1)
    else:
        flat = labels.reshape(-1)
        ids, n = np.unique(flat[flat != 0], return_counts=True)
        return ids.astype(np.int64), n
    ids = np.flatnonzero(counts[1:]) + 1
    return ids.astype(np.int64), counts[ids]


def _boxes(labels: np.ndarray, ids: np.ndarray) -> list:
    """Bounding box (a tuple of slices) of each id in ``ids`` (sorted, all present)."""
    hi = int(ids[-1])
    if _is_dense(0, hi, ids.size):
        found = ndi.find_objects(labels, max_label=hi)
        return [found[i - 1] for i in ids]
    compact = np.zeros(labels.shape, np.int32 if ids.size <= _INT32_MAX else np.int64)
    _map_labels(labels, ids, np.arange(1, ids.size + 1), compact)
    return ndi.find_objects(compact, max_label=ids.size)


def _filter_in_place(labels: np.ndarray, min_size: int, min_extent: int) -> np.ndarray:
    """:func:`filter_objects` on a C-contiguous array it may overwrite."""
    if min_size == 0 and min_extent <= 1:
        return labels
    ids, sizes = _count_labels(labels)
    keep = sizes >= min_size
    boxes = None
    if min_extent > 1 and keep.any():
        boxes = _boxes(labels, ids)
        extents = np.array([[s.stop - s.start for s in box] for box in boxes], np.int64)
        keep &= (extents >= min_extent).all(axis=1)
    drop = np.flatnonzero(~keep)
    if drop.size == 0:
        return labels
    # Zero the deleted objects inside their boxes when that touches less than a pass over the
    # whole volume would; otherwise map every voxel through a keep table.
    if boxes is not None and drop.size <= _MAX_BOX_LOOP:
        volume = sum(int(np.prod([s.stop - s.start for s in boxes[i]])) for i in drop)
        if volume <= labels.size // 2:
            for i in drop:
                view = labels[boxes[i]]
                view[view == ids[i]] = 0
            return labels
    return _map_labels(labels, ids, np.where(keep, ids, 0), labels)


def filter_objects(labels: np.ndarray, min_size: int = 500, min_extent: int = 5) -> np.ndarray:
    """Delete objects with fewer than ``min_size`` voxels, then those whose bounding box is
    thinner than ``min_extent`` along any axis ("pancakes").

    Parameters
    ----------
    labels : (Z, Y, X) int
        Object labels (any integer ids, any number of axes), 0 = background. An id is one
        object even when its voxels are not connected.
    min_size : int
        Min Size, voxels (0 keeps all sizes).
    min_extent : int
        Min Box Extent, voxels along every axis (0 or 1 keep all shapes).

    Returns
    -------
    (Z, Y, X), same dtype
        A new array with the deleted objects set to 0; the other ids unchanged.

    >>> lab = np.zeros((3, 3, 3), np.int32)
    >>> lab[:, :, :2] = 1      # 3 x 3 x 2 box
    >>> lab[0, 0, 2] = 2       # one voxel
    >>> np.unique(filter_objects(lab, min_size=2, min_extent=0)).tolist()
    [0, 1]
    >>> np.unique(filter_objects(lab, min_size=0, min_extent=3)).tolist()
    [0]
    """
    dtype = np.asarray(labels).dtype
    labels = _check_labels("labels", labels)
    min_size = _check_count("min_size", min_size, 2**62)
    min_extent = _check_count("min_extent", min_extent, 2**62)
    return _filter_in_place(np.array(labels, order="C"), min_size, min_extent).view(dtype)


def relabel_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    """Number objects 1..N in the order of their first voxel in raster (C) order.

    Parameters
    ----------
    labels : (Z, Y, X) int
        Object labels (any integer ids, any number of axes), 0 = background.

    Returns
    -------
    (Z, Y, X) int32
        The same partition with ids 1..N (int64 only if N > 2**31 - 1).

    >>> relabel_by_first_appearance(np.array([[0, 9, 9], [4, 0, 70]])).tolist()
    [[0, 1, 1], [2, 0, 3]]
    """
    labels = _check_labels("labels", labels)
    return _relabel(labels, None)


def first_voxels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-zero ids and the flat C-order index of each one's first voxel."""
    found_ids, found_at = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    offset = 0
    for row in _rows(labels):
        if row.size:
            # an object's first voxel starts a run of equal values: only run starts matter
            starts = np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]]))
            starts = starts[row[starts] != 0]
            ids, first = np.unique(row[starts], return_index=True)
            found_ids.append(ids.astype(np.int64))
            found_at.append(starts[first] + offset)
        offset += row.size
    # slices were visited in order, so an id's first entry is its first voxel
    ids, first = np.unique(np.concatenate(found_ids), return_index=True)
    return ids, np.concatenate(found_at)[first]


def _relabel(labels: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """:func:`relabel_by_first_appearance` into ``out`` (may be ``labels``) or a new array."""
    ids, first = first_voxels(labels)
    rank = np.empty(ids.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, ids.size + 1)
    dtype = np.int32 if ids.size <= _INT32_MAX else np.int64
    if out is None or out.dtype != dtype:
        out = np.zeros(labels.shape, dtype)
    if np.array_equal(rank, ids):  # already numbered 1..N by first appearance
        if not np.shares_memory(out, labels):
            out[...] = labels
        return out
    return _map_labels(labels, ids, rank, out)


def track_and_filter(stack: np.ndarray, min_size: int = 500, min_extent: int = 5) -> np.ndarray:
    """Single-plane 3D objects from per-slice instances: track, filter, number 1..N.

    :func:`track_stack`, then :func:`filter_objects`, then :func:`relabel_by_first_appearance`
    (SPEC.md section 3, per plane, steps 4-6).

    Parameters
    ----------
    stack : (Z, Y, X) int
        Per-slice instance labels of one thing class, 0 = background.
    min_size, min_extent : int
        See :func:`filter_objects`.

    Returns
    -------
    (Z, Y, X) int32
        Labels 1..N ordered by first appearance, 0 = background.

    >>> stack = np.zeros((3, 4, 4), np.int32)
    >>> stack[:, :3, :3] = [[[101]], [[205]], [[307]]]   # a 3 x 3 x 3 cube
    >>> stack[1, 3, 3] = 206                              # a one-voxel speck
    >>> lab = track_and_filter(stack, min_size=2, min_extent=2)
    >>> lab.dtype, np.unique(lab).tolist()
    (dtype('int32'), [0, 1])
    """
    min_size = _check_count("min_size", min_size, 2**62)
    min_extent = _check_count("min_extent", min_extent, 2**62)
    labels = track_stack(stack)  # a new array of ours: filter and number it in place
    labels = _filter_in_place(labels, min_size, min_extent)
    return _relabel(labels, labels)
