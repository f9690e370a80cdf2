"""Proofreading edits and the training set (pure numpy), and few-shot fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest

from nbapp.errors import InputError, ParameterError
from nbapp.proofread import LabelEditor, TrainingSet


def two_objects():
    lab = np.zeros((20, 30), np.int32)
    lab[2:8, 2:10] = 1
    lab[10:16, 15:25] = 2
    return lab


def test_delete_removes_the_clicked_object_only():
    ed = LabelEditor(two_objects())
    out = ed.delete(4, 5)
    assert not (out == 1).any() and (out == 2).sum() == 60
    assert ed.delete(0, 29) is out  # background: no change, no edit
    assert ed.edits == 1


def test_merge_gives_the_second_object_the_first_ones_id():
    ed = LabelEditor(two_objects())
    out = ed.merge((4, 5), (12, 20))
    assert set(np.unique(out)) == {0, 1} and (out == 1).sum() == 48 + 60
    assert ed.merge((4, 5), (0, 0)) is out  # background as the second: nothing


def test_paint_on_background_makes_a_new_object_and_never_overwrites():
    ed = LabelEditor(two_objects())
    out = ed.paint([(18, 2), (18, 12)], radius=1)
    assert (out == 3).sum() > 0 and set(np.unique(out)) == {0, 1, 2, 3}
    ys, xs = np.nonzero(out == 3)
    assert xs.min() <= 2 and xs.max() >= 12  # the stroke is continuous from end to end
    before = out.copy()
    # starts on background left of object 2 and crosses it (issue 31: the old stroke crossed
    # nothing, so a brush that overwrote objects passed)
    out = ed.paint([(12, 12), (12, 28)], radius=2)
    assert ((before > 0) & (out != before)).sum() == 0  # painted pixels never overwrite objects
    assert (out == 2).sum() == 60 and (out[10:16, 15:25] == 2).all()
    ys, xs = np.nonzero(out == 4)
    assert xs.min() <= 13 and xs.max() >= 26  # painted on both sides of it


def test_paint_starting_on_an_object_extends_it():
    ed = LabelEditor(two_objects())
    out = ed.paint([(5, 9), (5, 14)], radius=1)
    assert (out == 1).sum() > 48 and out[5, 13] == 1 and out.max() == 2


def test_erase_and_undo():
    ed = LabelEditor(two_objects())
    ed.erase([(12, 15), (12, 24)], radius=1)
    assert (ed.labels[11:14, 15:25] == 0).all() and ed.changed
    ed.undo()
    np.testing.assert_array_equal(ed.labels, two_objects())
    assert ed.edits == 0 and not ed.changed
    ed.undo()  # nothing left: no-op
    np.testing.assert_array_equal(ed.labels, two_objects())


def test_editor_refuses_non_label_images():
    with pytest.raises(InputError, match="2D integer label image"):
        LabelEditor(np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="2D integer label image"):
        LabelEditor(np.zeros((2, 4, 4), np.int32))


def test_training_set_stores_replaces_and_lists(tmp_path):
    ts = TrainingSet(tmp_path / "t")
    assert ts.summary() == "no slices stored" and ts.slices() == []
    img = np.arange(600, dtype=np.uint8).reshape(20, 30)
    p1 = ts.add(img, two_objects(), np.zeros((20, 30), np.int32), data="vol.tif", plane="xy",
                index=3, downsampling=2)
    ts.add(img, two_objects(), data="vol.tif", plane="xz", index=3)
    again = ts.add(img, two_objects()[:, ::-1].copy(), data="vol.tif", plane="xy", index=3)
    assert again == p1  # the same slice replaces its earlier copy
    slices = ts.slices()
    assert len(slices) == 2 and ts.summary() == "2 slice(s), 4 objects"
    first = next(s for s in slices if s.path == p1)
    np.testing.assert_array_equal(first.labels, two_objects()[:, ::-1])
    np.testing.assert_array_equal(first.image, img)
    assert first.meta["plane"] == "xy" and first.meta["index"] == 3
    assert not list((tmp_path / "t").glob(".*part"))
    ts.remove(p1)
    assert len(ts.slices()) == 1
    with pytest.raises(InputError, match="not in the training set"):
        ts.remove(tmp_path / "elsewhere.npz")


def test_training_set_refusals(tmp_path, readonly_dir):
    with pytest.raises(InputError, match="one shape"):
        TrainingSet(tmp_path).add(np.zeros((4, 4)), np.zeros((4, 5), np.int32))
    with pytest.raises(InputError, match="cannot create the training folder"):
        TrainingSet(readonly_dir / "t").add(np.zeros((4, 4)), np.zeros((4, 4), np.int32))


def test_broken_training_file_is_skipped(tmp_path):
    ts = TrainingSet(tmp_path)
    ts.add(np.zeros((8, 8)), np.ones((8, 8), np.int32), data="a")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert len(ts.slices()) == 1


# --------------------------------------------------------------------------------------------
# fine-tuning


@pytest.fixture(scope="module")
def demo_slices():
    from nbapp.samples import demo_volume

    img, lab = demo_volume(shape=(8, 128, 128), n_mito=4)
    return img, lab


def test_finetune_trains_saves_and_loads(tmp_path, demo_slices):
    from nbapp.fewshot import FinetuneParams, finetune
    from nbapp.models import load_model

    img, lab = demo_slices
    seen = []
    res = finetune([img[2], img[5]], [lab[2], lab[5]], "default",
                   params=FinetuneParams(max_steps=30, patch=96, batch_size=2, minutes=5),
                   out=tmp_path, name="mine", progress=lambda *a: seen.append(a))
    assert res.steps == 30 and res.stopped == "done" and len(res.losses) == 30
    assert [s[0] for s in seen] == list(range(1, 31)) and seen[-1][2]["loss"] == res.losses
    assert res.config == tmp_path / "mine.yaml" and (tmp_path / "mine.pt").is_file()
    again = load_model(str(res.config), device="cpu")  # what --model and empanada load
    assert again.config.name == "mine" and "fine-tuned by nbapp from default" in \
        again.config.description
    assert again.config.pixel_size_nm == 10  # the default's, as no pixel size was given
    from nbapp.inference import SliceSegmenter

    out = SliceSegmenter(again)(img[2])
    assert out.shape == img[2].shape


def test_finetune_learns_a_deleted_object_is_not_one(tmp_path, demo_slices):
    """The proofreading loop in small: the user deletes an object the model found; after a
    short fine-tune with the corrected pixels weighted, the model's foreground probability on
    that object falls (it can fail: without training it does not move)."""
    from nbapp.engine import Engine
    from nbapp.fewshot import FinetuneParams, corrected_weights, finetune
    from nbapp.models import load_model

    img, lab = demo_slices
    image, truth = img[4], lab[4]
    ids, sizes = np.unique(truth[truth > 0], return_counts=True)
    gone = ids[np.argmax(sizes)]
    corrected = np.where(truth == gone, 0, truth)
    default = load_model("default", device="cpu")

    def fg(model):
        return float(Engine(model).infer(image)[0].sem[0][truth == gone].mean())

    before = fg(default)
    res = finetune(image, corrected, "default", weights=corrected_weights(corrected, truth, 4.0),
                   params=FinetuneParams(max_steps=40, patch=128, batch_size=2, held_out=0),
                   out=tmp_path)
    after = fg(res.model)
    assert before > 0.5 and after < 0.5 * before, (before, after)


def test_finetune_can_continue_from_its_own_result(tmp_path, demo_slices):
    from nbapp.fewshot import FinetuneParams, finetune

    img, lab = demo_slices
    p = FinetuneParams(max_steps=3, patch=64, batch_size=1)
    first = finetune(img[1], lab[1], "default", params=p, out=tmp_path, name="a")
    second = finetune(img[1], lab[1], str(first.config), params=p, out=tmp_path, name="b",
                      pixel_size_nm=4.0)
    assert second.steps == 3 and second.model.config.pixel_size_nm == 4.0


def test_finetune_stops_when_cancelled(tmp_path, demo_slices):
    import threading

    from nbapp.fewshot import FinetuneParams, finetune

    img, lab = demo_slices
    cancel = threading.Event()

    def progress(step, total, detail):
        if step == 2:
            cancel.set()

    res = finetune(img[1], lab[1], "default", params=FinetuneParams(patch=64, batch_size=1),
                   out=tmp_path, progress=progress, cancel=cancel)
    assert res.steps == 2 and res.stopped == "cancelled" and res.config.is_file()


def test_held_out_band_takes_the_edge_with_most_objects_or_none():
    from nbapp.fewshot import held_out_band

    lab = np.zeros((200, 300), np.int32)
    lab[5:15, 100:110], lab[5:15, 140:150] = 1, 2    # two objects at the top
    lab[190:198, 120:130] = 3                        # one at the bottom
    keep, band = held_out_band(lab, 0.2)
    assert lab[band].shape == (48, 300) and set(np.unique(lab[band])) == {0, 1, 2}
    assert lab[keep].shape == (152, 300) and not np.isin([1, 2], lab[keep]).any()
    lab[:] = 0
    lab[90:110, 280:299] = 4                         # only near the right edge
    keep, band = held_out_band(lab, 0.2)
    assert lab[band].shape == (200, 60) and 4 in lab[band] and lab[keep].shape == (200, 240)
    assert held_out_band(lab, 0.0) is None           # switched off
    lab[:] = 0
    lab[95:105, 145:155] = 5                         # in the middle: no band holds an object
    assert held_out_band(lab, 0.2) is None
    assert held_out_band(np.ones((60, 60), np.int32), 0.2) is None  # 48 > half of 60
    lab[:] = 0
    lab[150:196, 120:130] = 6                        # cut by a 48-px bottom band's inner edge
    assert held_out_band(lab, 0.2) is None
    # downsampling 2: the band is at least 48 model pixels = 96 image pixels
    lab = np.zeros((300, 300), np.int32)
    lab[280:290, 100:110] = 1
    assert held_out_band(lab, 0.2, 2)[1][0] == slice(204, 300)


def test_held_out_scores_see_context_and_leave_out_objects_the_band_cuts():
    """A band's objects cut by its inner edge are pieces, not objects: counted, a model that
    misses only the cut one would score F1 0.8 here; the context beyond the edge is segmented,
    not scored."""
    from nbapp.fewshot import _split_held_out, score_held_out

    class Oracle:  # a "model" whose result is the truth: only the scoring is under test
        pass

    lab = np.zeros((200, 120), np.int32)
    lab[185:195, 10:20], lab[185:195, 50:60] = 1, 2     # whole, in the bottom band
    lab[140:160, 90:100] = 3                            # cut by the band's inner edge (152)
    img = np.zeros_like(lab, np.uint8)
    train, bands = _split_held_out([(img, lab, None)], 0.2, 1)
    (im, la, band, edge), = bands
    assert train[0][0].shape == (152, 120) and im.shape == (96, 120)  # band + as much context
    assert band == (slice(48, 96), slice(None)) and np.array_equal(la[band], lab[152:])
    assert edge == (0, slice(None))  # the band's first row faces the context

    import nbapp.inference as inference

    class Seg:
        def __init__(self, model):
            pass

        def __call__(self, image, params):
            return np.where(la == 3, 0, la)  # misses the object the band's edge cuts

    real = inference.SliceSegmenter
    inference.SliceSegmenter = Seg
    try:
        m = score_held_out(Oracle(), bands)
        assert m["f1"] == 1.0 and m["precision"] == 1.0
        assert np.isin(3, la)  # the stored band keeps its labels for the next scoring
        m = score_held_out(Oracle(), bands)
        assert m["f1"] == 1.0
    finally:
        inference.SliceSegmenter = real


def test_finetune_never_returns_a_model_worse_on_the_held_out_band(tmp_path, demo_slices):
    """Issue 30 item 8: a fine-tune that hurts (here a learning rate that wrecks the network)
    returns the starting model, scored on a band of the slice it never trained on; without the
    band it returns the wrecked one."""
    from nbapp.fewshot import FinetuneParams, finetune
    from nbapp.inference import SliceSegmenter
    from nbapp.models import load_model

    img, lab = demo_slices
    start = SliceSegmenter(load_model("default", device="cpu"))(img[6])
    p = dict(max_steps=6, patch=64, batch_size=2, lr=50.0, warmup_steps=1, val_every=3)
    seen = []
    res = finetune(img[2], lab[2], "default", out=tmp_path, name="kept",
                   params=FinetuneParams(**p), progress=lambda *a: seen.append(a[2]["held_out"]))
    held = res.held_out
    assert held["slices"] == 1 and held["objects"] >= 1 and held["start"]["f1"] > 0.5
    assert [s for s, _ in held["curve"]] == [0, 3, 6]
    assert max(f for _, f in held["curve"][1:]) < held["start"]["f1"]
    assert res.kept_start and held["best"] == held["start"] and res.steps == 6
    assert seen[-1] is held
    np.testing.assert_array_equal(SliceSegmenter(res.model)(img[6]), start)
    assert "held-out bands of 1 slice(s)" in res.model.config.description
    assert held["on"] == "held-out bands"
    wrecked = finetune(img[2], lab[2], "default", out=tmp_path, name="wrecked",
                       params=FinetuneParams(**p, held_out=0))
    assert wrecked.held_out is None and not wrecked.kept_start
    assert not np.array_equal(SliceSegmenter(wrecked.model)(img[6]), start)


def test_finetune_on_slices_too_small_for_a_band_chooses_on_what_it_trained_on(tmp_path,
                                                                             demo_slices):
    from nbapp.fewshot import FinetuneParams, finetune, held_out_text
    from nbapp.inference import SliceSegmenter
    from nbapp.models import load_model

    img, lab = demo_slices
    small, small_lab = img[2][:80, :80], lab[2][:80, :80]  # 48 > half of 80: no band
    assert small_lab.max() > 0
    start = SliceSegmenter(load_model("default", device="cpu"))(img[6])
    res = finetune(small, small_lab, "default", out=tmp_path,
                   params=FinetuneParams(max_steps=4, patch=64, batch_size=2, lr=50.0,
                                         warmup_steps=1, val_every=2))
    assert res.held_out["on"] == "trained slices" and res.kept_start
    np.testing.assert_array_equal(SliceSegmenter(res.model)(img[6]), start)
    assert "the 1 slice(s) it trained on" in held_out_text(res.held_out)
    assert "too small for a held-out band" in held_out_text(res.held_out)


def test_finetune_keeps_the_best_weights_and_stops_without_gain(tmp_path, demo_slices):
    from nbapp.fewshot import FinetuneParams, finetune

    img, lab = demo_slices
    res = finetune(img[2], lab[2], "default", out=tmp_path, snapshot_steps=(1, 2),
                   params=FinetuneParams(max_steps=50, patch=64, batch_size=2, lr=50.0,
                                         warmup_steps=1, val_every=1, patience=2))
    assert res.stopped == "no gain" and res.steps == 2  # two scorings without a better one
    assert sorted(res.snapshots) == [1, 2] and res.kept_start
    import torch

    from nbapp.training.start import load_init

    start = load_init("default")["state_dict"]
    for snap in res.snapshots.values():  # the best so far: still the start's weights
        assert all(torch.equal(snap[k], start[k]) for k in start if "conv" in k and
                   k.endswith("weight"))


def test_corrected_pixels_weigh_more(demo_slices):
    from nbapp.fewshot import corrected_weights

    _, lab = demo_slices
    pred = lab[1].copy()
    pred[:10] = 0
    w = corrected_weights(lab[1], pred, 5.0)
    assert set(np.unique(w)) <= {1.0, 5.0}
    assert (w == 5.0).sum() == ((lab[1][:10] > 0)).sum()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"images": [], "labels": []}, InputError, "at least one labelled slice"),
    ({"labels": [np.zeros((32, 32), np.int32)]}, InputError, "no objects"),
    ({"labels": [np.ones((32, 30), np.int32)]}, InputError, "one shape"),
    ({"labels": [np.ones((32, 32), np.float32)]}, InputError, "must be integers"),
    ({"images": [np.zeros((8, 8))], "labels": [np.ones((8, 8), np.int32)]}, InputError,
     "too small"),
    ({"labels": [np.ones((32, 32), np.int32)] * 2}, InputError, "1 images but 2"),
    ({"images": "x.tif"}, InputError, "must be a 2D image"),
    ({"init": "MitoNet_like.pt"}, ParameterError, "no such file"),
])
def test_finetune_refusals(kwargs, error, match):
    from nbapp.fewshot import finetune

    args = {"images": [np.zeros((32, 32), np.uint8)], "labels": [np.ones((32, 32), np.int32)],
            "init": "default"}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        finetune(args["images"], args["labels"], args["init"], minutes=0.01)


@pytest.mark.parametrize("field, value, match", [
    ("minutes", 0, "minutes"), ("patch", 100, "multiple of 32"), ("batch_size", 0, "batch_size"),
    ("lr", 0, "lr"), ("corrected_weight", 0.5, "corrected_weight"),
    ("downsampling", 3, "downsampling"), ("max_steps", 0, "max_steps"),
    ("held_out", 0.6, "held_out"), ("held_out", -0.1, "held_out"),
    ("val_every", 0, "val_every"), ("patience", -1, "patience"),
])
def test_finetune_params_are_checked(field, value, match):
    from nbapp.fewshot import FinetuneParams

    with pytest.raises(ParameterError, match=match):
        FinetuneParams(**{field: value})


def test_zoo_models_of_other_architectures_are_refused_before_any_download(monkeypatch,
                                                                           tmp_path):
    from nbapp.fewshot import finetune

    monkeypatch.setenv("NBAPP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ParameterError, match="MitoNet_v1 cannot be fine-tuned here"):
        finetune(np.zeros((32, 32), np.uint8), np.ones((32, 32), np.int32), "MitoNet_v1")
    assert not (tmp_path / "cache").exists()


def test_cli_finetune_writes_a_model_and_scores_it(tmp_path, demo_slices, capsys):
    import tifffile

    from nbapp import cli
    from nbapp.models import load_model

    img, lab = demo_slices
    tifffile.imwrite(tmp_path / "train.tif", img[:2])
    tifffile.imwrite(tmp_path / "train_lab.tif", lab[:2])
    tifffile.imwrite(tmp_path / "test.tif", img[6])
    tifffile.imwrite(tmp_path / "test_lab.tif", lab[6])
    code = cli.main(["finetune", "--images", str(tmp_path / "train.tif"), "--labels",
                     str(tmp_path / "train_lab.tif"), "--minutes", "0.05", "--out",
                     str(tmp_path / "m"), "--name", "mine", "--test-images",
                     str(tmp_path / "test.tif"), "--test-labels", str(tmp_path / "test_lab.tif")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "before: F1@0.5" in err and "after: F1@0.5" in err and "on 1 test slice" in err
    assert "held-out bands of 2 slice(s)" in err
    assert load_model(str(tmp_path / "m" / "mine.yaml"), device="cpu").config.name == "mine"
    code = cli.main(["finetune", "--images", str(tmp_path / "train.tif"), "--labels",
                     str(tmp_path / "train_lab.tif"), str(tmp_path / "x.tif"), "--out",
                     str(tmp_path / "m")])
    assert code == 2 and "one --labels file per --images file" in capsys.readouterr().err
    code = cli.main(["finetune", "--images", str(tmp_path / "train.tif"), "--labels",
                     str(tmp_path / "train_lab.tif"), "--held-out", "0.7", "--out",
                     str(tmp_path / "m")])
    assert code == 2 and "held_out must be a share of each slice" in capsys.readouterr().err


def test_finetune_budget_is_training_time_and_no_step_is_an_error(tmp_path, demo_slices,
                                                                  monkeypatch, capsys):
    """Issue 30 item 7: set-up counted inside --minutes, and --minutes 0.5 trained 0 steps,
    wrote a model and exited 0."""
    import time as _time

    import tifffile

    import nbapp.training.start as start
    from nbapp import cli
    from nbapp.fewshot import FinetuneParams, finetune

    img, lab = demo_slices
    slow = start.load_init

    def slow_setup(spec):  # a set-up longer than the whole budget
        _time.sleep(1.5)
        return slow(spec)

    monkeypatch.setattr(start, "load_init", slow_setup)
    res = finetune(img[1], lab[1], "default", out=tmp_path,
                   params=FinetuneParams(patch=64, batch_size=1, minutes=0.02, max_steps=3))
    assert res.steps >= 1
    monkeypatch.setattr(start, "load_init", slow)
    with pytest.raises(ParameterError, match="no training step fitted in 1e-09 min"):
        finetune(img[1], lab[1], "default", out=tmp_path / "none",
                 params=FinetuneParams(patch=64, batch_size=1, minutes=1e-9))
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())
    tifffile.imwrite(tmp_path / "train.tif", img[:1])
    tifffile.imwrite(tmp_path / "train_lab.tif", lab[:1])
    code = cli.main(["finetune", "--images", str(tmp_path / "train.tif"), "--labels",
                     str(tmp_path / "train_lab.tif"), "--minutes", "1e-9", "--out",
                     str(tmp_path / "cli"), "--name", "zero"])
    err = capsys.readouterr().err
    assert code == 2 and "no training step fitted" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli" / "zero.yaml").exists()


# --- issue 31: what mutmut's survivors showed the tests above did not pin down -----------------

def test_brush_disks_and_stroke_lines_are_exact():
    from nbapp.proofread import _disk, _line

    assert _disk(0).tolist() == [[True]]
    assert _disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert _disk(2).astype(int).tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1],
                                             [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    assert _disk(1.5)[1:4, 1:4].all() and _disk(1.5).sum() == 9
    # one point per pixel step, both ends included, from anywhere (not only the origin)
    assert _line((2, 1), (5, 7)) == [(2, 1), (2, 2), (3, 3), (4, 4), (4, 5), (4, 6), (5, 7)]
    assert _line((7, 3), (4, 3)) == [(7, 3), (6, 3), (5, 3), (4, 3)]
    assert _line((3, 3), (3, 3)) == [(3, 3)]


def test_painting_at_the_image_edges_and_from_outside_it():
    ed = LabelEditor(np.zeros((8, 10), np.int32))
    out = ed.paint([(0, 5)], radius=1)  # on the top edge: the disk is cut, not lost
    assert out[0, 4:7].tolist() == [1, 1, 1] and out[1, 5] == 1 and out.sum() == 4
    ed = LabelEditor(np.zeros((8, 10), np.int32))
    out = ed.paint([(4, 0)], radius=1)  # on the left edge
    assert out[3:6, 0].tolist() == [1, 1, 1] and out[4, 1] == 1 and out.sum() == 4
    ed = LabelEditor(np.zeros((8, 10), np.int32))
    # a stroke that starts outside the image and comes in paints the part inside
    out = ed.paint([(4, -6), (4, 4)], radius=0, label=3)
    assert out[4].tolist() == [3, 3, 3, 3, 3, 0, 0, 0, 0, 0] and (out > 0).sum() == 5
    ed = LabelEditor(np.zeros((8, 10), np.int32))
    out = ed.paint([(4, 4)], radius=1)  # an interior point: the disk, centred
    want = np.zeros((8, 10), np.int32)
    want[3:6, 4] = want[4, 3:6] = 1
    np.testing.assert_array_equal(out, want)


def test_ids_under_points_at_and_beyond_every_edge():
    lab = np.arange(1, 13, dtype=np.int32).reshape(3, 4)
    ed = LabelEditor(lab)
    assert ed.id_at(0, 0) == 1 and ed.id_at(2, 3) == 12 and ed.id_at(0, 3) == 4
    for y, x in ((-1, 0), (0, -1), (3, 0), (0, 4), (-1, 9)):
        assert ed.id_at(y, x) == 0
    assert LabelEditor(np.zeros((0, 3), np.int32)).new_id() == 1
    assert LabelEditor(lab).new_id() == 13


def test_the_editor_owns_its_labels_counts_edits_and_keeps_fifty_undos():
    lab = np.zeros((4, 6), np.int32)
    lab[1, 1], lab[1, 4] = 5, 7
    ed = LabelEditor(lab)
    lab[0, 0] = 99  # the caller's array is not the editor's
    assert ed.labels[0, 0] == 0 and ed.labels.dtype == np.int32 and ed.stored is False
    assert LabelEditor(lab.astype(np.uint8)).labels.dtype == np.int32
    ed.merge((1, 1), (1, 4))
    assert ed.labels.dtype == np.int32 and ed.edits == 1
    ed.delete(1, 1)
    assert ed.labels.dtype == np.int32 and ed.edits == 2
    ed.paint([(2, 2)], radius=0)
    assert ed.edits == 3
    ed.undo()
    assert ed.edits == 2
    ed = LabelEditor(np.zeros((2, 60), np.int32))
    for i in range(55):
        ed.paint([(0, i)], radius=0, label=i + 1)
    undone = 0
    while ed._history:
        ed.undo()
        undone += 1
    assert undone == 50 and ed.labels[0, :5].tolist() == [1, 2, 3, 4, 5]
    assert ed.labels[0, 5] == 0 and ed.edits == 5


def test_the_training_set_folder_files_and_their_contents(tmp_path):
    import re

    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    lab = np.zeros((3, 4), np.uint16)
    lab[1, 1:3] = 2
    pred = np.zeros((3, 4), np.int64)
    pred[0, 0] = 4
    ts = TrainingSet(tmp_path / "a" / "b" / "training")  # made with its parents
    ts.add(img, lab, pred, data="vol", plane="xy", index=3)
    (ts.folder / "0_broken.npz").write_bytes(b"not an npz")  # sorted first, skipped
    (s,) = ts.slices()
    assert s.labels.dtype == np.int32 and s.predicted.dtype == np.int32
    np.testing.assert_array_equal(s.labels, lab)
    np.testing.assert_array_equal(s.predicted, pred)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", s.meta["saved"])
    ts.remove(s.path)
    ts.remove(s.path)  # gone already: nothing to do
    assert ts.slices() == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=r"cannot create the training folder .*: Not a directory$"):
        TrainingSet(blocker / "training").add(img, lab)
