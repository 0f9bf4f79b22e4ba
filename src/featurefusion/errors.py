"""Errors a user can act on. Each names the file and, where there is one, the tensor key."""

from __future__ import annotations


class FeatureFusionError(Exception):
    """Base class: anything the CLI reports as a one-line error instead of a traceback."""


class CheckpointError(FeatureFusionError):
    """A checkpoint cannot be read or does not fit the merge (missing key, wrong shape, NaN, ...)."""

    def __init__(self, message: str, path: object | None = None, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        where = []
        if self.path is not None:
            where.append(f"file {self.path}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class RecipeError(FeatureFusionError):
    """A recipe or a set of merge options is invalid."""


class DataError(FeatureFusionError):
    """Training data cannot be used: a dataset, image, categories file or output folder. Names the file (or
    dataset row)."""

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{message} ({self.path})" if self.path is not None else message)
