"""Training speed of the two ways to fine-tune: ``nbapp finetune`` (command line) and the page's
Fine-tune button (issue 30 item 7: the CLI made 14 steps in 2.1 minutes where the page made 151
on the same slices, because set-up and batch-norm recalibration counted inside ``--minutes``).

Both train the default model on the same three labelled slices for the same minutes, one after
the other on this machine: the CLI as a subprocess (``python -m nbapp.cli finetune``), the page
as the app's own code path (an :class:`nbapp.ui.App`, the slices proofread to the truth and added
to its training set, Fine-tune run as the background job the button starts). Reported: steps,
steps per training minute, and the wall time from start to model (set-up and the scorings
after training included).

Data: three slices of the SBEM stack (z = 4, 10, 16) when present, else of the demo volume.

Run: ``python bench/bench_finetune_paths.py [--minutes 1] [--out bench/results/bench_finetune_paths.json]``
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_2d import machine  # noqa: E402
from bench_model import DATA  # noqa: E402


def slices():
    import tifffile

    d = DATA / "sbem_cdeep3m_train"
    picks = [4, 10, 16]
    if (d / "raw.tif").exists():
        raw = tifffile.imread(d / "raw.tif")
        lab = tifffile.imread(d / "mito_instances_2d_cc.tif").astype(np.int32)
        return "sbem z 4, 10, 16", raw[picks], lab[picks]
    from nbapp.samples import demo_volume

    raw, lab = demo_volume()
    return "demo z 4, 10, 16", raw[picks], lab[picks].astype(np.int32)


def cli_run(images, labels, minutes: float, work: Path, threads: int) -> dict:
    import tifffile

    tifffile.imwrite(work / "images.tif", images)
    tifffile.imwrite(work / "labels.tif", labels)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "nbapp.cli", "finetune", "--images",
                           str(work / "images.tif"), "--labels", str(work / "labels.tif"),
                           "--minutes", str(minutes), "--out", str(work / "cli"),
                           "--threads", str(threads)], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    steps = int(re.search(r"nbapp finetune: (\d+) steps in", proc.stderr).group(1))
    return {"steps": steps, "steps_per_minute": round(steps / minutes, 1),
            "wall_s": round(wall, 1)}


def page_run(images, labels, minutes: float, work: Path, threads: int) -> dict:
    import torch

    from nbapp.jobs import JobState
    from nbapp.models import load_model
    from nbapp.ui import App

    torch.set_num_threads(threads)
    app = App(volume=images, model=load_model("default", device="cpu"), device="cpu",
              synchronous=True, data_root=work / "page")
    try:
        st, session = app.state, app.session
        st.slice_params = st.slice_params.replace(batch_mode=True)
        for z in range(images.shape[0]):
            st.index = z
            session.request_2d()
            ed = session._editor()
            ed.labels, ed.edits = labels[z].copy(), 1  # proofread to the truth
            assert session.add_to_training(), st.status
        t0 = time.monotonic()
        session.tuning.synchronous = False  # the job in its own thread, as in the page
        assert session.start_finetune(minutes), st.status
        while st.tuning is None or not st.tuning.finished or "steps" not in (
                st.tune_scores or {}) and st.tuning.state == JobState.DONE:
            time.sleep(0.5)  # the page's job runs in its own thread
        wall = time.monotonic() - t0
        assert st.tuning.state == JobState.DONE, st.tuning.error
        steps = st.tune_scores["steps"]
        return {"steps": steps, "steps_per_minute": round(steps / minutes, 1),
                "wall_s": round(wall, 1)}
    finally:
        app.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_finetune_paths.json"))
    args = ap.parse_args(argv)
    name, images, labels = slices()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cli = cli_run(images, labels, args.minutes, work, args.threads)
        print(f"CLI:  {cli}", flush=True)
        page = page_run(images, labels, args.minutes, work, args.threads)
        print(f"page: {page}", flush=True)
    result = {"machine": machine(), "data": name, "minutes": args.minutes, "cli": cli,
              "page": page, "cli_over_page_steps": round(cli["steps"] / max(1, page["steps"]), 3)}
    print(f"CLI / page steps: {result['cli_over_page_steps']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
