"""Ortho-plane consensus: xy, xz and yz instance stacks -> one 3D segmentation (SPEC.md section 3).

Pure numpy/scipy: arrays in, new arrays out; no torch, no devices, no I/O. The recipe is
:func:`orthoplane_consensus`; each step is a function of its own and is tested on literal arrays.
It only needs the stored xy, xz and yz label stacks, so changing ``vote_threshold``,
``allow_one_view``, ``min_size`` or ``min_extent`` after a 3D job costs seconds, not a new job.

Cost: per view one ``scipy.ndimage.find_objects`` pass and a max (and, for signed dtypes, min)
check; every other step works inside the bounding boxes of the objects (no full-volume pass per
object or per cluster). About 2-5 s for three 165 x 768 x 1024 stacks on two busy CPU cores.

Interpretations
---------------
SPEC section 3 describes empanada-napari 1.2.4 in a few lines; where it is ambiguous nbapp does
what that release does (``empanada.consensus.merge_objects_from_trackers``), except where noted.

1. Graph. A node is one object (label) of one view; two nodes of different views are joined when
   they share at least one voxel (IoU > 0). Objects of one view never overlap, so there are no
   same-view edges. Connected components come from
   :func:`scipy.sparse.csgraph.connected_components` (undirected).
2. ``min_cluster`` is 1 with ``allow_one_view`` and 2 without it. Maximal merging (only
   ``vote_threshold=1`` without ``allow_one_view``) keeps every edge, so each connected component
   is one cluster. Otherwise a cluster is a connected component of the graph restricted to the
   edges with IoU > :data:`CLUSTER_IOU` (strictly greater).
3. Mean pairwise IoU between clusters P and Q: the sum of the IoUs of all ``|P| * |Q|`` pairs
   ``(p, q)`` divided by ``|P| * |Q|``; a pair without an edge (disjoint, or from the same view)
   counts as 0. The mean overlap (voxels) is computed the same way. P and Q are linked when the
   mean IoU > :data:`MERGE_IOU` or the mean overlap > :data:`MERGE_OVERLAP`.
4. Linked clusters are merged by empanada's greedy rule, not by transitive closure (which would
   chain touching mitochondria into one object): repeatedly take the cluster with the most links
   (ties: the first cluster); if its largest neighbour (in detections) is larger than it, it is
   rejected as an object and its detections are added to every neighbour; otherwise it absorbs
   all its neighbours. Links are removed as they are used and a neighbour's other links are not
   passed on to the absorbing cluster (empanada-napari 1.2.4 behaves so), so merging reaches one
   hop. See :func:`merge_clusters`.
5. A cluster's size counts detections (objects), not views. Clusters with fewer than
   ``min_cluster`` detections are dropped. A voxel's vote counts the views whose detection in
   the cluster covers it (detections of one view are disjoint, so at most one per view); a
   cluster whose detections come from fewer views than ``vote_threshold`` yields nothing.
6. Voted objects sharing more than :data:`MERGE_OVERLAP` voxels or with IoU > :data:`MERGE_IOU`
   are unioned (transitively, as empanada's ``merge_overlapping``).
7. Voxels shared by two objects that were not unioned (a trivial overlap) go to the smaller object
   (ties: the one made from the later cluster). empanada gives them to whichever object it paints
   last; nbapp makes the rule explicit so that a small object touching a big one stays whole.
8. Filters run on the final objects: fewer than ``min_size`` voxels, or a bounding box shorter
   than ``min_extent`` along any axis, deletes the object (an extent equal to ``min_extent`` is
   kept). An object may be disconnected; size and box count all its voxels.
9. Output ids 1..N follow the C-order (Z, then Y, then X) index of each object's first voxel.
10. Input ids need not be consecutive. Volumes with ids above :data:`MAX_DIRECT_LABEL` are
    compacted first (a sort of the volume: correct but slower).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from nbapp.errors import InputError, ParameterError
from nbapp.params import ConsensusParams

__all__ = [
    "orthoplane_consensus",
    "semantic_vote",
    "ObjectMask",
    "DetectionGraph",
    "detection_graph",
    "cluster_detections",
    "merge_clusters",
    "vote_cluster",
    "union_overlapping",
    "separate_shared_voxels",
    "filter_object_masks",
    "paint_by_first_appearance",
    "CLUSTER_IOU",
    "MERGE_IOU",
    "MERGE_OVERLAP",
    "MAX_DIRECT_LABEL",
    "combination_counts",
    "consensus_of_counts",
    "compact_labels",
]

#: Detections joined by an edge with IoU above this form one cluster (when not merging maximally).
CLUSTER_IOU = 0.75
#: Clusters (step 2) or voted objects (step 4) with mean IoU / IoU above this are merged.
MERGE_IOU = 0.01
#: ... or with mean overlap / overlap above this many voxels.
MERGE_OVERLAP = 100
#: Views whose largest id exceeds this are compacted to 1..n before the graph is built.
MAX_DIRECT_LABEL = 1 << 20

_VIEWS = ("xy", "xz", "yz")
_Box = tuple  # three slices: (Z, Y, X)


class ObjectMask(NamedTuple):
    """One 3D object: a bounding box in the volume and the object's mask inside it.

    Attributes
    ----------
    box : tuple of 3 slices
        (Z, Y, X) slices with explicit start and stop.
    mask : (dz, dy, dx) bool
        The object's voxels inside ``box``.
    """

    box: _Box
    mask: np.ndarray

    @property
    def size(self) -> int:
        """Number of voxels."""
        return int(np.count_nonzero(self.mask))


class DetectionGraph(NamedTuple):
    """The objects of the three views (nodes) and their overlaps (edges); SPEC step 1.

    Nodes are ordered by view (xy, xz, yz), then by label.

    Attributes
    ----------
    view : (n,) int64
        View index of each node (0 xy, 1 xz, 2 yz).
    label : (n,) int64
        Label of each node in its view (after compaction, see :data:`MAX_DIRECT_LABEL`).
    size : (n,) int64
        Voxels of each node.
    boxes : list of n tuples of 3 slices
        Bounding box of each node.
    pairs : (m, 2) int64
        Node indices ``i < j`` of objects of different views sharing voxels.
    overlap : (m,) int64
        Shared voxels of each pair.
    iou : (m,) float64
        IoU of each pair (> 0).
    """

    view: np.ndarray
    label: np.ndarray
    size: np.ndarray
    boxes: list
    pairs: np.ndarray
    overlap: np.ndarray
    iou: np.ndarray

    @property
    def n(self) -> int:
        """Number of nodes."""
        return int(self.view.size)


# ------------------------------------------------------------------------------------- recipe


def orthoplane_consensus(
    xy: np.ndarray, xz: np.ndarray, yz: np.ndarray, params: ConsensusParams = ConsensusParams()
) -> np.ndarray:
    """Build consensus instances from the xy, xz and yz stacks of one thing class.

    Parameters
    ----------
    xy, xz, yz : (Z, Y, X) integer arrays
        Instance labels of the same volume inferred along each plane, already tracked and
        filtered and put back in (Z, Y, X) order; 0 is background, ids need not be consecutive.
    params : ConsensusParams
        ``vote_threshold``, ``allow_one_view``, ``min_size``, ``min_extent``.

    Returns
    -------
    (Z, Y, X) int32
        Consensus labels 1..N in order of first appearance (C order); 0 is background.

    Raises
    ------
    InputError
        When a view is not a 3D integer array, has negative labels, or the shapes differ.
    ParameterError
        When ``params`` is not a :class:`ConsensusParams`.

    Notes
    -----
    See the module docstring for how each SPEC step is read.

    Examples
    --------
    One object seen by all three views, a second one seen by the xy view only:

    >>> a = np.zeros((4, 4, 4), np.uint16); a[1:3, 1:3, 1:3] = 1
    >>> xy = a.copy(); xy[0, 0, 3] = 2
    >>> p = ConsensusParams(min_size=0, min_extent=0)
    >>> out = orthoplane_consensus(xy, a, a, p)
    >>> out.dtype, int(out.max()), bool((out == 1).sum() == 8)
    (dtype('int32'), 1, True)
    >>> int(orthoplane_consensus(xy, a, a, p.replace(vote_threshold=1, allow_one_view=True)).max())
    2
    """
    views = _validate_views(xy, xz, yz)
    if not isinstance(params, ConsensusParams):
        raise ParameterError(f"params must be ConsensusParams, got {type(params).__name__}")
    min_cluster = 1 if params.allow_one_view else 2
    maximal = params.vote_threshold < min_cluster
    graph = detection_graph(views)
    clusters = cluster_detections(graph, 0.0 if maximal else CLUSTER_IOU)
    clusters = [c for c in clusters if len(c) >= min_cluster]
    objects = [vote_cluster(views, graph, c, params.vote_threshold) for c in clusters]
    objects = union_overlapping([o for o in objects if o is not None])
    objects = separate_shared_voxels(objects)
    objects = filter_object_masks(objects, params.min_size, params.min_extent)
    return paint_by_first_appearance(objects, views[0].shape)


def semantic_vote(masks: Sequence[np.ndarray], vote_threshold: int) -> np.ndarray:
    """Per-voxel vote of semantic masks: True where at least ``vote_threshold`` masks are set.

    Used for semantic-only classes (SPEC section 3, consensus step 5).

    Parameters
    ----------
    masks : sequence of (Z, Y, X) bool or integer arrays
        The views' masks (any non-zero value votes), all of one shape; usually three.
    vote_threshold : int
        1..len(masks).

    Returns
    -------
    (Z, Y, X) bool

    >>> a = np.array([[[1, 1, 0, 0]]], bool)
    >>> b = np.array([[[1, 0, 1, 0]]], bool)
    >>> c = np.array([[[1, 0, 0, 0]]], bool)
    >>> semantic_vote([a, b, c], 2).astype(int).tolist()
    [[[1, 0, 0, 0]]]
    >>> semantic_vote([a, b, c], 1).astype(int).tolist()
    [[[1, 1, 1, 0]]]
    """
    arrays = [np.asarray(m) for m in masks]
    if not arrays:
        raise InputError("semantic_vote needs at least one mask, got none")
    for i, a in enumerate(arrays):
        if a.dtype != bool and not np.issubdtype(a.dtype, np.integer):
            raise InputError(
                f"mask {i} must be bool or integer (threshold probabilities first), "
                f"got dtype {a.dtype}"
            )
    shapes = [a.shape for a in arrays]
    if len(set(shapes)) > 1:
        raise InputError(f"masks must all have one shape, got shapes {shapes}")
    if (
        isinstance(vote_threshold, (bool, np.bool_))
        or not isinstance(vote_threshold, (int, np.integer))
        or not 1 <= vote_threshold <= len(arrays)
    ):
        raise ParameterError(
            f"vote_threshold must be an integer in [1, {len(arrays)}], got {vote_threshold!r}"
        )
    votes = np.zeros(shapes[0], np.min_scalar_type(len(arrays)))
    for a in arrays:
        votes += a if a.dtype == bool else a != 0
    return votes >= vote_threshold


# ------------------------------------------------------------------------------- validation


def _validate_views(xy, xz, yz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    views = tuple(np.asarray(v) for v in (xy, xz, yz))
    for name, v in zip(_VIEWS, views):
        if v.ndim != 3:
            raise InputError(f"{name} must be a 3D (Z, Y, X) label volume, got shape {v.shape}")
        if not np.issubdtype(v.dtype, np.integer):
            hint = " (use semantic_vote for masks)" if v.dtype == bool else ""
            raise InputError(f"{name} must hold integer labels, got dtype {v.dtype}{hint}")
    shapes = [v.shape for v in views]
    if len(set(shapes)) > 1:
        raise InputError(
            "xy, xz and yz must have the same (Z, Y, X) shape, got "
            + ", ".join(f"{n} {s}" for n, s in zip(_VIEWS, shapes))
        )
    for name, v in zip(_VIEWS, views):
        if np.issubdtype(v.dtype, np.signedinteger) and v.size and v.min() < 0:
            raise InputError(
                f"{name} has negative labels (min {int(v.min())}); labels must be >= 0"
            )
    return tuple(_compact_if_sparse(v) for v in views)


def _compact_if_sparse(view: np.ndarray) -> np.ndarray:
    """Relabel to 1..n (in order of id) when the largest id is too big for per-id tables.

    >>> _compact_if_sparse(np.array([[[0, 2**40, 7]]])).tolist()
    [[[0, 2, 1]]]
    """
    if not view.size or int(view.max()) <= MAX_DIRECT_LABEL:
        return view
    ids, inverse = np.unique(view, return_inverse=True)
    if ids[0] != 0:
        inverse += 1
    return inverse.reshape(view.shape).astype(np.int64)


# ------------------------------------------------------------------------------ step 1: graph


def detection_graph(views: Sequence[np.ndarray]) -> DetectionGraph:
    """Nodes (objects of every view) and edges (overlaps between views), SPEC step 1.

    Each object is visited once inside its bounding box; the labels of the later views under it
    give a sparse contingency table (a combined int64 key per shared voxel, counted with
    ``np.bincount`` or ``np.unique``).

    Parameters
    ----------
    views : sequence of (Z, Y, X) non-negative integer arrays, one shape
        Ids up to about :data:`MAX_DIRECT_LABEL` (tables are indexed by id;
        :func:`orthoplane_consensus` compacts larger ids first).

    Returns
    -------
    DetectionGraph

    >>> a = np.zeros((1, 1, 4), int); a[0, 0, :2] = 1
    >>> b = np.zeros((1, 1, 4), int); b[0, 0, 1:] = 5
    >>> g = detection_graph([a, b])
    >>> g.label.tolist(), g.size.tolist(), g.pairs.tolist(), g.overlap.tolist(), g.iou.tolist()
    ([1, 5], [2, 3], [[0, 1]], [1], [0.25])
    """
    view_of, label_of, boxes, luts = [], [], [], []
    for v, vol in enumerate(views):
        found = ndi.find_objects(vol) if vol.size else []
        labels = np.array([i + 1 for i, b in enumerate(found) if b is not None], np.int64)
        lut = np.full(len(found) + 1, -1, np.int64)
        lut[labels] = len(label_of) + np.arange(labels.size)
        luts.append(lut)
        view_of.extend([v] * labels.size)
        label_of.extend(labels.tolist())
        boxes.extend(found[i - 1] for i in labels)
    n = len(label_of)
    size = np.zeros(n, np.int64)
    keys: list[list[np.ndarray]] = [[] for _ in views]  # per later view: node * width + label
    widths = [lut.size for lut in luts]
    for node in range(n):
        v, box = view_of[node], boxes[node]
        own = views[v][box] == label_of[node]
        size[node] = np.count_nonzero(own)
        for w in range(v + 1, len(views)):
            under = views[w][box][own]
            under = under[under > 0].astype(np.int64)
            if under.size:
                keys[w].append(node * widths[w] + under)
    pairs, overlap = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)]
    for w, chunks in enumerate(keys):
        if not chunks:
            continue
        key, count = _count_keys(np.concatenate(chunks), n * widths[w])
        pairs.append(np.stack([key // widths[w], luts[w][key % widths[w]]], axis=1))
        overlap.append(count)
    pairs, overlap = np.concatenate(pairs), np.concatenate(overlap)
    iou = overlap / (size[pairs[:, 0]] + size[pairs[:, 1]] - overlap)
    return DetectionGraph(
        np.array(view_of, np.int64), np.array(label_of, np.int64), size, boxes, pairs, overlap, iou
    )


def _count_keys(keys: np.ndarray, table_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and their counts: bincount when the table is small, np.unique otherwise."""
    if table_size <= max(1 << 22, 4 * keys.size):
        counts = np.bincount(keys, minlength=table_size)
        present = np.flatnonzero(counts)
        return present, counts[present]
    return np.unique(keys, return_counts=True)


