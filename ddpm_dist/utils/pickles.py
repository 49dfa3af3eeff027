"""Pickle files read without running code from them.

Unpickling calls whatever global a file names (`__reduce__`), so a file from elsewhere could
run any code. `RestrictedUnpickler` admits only the globals its subclass allows; containers,
strings and numbers are pickle opcodes, not globals, and need no allowing. Anything else stops
the load with one line naming the file and the global, before it is called.
"""
from __future__ import annotations

import pickle
from typing import Any


class RefusedPickleError(pickle.UnpicklingError):
    """A pickle file names a global outside what its reader admits."""


class RestrictedUnpickler(pickle.Unpickler):
    what = "data"                 # what the file should hold, for the refusal line
    error = RefusedPickleError    # raised on a global that is not allowed

    def __init__(self, file, path, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path

    def allowed(self, module: str, name: str) -> bool:
        raise NotImplementedError

    def find_class(self, module: str, name: str) -> Any:
        if self.allowed(module, name):
            return super().find_class(module, name)
        raise self.error(f"{self.path} refused: it names {module}.{name}, which is not {self.what} "
                         f"(load such files only from sources you trust)")


class NumpyUnpickler(RestrictedUnpickler):
    """numpy arrays and dtypes in plain containers: what numpy writes to pickle an array."""
    what = "a numpy array or plain data"
    ALLOWED = frozenset({
        *((core, name) for core in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct",)),
        *((core, "_frombuffer") for core in ("numpy.core.numeric", "numpy._core.numeric")),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 writes bytes from Python 3 (a str → bytes codec)
    })

    def allowed(self, module: str, name: str) -> bool:
        return (module, name) in self.ALLOWED
