"""Progress bars for long phases: tqdm when installed and wanted, else the plain iterable."""

from __future__ import annotations

from collections.abc import Iterable


def progress(iterable: Iterable, enabled: bool, **tqdm_kwargs) -> Iterable:
    """``iterable`` in a transient tqdm bar, or unchanged when disabled or tqdm is missing."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, leave=False, dynamic_ncols=True, **tqdm_kwargs)
