#!/usr/bin/env python3
"""Alias of tools/gpu_first_run.py, the one prepared GPU script (kept because docs name this file):
`python tools/gpu_check.py ARGS` is `python -m samba_edge.tools.gpu_first_run ARGS`; see that module."""
from __future__ import annotations

import sys

if __name__ == "__main__":
    try:
        from samba_edge.tools.gpu_first_run import main
    except ImportError as e:
        print(f"error: samba-edge is not importable ({e}): run `pip install --no-deps --no-build-isolation -e .` "
              "in the repository", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