# ------------------------------------------------------------------------- step 2: clusters


def cluster_detections(graph: DetectionGraph, iou_threshold: float) -> list[np.ndarray]:
    """Group the detections into clusters, SPEC step 2.

    Clusters are the connected components of the edges with IoU > ``iou_threshold`` (0 keeps
    every edge: maximal merging). Clusters linked by a mean pairwise IoU > :data:`MERGE_IOU` or
    a mean overlap > :data:`MERGE_OVERLAP` voxels are then merged by :func:`merge_clusters`.

    Parameters
    ----------
    graph : DetectionGraph
    iou_threshold : float

    Returns
    -------
    list of (k,) int64
        Sorted node indices of each cluster; a node may be in several clusters (see
        :func:`merge_clusters`).

    >>> g = DetectionGraph(np.array([0, 1, 2]), np.array([1, 1, 1]), np.array([10, 10, 10]),
    ...                    [None] * 3, np.array([[0, 1], [1, 2]]), np.array([9, 5]),
    ...                    np.array([0.8, 0.3]))
    >>> [c.tolist() for c in cluster_detections(g, 0.75)]
    [[0, 1, 2]]
    >>> [c.tolist() for c in cluster_detections(g, 0.9)]
    [[0, 1, 2]]
    """
    strong = graph.iou > iou_threshold
    cluster_of = _components(graph.n, graph.pairs[strong])
    members = _group(cluster_of)
    links = _cluster_links(graph, cluster_of, np.array([m.size for m in members], np.int64))
    return merge_clusters(members, links)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component index of each of n nodes, numbered in order of their first node."""
    if n == 0:
        return np.zeros(0, np.int64)
    adj = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(adj, directed=False)
    _, first = np.unique(comp, return_index=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[comp]


def _group(index: np.ndarray) -> list[np.ndarray]:
    """Members (sorted) of each group 0..max(index)."""
    order = np.argsort(index, kind="stable")
    bounds = np.cumsum(np.bincount(index, minlength=int(index.max(initial=-1)) + 1))
    return np.split(order, bounds[:-1]) if index.size else []


def _cluster_links(graph: DetectionGraph, cluster_of: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(p, 2) pairs of clusters whose mean pairwise IoU or mean overlap passes the merge rule."""
    ci, cj = cluster_of[graph.pairs[:, 0]], cluster_of[graph.pairs[:, 1]]
    cross = ci != cj
    if not cross.any():
        return np.zeros((0, 2), np.int64)
    lo, hi = np.minimum(ci, cj)[cross], np.maximum(ci, cj)[cross]
    key, inverse = np.unique(lo * sizes.size + hi, return_inverse=True)
    lo, hi = key // sizes.size, key % sizes.size
    n_pairs = sizes[lo] * sizes[hi]  # pairs without an edge count as 0
    mean_iou = np.bincount(inverse, weights=graph.iou[cross]) / n_pairs
    mean_overlap = np.bincount(inverse, weights=graph.overlap[cross]) / n_pairs
    keep = (mean_iou > MERGE_IOU) | (mean_overlap > MERGE_OVERLAP)
    return np.stack([lo, hi], axis=1)[keep]


