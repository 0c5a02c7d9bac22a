"""One progress helper for every long loop (export stages, scoring, bench runs, validate steps).

    for doc in progress(docs, desc="scoring", unit="doc"): ...
    with stage("tracing to ONNX"): ...          # "tracing to ONNX ..." then "... done in 12 s"

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


def progress(items: Iterable[T], desc: str, unit: str = "it", total: Optional[int] = None) -> Iterable[T]:
    if not enabled():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def stage(desc: str) -> Iterator[None]:
    on = enabled()
    t0 = time.monotonic()
    if on:
        print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    if on:
        print(f"{desc}: done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
