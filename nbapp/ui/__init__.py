"""The Jupyter / Voila widget app: the only package that imports ipywidgets, ipympl,
matplotlib's widget backend, ipyvolume and IPython.

>>> from nbapp.ui import App      # doctest: +SKIP
>>> App(data_root="/data")        # doctest: +SKIP
"""

from nbapp.ui.app import App, app
from nbapp.ui.state import AppState

__all__ = ["App", "AppState", "app"]