def merge_clusters(members: Sequence[np.ndarray], links: np.ndarray) -> list[np.ndarray]:
    """Merge linked clusters by empanada's greedy hub rule (module notes, point 4).

    Repeatedly, the cluster with the most links (ties: lowest index) is the hub. If its largest
    neighbour has more detections than it, the hub is dropped and its detections are added to
    every neighbour; otherwise the hub absorbs all its neighbours, whose other links are dropped.

    Parameters
    ----------
    members : sequence of (k,) int
        Node indices of each cluster.
    links : (p, 2) int
        Linked cluster pairs.

    Returns
    -------
    list of (k,) int64
        Sorted node indices of the surviving clusters, in order of their index.

    A small cluster linking two larger ones is shared out between them; a large hub absorbs
    its smaller neighbours:

    >>> m = [np.array([0, 1]), np.array([2]), np.array([3, 4])]
    >>> [c.tolist() for c in merge_clusters(m, np.array([[0, 1], [1, 2]]))]
    [[0, 1, 2], [2, 3, 4]]
    >>> m = [np.array([0]), np.array([1, 2]), np.array([3])]
    >>> [c.tolist() for c in merge_clusters(m, np.array([[0, 1], [1, 2]]))]
    [[0, 1, 2, 3]]
    """
    clusters = [set(np.asarray(m).tolist()) for m in members]
    alive = [True] * len(clusters)
    links = np.asarray(links, np.int64).reshape(-1, 2)
    for part in _group(_components(len(clusters), links)):
        if part.size > 1:
            _merge_linked(part.tolist(), links, clusters, alive)
    return [np.array(sorted(c), np.int64) for c, a in zip(clusters, alive) if a]


