"""Import TensorRT: the real one (`tensorrt`, 10.x / 11.x) or TensorRT-RTX, whichever is installed.

    from samba_edge.plugins.trt_import import import_trt
    trt, info = import_trt()          # info.flavor: "tensorrt" | "tensorrt-rtx", info.version

TensorRT-RTX ships as `tensorrt_rtx_libs` (the .so files) + `tensorrt_rtx_bindings` (the Python
module); it installs and builds engines on a CPU-only machine, so it is our structural check.

The `libtensorrt_rtx.so` pitfall and its fix
--------------------------------------------
The wheel ships `libtensorrt_rtx.so.1` only. When the ONNX parser meets a plugin node it
`dlopen("libtensorrt_rtx.so")` (no `.1`); without such a file the process aborts (SIGABRT)
right after "Successfully created plugin". What does NOT help:
  * setting LD_LIBRARY_PATH from Python: glibc reads it once, at process start;
  * ctypes-loading the `.so.1` under another path: dlopen matches an already-loaded library by the
    exact name it was requested under or by its SONAME (`libtensorrt_rtx.so.1`), never by a
    shorter name, so the bare "libtensorrt_rtx.so" still goes to the search path and fails.
What works (verified, see tests/test_trt_build.py): the parser library has RPATH `$ORIGIN`, and
glibc searches the *calling* object's RPATH for a dlopen. `$ORIGIN` is the directory of the path the
object was first loaded from (symlinks are not resolved). So, BEFORE `import tensorrt_rtx_libs`:
  1. make a user-writable cache directory (``$SAMBA_EDGE_CACHE`` or ``~/.cache/samba-edge``)
     ``trt-rtx-<version>/`` with symlinks ``libtensorrt_onnxparser_rtx.so.1``,
     ``libtensorrt_rtx.so.1`` and ``libtensorrt_rtx.so`` pointing at the wheel's files;
  2. ctypes-load (RTLD_GLOBAL) ``libtensorrt_rtx.so.1`` and then the parser through those symlinks,
     so the parser's `$ORIGIN` is the cache directory;
  3. import the packages: their own loads (and the bindings' DT_NEEDED) resolve by SONAME/inode to the
     already-loaded copies, and the parser's later dlopen("libtensorrt_rtx.so") finds the cache
     symlink, whose inode is the loaded `.so.1`, so the same library is returned, not a second copy.
If the wheel directory itself already has `libtensorrt_rtx.so` (a user made it), nothing is done.
Nothing outside the user's cache directory is written.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samba_edge.plugins.errors import SambaEdgeError

INSTALL_HINT = ("install TensorRT for your GPU / JetPack (the `tensorrt` Python package; on Jetson it comes with "
                "JetPack), or for a CPU-only structural check TensorRT-RTX: "
                "`pip install tensorrt-rtx-cu12-libs tensorrt-rtx-cu12-bindings`")


@dataclass(frozen=True)
class TrtInfo:
    flavor: str              # "tensorrt" | "tensorrt-rtx"
    version: str
    module: str              # the imported module's name


_cached: tuple[Any, TrtInfo] | None = None


def cache_dir() -> Path:
    root = os.environ.get("SAMBA_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "samba-edge")
    return Path(root)


def _rtx_libs_dir() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _fix_rtx_soname(libs: Path) -> None:
    """Preload the RTX libraries through a cache directory holding a `libtensorrt_rtx.so` symlink
    (see the module docstring). Best effort: on failure the import goes ahead as the wheel intends."""
    core, parser = libs / "libtensorrt_rtx.so.1", libs / "libtensorrt_onnxparser_rtx.so.1"
    if not core.exists() or not parser.exists() or (libs / "libtensorrt_rtx.so").exists():
        return
    st = core.stat()
    d = cache_dir() / f"trt-rtx-{st.st_size}-{int(st.st_mtime)}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        for name, target in (("libtensorrt_rtx.so.1", core), ("libtensorrt_rtx.so", core),
                             ("libtensorrt_onnxparser_rtx.so.1", parser)):
            link = d / name
            if link.is_symlink() and os.readlink(link) == str(target):
                continue
            tmp = d / f".{name}.{os.getpid()}"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, link)                              # atomic: concurrent processes agree
        ctypes.CDLL(str(d / "libtensorrt_rtx.so.1"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(d / "libtensorrt_onnxparser_rtx.so.1"), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass


def import_trt() -> tuple[Any, TrtInfo]:
    """The TensorRT module and what it is. Real TensorRT wins when both are importable."""
    global _cached
    if _cached is not None:
        return _cached
    errors = []
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            trt = importlib.import_module("tensorrt")
            _cached = trt, TrtInfo("tensorrt", str(trt.__version__), "tensorrt")
            return _cached
        except Exception as e:  # noqa: BLE001 - e.g. the bindings without libnvinfer / libnvonnxparser
            errors.append(f"`import tensorrt` failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    libs = _rtx_libs_dir()
    if libs is not None and importlib.util.find_spec("tensorrt_rtx_bindings") is not None:
        try:
            _fix_rtx_soname(libs)
            importlib.import_module("tensorrt_rtx_libs")
            trt = importlib.import_module("tensorrt_rtx_bindings")
            _cached = trt, TrtInfo("tensorrt-rtx", str(trt.__version__), "tensorrt_rtx_bindings")
            return _cached
        except Exception as e:  # noqa: BLE001
            errors.append(f"`import tensorrt_rtx_bindings` failed ({type(e).__name__}: {e})")
    why = "; ".join(errors) if errors else "no TensorRT Python package is installed"
    raise SambaEdgeError(f"TensorRT is not available ({why}): {INSTALL_HINT}")


def trt_available() -> bool:
    try:
        import_trt()
        return True
    except SambaEdgeError:
        return False
