"""Doctest collection of nbapp/ui needs the app extra; without it the core suite still runs.

(At the repository root, not inside the package: an installed nbapp ships no pytest file.)
"""

import importlib.util

collect_ignore_glob = [] if all(
    importlib.util.find_spec(m) for m in ("ipywidgets", "ipympl", "ipyvolume", "matplotlib")
) else ["nbapp/ui/*.py"]