def _merge_linked(part: list, links: np.ndarray, clusters: list, alive: list) -> None:
    """Greedy merge of one connected group of clusters, in place."""
    inside = set(part)
    adj = {c: set() for c in part}
    for a, b in links.tolist():
        if a in inside:
            adj[a].add(b)
            adj[b].add(a)
    while True:
        hub = max(part, key=lambda c: (len(adj[c]), -c))
        if not adj[hub]:
            return
        neighbours = sorted(adj[hub], key=lambda c: (-len(clusters[c]), c))
        if len(clusters[neighbours[0]]) > len(clusters[hub]):
            for c in neighbours:  # the hub is rejected: its detections go to every neighbour
                clusters[c] |= clusters[hub]
                adj[c].discard(hub)
            adj[hub].clear()
            alive[hub] = False
        else:
            for c in neighbours:  # the hub is accepted: it absorbs its neighbours
                clusters[hub] |= clusters[c]
                for other in adj[c]:
                    adj[other].discard(c)
                adj[c].clear()
                alive[c] = False


# ---------------------------------------------------------------------------- step 3: voting


def vote_cluster(
    views: Sequence[np.ndarray], graph: DetectionGraph, nodes: np.ndarray, vote_threshold: int
) -> ObjectMask | None:
    """The voxels covered by at least ``vote_threshold`` of a cluster's detections, SPEC step 3.

    Votes are counted only inside the union of the detections' bounding boxes.

    Parameters
    ----------
    views : sequence of (Z, Y, X) integer arrays
    graph : DetectionGraph
        Built from ``views``.
    nodes : (k,) int
        The cluster's node indices.
    vote_threshold : int

    Returns
    -------
    ObjectMask or None
        Cropped to its voxels; None when no voxel has enough votes.

    >>> a = np.zeros((1, 1, 4), int); a[0, 0, :2] = 1
    >>> b = np.zeros((1, 1, 4), int); b[0, 0, 1:] = 1
    >>> g = detection_graph([a, b])
    >>> vote_cluster([a, b], g, np.array([0, 1]), 2).box
    (slice(0, 1, None), slice(0, 1, None), slice(1, 2, None))
    >>> vote_cluster([a, b], g, np.array([0, 1]), 1).mask.astype(int).tolist()
    [[[1, 1, 1, 1]]]
    """
    nodes = np.asarray(nodes, np.int64)
    voting_views = np.unique(graph.view[nodes])
    if voting_views.size < vote_threshold:
        return None
    box = _hull([graph.boxes[i] for i in nodes])
    votes = np.zeros(_box_shape(box), np.uint8)
    for v in voting_views:
        labels = graph.label[nodes[graph.view[nodes] == v]]
        block = views[v][box]
        votes += block == labels[0] if labels.size == 1 else np.isin(block, labels)
    return _crop(box, votes >= vote_threshold)


