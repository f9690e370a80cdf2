"""Mutation testing of the pure core (issue 31): how many deliberately broken versions of each
module its tests catch.

For each module, mutmut (https://mutmut.readthedocs.io) makes every small change it knows (an
operator, a constant, a comparison, a removed call...) and runs the tests that cover the
changed function; a mutant is *killed* when a test fails, *survives* when they all pass. The
score is killed / (killed + survived). Survivors are listed with their diff in the result file:
each is a missing test or an equivalent mutant (no behaviour change), accounted for in the
README's development section.

Each module runs in a copy of the project under a temporary folder (mutmut writes a
``mutants/`` tree beside the code), with the test files that exercise it (``MODULES`` below;
budgeted for a 2-core machine: a few minutes a module).

Run: ``python bench/bench_mutation.py [--modules tiles,region,...] [--children 2]``. Writes
bench/results/bench_mutation.json (merged with earlier runs of other modules).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "bench_mutation.json"

#: module -> the test files that exercise it (what mutmut runs against each mutant)
MODULES: dict[str, list[str]] = {
    "tiles": ["tests/test_tiles.py"],
    "region": ["tests/test_big_slice.py"],
    "stitch": [f"tests/test_blockwise.py::{t}" for t in (
        "test_grid_tiles_the_volume_without_thin_blocks", "test_every_core_is_one_chunk_of_the_work_store",
        "test_store_join_and_write_on_an_uneven_grid", "test_join_filters_the_joined_object_not_its_pieces",
        "test_object_spanning_eight_blocks_is_one_object", "test_blockwise_equals_in_memory_on_ellipsoids")],
    "proofread": ["tests/test_proofread.py"],
    "confine": ["tests/test_confine.py"],
    "metrics": ["tests/test_metrics.py"],
    "objects": ["tests/test_scale.py", "tests/test_postprocess.py"],
    "tracking": ["tests/test_tracking.py"],
    "consensus": ["tests/test_consensus.py"],
    "postprocess": ["tests/test_postprocess.py"],
}


#: mutmut's command, run in the scratch copy. An editable install of nbapp (``pip install -e``)
#: puts an import hook before the mutants: it is taken out, so that the tests import the
#: mutated copy (mutmut's own check, "forced fail", failed without this).
MUTMUT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "editable" not in p]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
from mutmut.__main__ import cli
sys.argv = ["mutmut"] + sys.argv[1:]
cli()
"""


def _config(work: Path, module: str, tests: list[str]) -> str:
    """mutmut's settings: the package is copied whole (so that it imports), one module is
    mutated."""
    others = sorted(str(f.relative_to(work)) for f in (work / "nbapp").rglob("*.py")
                    if f.name != f"{module}.py" or f.parent != work / "nbapp")
    return ("\n[tool.mutmut]\n"
            'paths_to_mutate = ["nbapp/"]\n'
            f"do_not_mutate = {json.dumps(others)}\n"
            f"tests_dir = {json.dumps(tests)}\n")


def run_module(module: str, tests: list[str], children: int) -> dict:
    """mutmut over one module in a scratch copy of the project; its counts and survivors."""
    work = Path(tempfile.mkdtemp(prefix=f"mutmut_{module}_"))
    try:
        for name in ("nbapp", "tests"):
            shutil.copytree(ROOT / name, work / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        pyproject = (ROOT / "pyproject.toml").read_text()
        (work / "pyproject.toml").write_text(pyproject + _config(work, module, tests))
        env = dict(os.environ)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", MUTMUT, "run", "--max-children",
                               str(children)], cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        counts, survivors = _read_results(work, module)
        if proc.returncode != 0 or counts.get("not checked"):
            return {"module": module, "counts": counts,
                    "error": (proc.stdout + proc.stderr)[-3000:]}
        for s in survivors:
            show = subprocess.run([sys.executable, "-c", MUTMUT, "show", s["name"]], cwd=work,
                                  env=env, capture_output=True, text=True)
            s["diff"] = "\n".join(line for line in show.stdout.splitlines()
                                  if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))
        killed, survived = counts.get("killed", 0), counts.get("survived", 0)
        return {"module": module, "tests": tests, "mutants": sum(counts.values()),
                "counts": counts,
                "score": round(killed / (killed + survived), 3) if killed + survived else None,
                "wall_s": round(wall, 1), "survivors": survivors}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_results(work: Path, module: str) -> tuple[dict, list]:
    from mutmut.__main__ import status_by_exit_code

    meta = work / "mutants" / "nbapp" / f"{module}.py.meta"
    if not meta.exists():
        return {}, []
    data = json.loads(meta.read_text())
    counts: dict = {}
    survivors = []
    for name, code in data.get("exit_code_by_key", {}).items():
        status = status_by_exit_code.get(code, f"exit {code}")
        counts[status] = counts.get(status, 0) + 1
        if status == "survived":
            survivors.append({"name": name})
    return counts, survivors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", default=",".join(MODULES))
    ap.add_argument("--children", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    old = json.loads(RESULT.read_text()) if RESULT.exists() else {"modules": {}}
    for module in args.modules.split(","):
        row = run_module(module, MODULES[module], args.children)
        row["date"] = time.strftime("%Y-%m-%d")
        old["modules"][module] = row
        print(json.dumps({k: v for k, v in row.items() if k != "survivors"}), flush=True)
        old["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPUs, "
                          f"Python {platform.python_version()}")
        old["mutmut"] = __import__("mutmut").__version__
        RESULT.write_text(json.dumps(old, indent=1) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
