"""When progress bars show: one rule for the whole package."""

from __future__ import annotations

import os


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's `disable` for a `progress` option: True shows a bar, False hides it, None decides by itself
    (tqdm then hides it when output is not a terminal). FEATUREFUSION_PROGRESS=0 hides every automatic bar
    (the test suite sets it)."""
    if progress is None:
        return True if os.environ.get("FEATUREFUSION_PROGRESS") == "0" else None
    return not progress