# ----------------------------------------------------------------------- step 4: resolution


def union_overlapping(objects: Sequence[ObjectMask]) -> list[ObjectMask]:
    """Union objects that overlap non-trivially, SPEC step 4.

    Objects sharing more than :data:`MERGE_OVERLAP` voxels or with IoU > :data:`MERGE_IOU` are
    joined (transitively); the result keeps the order of each group's first object.

    >>> a = ObjectMask((slice(0, 1), slice(0, 1), slice(0, 3)), np.ones((1, 1, 3), bool))
    >>> b = ObjectMask((slice(0, 1), slice(0, 1), slice(2, 4)), np.ones((1, 1, 2), bool))
    >>> c = ObjectMask((slice(0, 1), slice(0, 1), slice(6, 7)), np.ones((1, 1, 1), bool))
    >>> [(o.box[2], o.size) for o in union_overlapping([a, b, c])]
    [(slice(0, 4, None), 4), (slice(6, 7, None), 1)]
    """
    objects = list(objects)
    pairs, inter = _overlaps(objects)
    if not pairs.size:
        return objects
    sizes = np.array([o.size for o in objects], np.int64)
    iou = inter / (sizes[pairs[:, 0]] + sizes[pairs[:, 1]] - inter)
    joined = pairs[(iou > MERGE_IOU) | (inter > MERGE_OVERLAP)]
    groups = _group(_components(len(objects), joined))
    return [_union([objects[i] for i in group]) for group in groups]


