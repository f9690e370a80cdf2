"""nbapp's default model config runs in empanada-napari 1.2.4's 2D engine and agrees with nbapp.

Skipped unless empanada-napari's modules are importable (they are not an nbapp dependency):
install them without napari as ``bench/interop_empanada.py`` explains, e.g.
``pip install --no-deps --target /tmp/empsite empanada-napari==1.2.4 'opencv-python-headless<5'
cztile joblib``, then ``EMPANADA_SITE=/tmp/empsite python -m pytest tests/test_interop_empanada.py``
(or install empanada-napari into the environment itself).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

SITE = os.environ.get("EMPANADA_SITE")  # opt-in: without it only a normal install counts
if SITE and os.path.isdir(SITE) and SITE not in sys.path:
    sys.path.append(SITE)  # after the normal environment: never shadows nbapp's own packages

pytest.importorskip("cv2")
pytest.importorskip("empanada.inference.engines")
pytest.importorskip("empanada.data.utils")
if importlib.util.find_spec("empanada_napari") is None:
    pytest.skip("empanada_napari is not importable", allow_module_level=True)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "interop_empanada.py"


@pytest.fixture(scope="module")
def interop():
    spec = importlib.util.spec_from_file_location("interop_empanada", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        mod.emp = mod.import_empanada(SITE)
    except ImportError as exc:
        pytest.skip(f"empanada-napari's 2D engine is not importable: {exc}")
    return mod


@pytest.fixture(scope="module")
def registered(interop, tmp_path_factory):
    from nbapp.models import default_config_path

    return interop.register_in_empanada(interop.emp, default_config_path(),
                                        tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def demo_slices():
    from nbapp.samples import demo_volume

    img, _ = demo_volume()
    return img[[16, 24]]


def test_default_config_registers_in_empanada(registered):
    config, notes = registered
    assert notes["register_config_model_and_quantized_file"]["ok"]
    assert Path(config["model"]).is_file()
    for key in ("class_names", "labels", "thing_list", "padding_factor", "norms"):
        assert key in config


@pytest.mark.slow
@pytest.mark.parametrize("fine", [False, True], ids=["coarse", "fine"])
def test_empanada_engine2d_agrees_with_nbapp(interop, registered, demo_slices, fine):
    from nbapp.inference import SliceSegmenter
    from nbapp.metrics import slice_metrics
    from nbapp.params import SliceParams

    config, _ = registered
    params = SliceParams(downsampling=1, fine_boundaries=fine)
    engine = interop.make_engine(interop.emp, config, params)
    emp_labels = interop.run_empanada(engine, demo_slices, params)
    seg = SliceSegmenter("default", device="cpu")
    nb_labels = np.stack([seg(im, params) for im in demo_slices])
    assert emp_labels.shape == nb_labels.shape
    assert (emp_labels > 0).any()
    m = slice_metrics(emp_labels, nb_labels)
    assert m["f1"] >= 0.9, m
    assert m["fg_iou"] >= 0.95, m
