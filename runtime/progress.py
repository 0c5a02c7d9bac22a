"""One progress helper for every long loop (export stages, scoring, bench runs, validate steps).

    for doc in progress(docs, desc="scoring", unit="doc"): ...
    with stage("tracing to ONNX"): ...          # "tracing to ONNX ..." then "... done in 12 s"
    bar = counter(64, "calibrating", unit="chunk"); bar.update(1) ...   # None when off

On stderr, and only where someone watches: off when stderr is not a terminal, with `samba-edge
--quiet` ($SAMBA_EDGE_QUIET=1), or without tqdm (then loops run plain). stdout stays the results'.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("SAMBA_EDGE_QUIET", "") in ("", "0") and sys.stderr.isatty()


def _bar(**kw):
    if not enabled():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


def progress(items: Iterable[T], desc: str, unit: str = "it", total: Optional[int] = None) -> Iterable[T]:
    bar = _bar(iterable=items, desc=desc, unit=unit, total=total)
    return items if bar is None else bar


def counter(total: int, desc: str, unit: str = "it"):
    """A bar advanced by hand (`.update(n)`, `.close()`), for work that is not one loop; None when off."""
    return _bar(total=total, desc=desc, unit=unit)


@contextlib.contextmanager
def stage(desc: str) -> Iterator[None]:
    on = enabled()
    t0 = time.monotonic()
    if on:
        print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    if on:
        print(f"{desc}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