def separate_shared_voxels(objects: Sequence[ObjectMask]) -> list[ObjectMask]:
    """Give each voxel claimed by several objects to the smallest of them (module notes, 7).

    Ties go to the later object. Objects left without voxels are dropped; the others are cropped
    to their remaining voxels.

    >>> a = ObjectMask((slice(0, 1), slice(0, 1), slice(0, 3)), np.ones((1, 1, 3), bool))
    >>> b = ObjectMask((slice(0, 1), slice(0, 1), slice(2, 4)), np.ones((1, 1, 2), bool))
    >>> [(o.box[2], o.size) for o in separate_shared_voxels([a, b])]
    [(slice(0, 2, None), 2), (slice(2, 4, None), 2)]
    """
    objects = list(objects)
    pairs, _ = _overlaps(objects)
    if not pairs.size:
        return objects
    sizes = np.array([o.size for o in objects], np.int64)
    # painting order: larger first, ties by index; a later-painted object keeps the shared voxels
    rank = np.empty(len(objects), np.int64)
    rank[np.lexsort((np.arange(len(objects)), -sizes))] = np.arange(len(objects))
    carved: dict[int, np.ndarray] = {}  # copies of the masks that lose voxels
    for i, j in pairs.tolist():
        loser, winner = (i, j) if rank[i] < rank[j] else (j, i)
        box = _intersect(objects[loser].box, objects[winner].box)
        shared = objects[winner].mask[_local(box, objects[winner].box)]
        mask = carved.setdefault(loser, objects[loser].mask.copy())
        mask[_local(box, objects[loser].box)] &= ~shared
    out = (_crop(o.box, carved[k]) if k in carved else o for k, o in enumerate(objects))
    return [o for o in out if o is not None]


def filter_object_masks(
    objects: Sequence[ObjectMask], min_size: int, min_extent: int
) -> list[ObjectMask]:
    """Drop objects with fewer than ``min_size`` voxels or a box shorter than ``min_extent``.

    The extent is measured along each of Z, Y and X on the object's tight bounding box; an object
    is dropped when any axis is shorter than ``min_extent``.

    >>> flat = ObjectMask((slice(0, 1), slice(0, 3), slice(0, 3)), np.ones((1, 3, 3), bool))
    >>> len(filter_object_masks([flat], 9, 1)), len(filter_object_masks([flat], 10, 1))
    (1, 0)
    >>> len(filter_object_masks([flat], 0, 2))
    0
    """
    keep = []
    for o in objects:
        tight = o if _is_tight(o.mask) else _crop(o.box, o.mask)
        if tight is None or tight.size < min_size or min(tight.mask.shape) < min_extent:
            continue
        keep.append(tight)
    return keep


def paint_by_first_appearance(objects: Sequence[ObjectMask], shape: tuple) -> np.ndarray:
    """Paint disjoint objects into an int32 volume with ids 1..N by first appearance (C order).

    >>> a = ObjectMask((slice(0, 1), slice(1, 2), slice(0, 1)), np.ones((1, 1, 1), bool))
    >>> b = ObjectMask((slice(0, 1), slice(0, 1), slice(2, 3)), np.ones((1, 1, 1), bool))
    >>> paint_by_first_appearance([a, b], (1, 2, 3)).tolist()
    [[[0, 0, 1], [2, 0, 0]]]
    """
    out = np.zeros(shape, np.int32)
    firsts = [_first_voxel(o, shape) for o in objects]
    for new_id, k in enumerate(np.argsort(np.array(firsts, np.int64), kind="stable"), start=1):
        box, mask = objects[k]
        np.copyto(out[box], new_id, where=mask)
    return out


def _first_voxel(obj: ObjectMask, shape: tuple) -> int:
    local = np.unravel_index(int(np.argmax(obj.mask)), obj.mask.shape)
    return int(np.ravel_multi_index(tuple(s.start + i for s, i in zip(obj.box, local)), shape))


# -------------------------------------------------------------------------- boxes and masks


def _box_shape(box: _Box) -> tuple:
    return tuple(s.stop - s.start for s in box)


def _hull(boxes: Sequence[_Box]) -> _Box:
    return tuple(
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)
    )


def _intersect(a: _Box, b: _Box) -> _Box:
    return tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))


def _local(box: _Box, within: _Box) -> _Box:
    """``box`` in the coordinates of the array that covers ``within``."""
    return tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(box, within))


def _crop(box: _Box, mask: np.ndarray) -> ObjectMask | None:
    """The mask cropped to its True voxels, or None when it has none."""
    found = ndi.find_objects(mask.view(np.uint8))
    if not found:
        return None
    sub = found[0]
    return ObjectMask(
        tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, sub)), mask[sub]
    )


def _is_tight(mask: np.ndarray) -> bool:
    """True when the mask has voxels on all six faces of its box (so the box is its bounding box).

    >>> _is_tight(np.ones((1, 2, 2), bool)), _is_tight(np.array([[[True, False]]]))
    (True, False)
    """
    if not mask.size:
        return False
    for axis in range(mask.ndim):
        ends = np.take(mask, [0, mask.shape[axis] - 1], axis=axis)
        if not ends.any(axis=tuple(a for a in range(mask.ndim) if a != axis)).all():
            return False
    return True


def _union(objects: Sequence[ObjectMask]) -> ObjectMask:
    if len(objects) == 1:
        return objects[0]
    box = _hull([o.box for o in objects])
    mask = np.zeros(_box_shape(box), bool)
    for o in objects:
        mask[_local(o.box, box)] |= o.mask
    return ObjectMask(box, mask)


