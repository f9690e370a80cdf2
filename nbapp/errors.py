"""Exceptions for problems the user can fix.

Every user-facing failure (bad file, bad parameter, bad model) raises a subclass of
:class:`NbappError`. The CLI prints them as one ``nbapp: error:`` line and the app shows them in
its status area; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["NbappError", "InputError", "ParameterError", "ModelError", "LabelOverflowError"]


class NbappError(Exception):
    """Base class of errors caused by input, parameters or models (not by bugs)."""


class InputError(NbappError, ValueError):
    """An image, volume or file cannot be used (missing, corrupt, wrong shape or dtype)."""


class ParameterError(NbappError, ValueError):
    """A parameter is outside its documented range."""


class ModelError(NbappError, RuntimeError):
    """A model or its config cannot be loaded, or its outputs break the model contract."""


class LabelOverflowError(NbappError, ValueError):
    """More instances of a class than ``label_divisor`` allows."""