def _overlaps(objects: Sequence[ObjectMask]) -> tuple[np.ndarray, np.ndarray]:
    """(p, 2) pairs ``i < j`` of objects sharing voxels and their shared voxel counts."""
    if len(objects) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    lo = np.array([[s.start for s in o.box] for o in objects])
    hi = np.array([[s.stop for s in o.box] for o in objects])
    pairs, inter = [], []
    step = 512
    for s in range(0, len(objects), step):
        rows = slice(s, s + step)
        hit = np.all((lo[rows, None] < hi[None]) & (lo[None] < hi[rows, None]), axis=2)
        for i, j in np.argwhere(hit).tolist():
            i += s
            if j <= i:
                continue
            box = _intersect(objects[i].box, objects[j].box)
            a, b = objects[i], objects[j]
            count = np.count_nonzero(a.mask[_local(box, a.box)] & b.mask[_local(box, b.box)])
            if count:
                pairs.append((i, j))
                inter.append(count)
    return np.array(pairs, np.int64).reshape(-1, 2), np.array(inter, np.int64)


# ------------------------------------------------------------ the same from voxel counts alone


def compact_labels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of an integer array and each element's index into them
    (as ``np.unique(values, return_inverse=True)``), by a lookup table when the values are
    few and small (no sort: labels of a block), else by sorting.

    >>> ids, index = compact_labels(np.array([[7, 0], [7, 3]]))
    >>> ids.tolist(), index.tolist()
    ([0, 3, 7], [[2, 0], [2, 1]])
    """
    values = np.asarray(values)
    if values.size and values.dtype.kind in "iu":
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi <= 4 * values.size + (1 << 16):
            present = np.bincount(values.reshape(-1), minlength=hi + 1) > 0
            lut = np.cumsum(present) - 1
            return np.flatnonzero(present).astype(np.int64), lut[values]
    ids, index = np.unique(values, return_inverse=True)
    return ids.astype(np.int64), index.reshape(values.shape)


def combination_counts(xy: np.ndarray, xz: np.ndarray, yz: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(xy, xz, yz)`` label combinations of the voxels that some view labels,
    as (n, 3) int64 rows in ascending order, and how many voxels each has.

    Counts of pieces of a volume add up to the counts of the whole (merge equal rows), which is
    what lets :func:`consensus_of_counts` decide for a volume seen a block at a time.

    >>> a = np.array([[[1, 1, 0, 2]]]); b = np.array([[[3, 0, 0, 3]]])
    >>> keys, counts = combination_counts(a, b, b)
    >>> keys.tolist(), counts.tolist()
    ([[1, 0, 0], [1, 3, 3], [2, 3, 3]], [1, 1, 1])
    """
    cols = [np.asarray(v).reshape(-1) for v in (xy, xz, yz)]
    fg = (cols[0] != 0) | (cols[1] != 0) | (cols[2] != 0)
    if not fg.any():
        return np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
    # each column's ids compacted, then one int64 key per voxel (a 1D sort, not a row sort)
    ids, key = [], np.zeros(int(fg.sum()), np.int64)
    for c in cols:
        u, inv = compact_labels(c[fg])
        ids.append(u)
        key = key * u.size + inv
    key, counts = np.unique(key, return_counts=True)
    n1, n2 = ids[1].size, ids[2].size
    keys = np.stack([ids[0][key // (n1 * n2)], ids[1][(key // n2) % n1], ids[2][key % n2]],
                    axis=1)
    return keys, counts.astype(np.int64)


def consensus_of_counts(keys: np.ndarray, counts: np.ndarray,
                        params: ConsensusParams = ConsensusParams()) -> np.ndarray:
    """:func:`orthoplane_consensus` decided from :func:`combination_counts` of the whole
    volume: for each row of ``keys``, the consensus object its voxels go to (0, 1, ... in the
    order :func:`orthoplane_consensus` makes them, before its filters and numbering), or -1.

    Every decision of the consensus depends on the voxels only through these counts: the
    detections' sizes and overlaps (steps 1-2), each voxel's votes (the views whose detection
    there is in the cluster, step 3), the voted objects' sizes and overlaps (step 4) and who
    keeps a shared voxel (the smallest, step 7). Painting each row's voxels with its object
    and then applying the Min Size / Min Box Extent filters and numbering by first appearance
    gives :func:`orthoplane_consensus`'s labels (tests/test_consensus.py).

    >>> a = np.zeros((4, 4, 4), np.uint16); a[1:3, 1:3, 1:3] = 1
    >>> xy = a.copy(); xy[0, 0, 3] = 2
    >>> keys, counts = combination_counts(xy, a, a)
    >>> keys.tolist(), consensus_of_counts(keys, counts).tolist()
    ([[1, 1, 1], [2, 0, 0]], [0, -1])
    """
    if not isinstance(params, ConsensusParams):
        raise ParameterError(f"params must be ConsensusParams, got {type(params).__name__}")
    keys = np.asarray(keys, np.int64).reshape(-1, 3)
    counts = np.asarray(counts, np.int64).reshape(-1)
    owner = np.full(len(keys), -1, np.int64)
    if not len(keys):
        return owner
    # step 1: the detection graph (nodes by view, then label, as detection_graph numbers them)
    node_of = np.full(keys.shape, -1, np.int64)
    view_of, label_of = [], []
    for v in range(3):
        labels = np.unique(keys[:, v])
        labels = labels[labels > 0]
        has = keys[:, v] > 0
        node_of[has, v] = len(label_of) + np.searchsorted(labels, keys[has, v])
        view_of.extend([v] * labels.size)
        label_of.extend(labels.tolist())
    n = len(label_of)
    size = np.zeros(n, np.int64)
    for v in range(3):
        has = node_of[:, v] >= 0
        size += np.bincount(node_of[has, v], weights=counts[has], minlength=n).astype(np.int64)
    pairs, overlap = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.int64)]
    for w in (1, 2):  # per later view, pairs ordered by (node, node of w) as detection_graph
        for_w = []
        for v in range(w):
            both = (node_of[:, v] >= 0) & (node_of[:, w] >= 0)
            for_w.append(np.stack([node_of[both, v], node_of[both, w], counts[both]], axis=1))
        rows = np.concatenate(for_w)
        if not len(rows):
            continue
        key, inverse = np.unique(rows[:, 0] * n + rows[:, 1], return_inverse=True)
        pairs.append(np.stack([key // n, key % n], axis=1))
        overlap.append(np.bincount(inverse.reshape(-1), weights=rows[:, 2]).astype(np.int64))
    pairs, overlap = np.concatenate(pairs), np.concatenate(overlap)
    iou = overlap / (size[pairs[:, 0]] + size[pairs[:, 1]] - overlap)
    graph = DetectionGraph(np.array(view_of, np.int64), np.array(label_of, np.int64), size,
                           [None] * n, pairs, overlap, iou)
    # step 2: clusters
    min_cluster = 1 if params.allow_one_view else 2
    maximal = params.vote_threshold < min_cluster
    clusters = [c for c in cluster_detections(graph, 0.0 if maximal else CLUSTER_IOU)
                if len(c) >= min_cluster]
    # step 3: votes. (row, cluster) for every view whose detection at the row is in the cluster
    member_rows, member_clusters = [], []
    for k, c in enumerate(clusters):
        if np.unique(graph.view[c]).size < params.vote_threshold:
            continue  # too few views voted: no object
        in_c = np.zeros(n, bool)
        in_c[c] = True
        votes = np.zeros(len(keys), np.int64)
        for v in range(3):
            has = node_of[:, v] >= 0
            votes[has] += in_c[node_of[has, v]]
        rows = np.flatnonzero(votes >= params.vote_threshold)
        if rows.size:
            member_rows.append(rows)
            member_clusters.append(np.full(rows.size, len(member_clusters), np.int64))
    if not member_rows:
        return owner
    rows, objects = np.concatenate(member_rows), np.concatenate(member_clusters)
    n_obj = len(member_rows)
    # step 4 (module notes 6): union objects that overlap non-trivially
    group = _component_of_overlaps(rows, objects, counts, n_obj)
    rows, objects = _unique_pairs(rows, group[objects])
    # module notes 7: a voxel claimed by several objects goes to the smallest (ties: later)
    n_groups = int(group.max()) + 1
    sizes = np.bincount(objects, weights=counts[rows], minlength=n_groups)
    rank = np.empty(n_groups, np.int64)
    rank[np.lexsort((np.arange(n_groups), -sizes))] = np.arange(n_groups)
    best = np.lexsort((rank[objects], rows))  # by row, then rank: the last of a row wins
    last = np.r_[rows[best][1:] != rows[best][:-1], True]
    owner[rows[best][last]] = objects[best][last]
    return owner


def _unique_pairs(rows: np.ndarray, objects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (row, object) pairs, sorted by row then object."""
    pairs = np.unique(np.stack([rows, objects], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _component_of_overlaps(rows: np.ndarray, objects: np.ndarray, counts: np.ndarray,
                           n_obj: int) -> np.ndarray:
    """The group of each voted object after :func:`union_overlapping`'s rule, from the rows
    each covers: objects sharing more than :data:`MERGE_OVERLAP` voxels or with IoU above
    :data:`MERGE_IOU` are one group (transitively), groups numbered by their first object."""
    sizes = np.bincount(objects, weights=counts[rows], minlength=n_obj)
    order = np.lexsort((objects, rows))
    rows, objects = rows[order], objects[order]
    # pairs (i < j) of objects on the same row, with that row's voxels
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    ends = np.r_[starts[1:], rows.size]
    pi, pj, pc = [], [], []
    for s, e in zip(starts[(ends - starts) > 1], ends[(ends - starts) > 1]):
        objs = objects[s:e]
        i, j = np.triu_indices(objs.size, 1)
        pi.append(objs[i])
        pj.append(objs[j])
        pc.append(np.full(i.size, counts[rows[s]], np.int64))
    if not pi:
        return np.arange(n_obj, dtype=np.int64)
    key, inverse = np.unique(np.concatenate(pi) * n_obj + np.concatenate(pj),
                             return_inverse=True)
    inter = np.bincount(inverse.reshape(-1), weights=np.concatenate(pc))
    pairs = np.stack([key // n_obj, key % n_obj], axis=1)
    iou = inter / (sizes[pairs[:, 0]] + sizes[pairs[:, 1]] - inter)
    joined = pairs[(iou > MERGE_IOU) | (inter > MERGE_OVERLAP)]
    return _components(n_obj, joined)
