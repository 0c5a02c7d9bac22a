"""Plain launchers for the AOT-compiled Triton kernels (plugins/aot.py), called by the TensorRT
plugins' `enqueue` (plugins/trt_plugins.py) and usable from any CUDA code path that has device pointers.

    launch_selective_scan(inputs, outputs, batch=, d_inner=, d_state=, seq=, delta_softplus=, stream=)
    launch_sliding_window_attention(inputs, outputs, batch=, ..., half=False, stream=)

`route="aot_impl"` launches the single-kernel entry points that the tensorrt.plugin route embeds
(plugins/trt_qdp.py) instead, so tools/gpu_check.py verifies both routes' kernels with this code.

`inputs` / `outputs` are device pointers (ints) in the op contract's order (docs/op-contracts.md),
`shapes` maps the contract's tensor names (u, q, k, k_window, ...) to their dims, `attrs` holds the
node attributes, `stream` is a CUDA stream handle (int). Kernels come from the artifact's
`kernels/kernels.json` index and the per-kernel JSON records beside it (entry name, block, shared
memory, grid formula, exact argument order with where each value comes from); they are loaded with
`cuda.bindings.driver` (cuModuleLoadData: the cubin when its arch equals the device's, else the PTX
for the driver to JIT), looked up with cuModuleGetFunction and launched with cuLaunchKernel.

Where the kernels are: `set_kernels_dir(artifact_dir)` (the TensorRT backend calls it before loading
an engine), else $SAMBA_EDGE_KERNELS (an artifact dir or its kernels/ dir). Missing index, arch or
kernel -> SambaEdgeError naming the fix; nothing is faked.

STATUS: written against plugins/aot.py's record format; never executed on a GPU in this repo's CI.
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from samba_edge.runtime.errors import SambaEdgeError

INDEX = "kernels.json"
_kernels_dir: Optional[Path] = None
_lock = threading.Lock()
_functions: dict[tuple, Any] = {}        # (context, file) -> (module, {entry: function})
_image: Optional[str] = None             # None: the cubin when its arch is the device's, else PTX


def set_kernels_dir(path: str | Path | None) -> None:
    """Point the launchers at an artifact (or its kernels/ folder)."""
    global _kernels_dir
    _kernels_dir = None if path is None else Path(path)


def set_image(image: Optional[str]) -> None:
    """Force "cubin" or "ptx" (driver JIT) images, e.g. to check both on a device; None = automatic."""
    global _image
    if image not in (None, "cubin", "ptx"):
        raise ValueError(f"image must be None, 'cubin' or 'ptx', got {image!r}")
    _image = image


def _index_path() -> Path:
    base = _kernels_dir or (Path(os.environ["SAMBA_EDGE_KERNELS"]) if os.environ.get("SAMBA_EDGE_KERNELS") else None)
    if base is None:
        raise SambaEdgeError("the samba.* TensorRT plugins have no kernels: call "
                             "samba_edge.plugins.trt_launch.set_kernels_dir(ARTIFACT) or set SAMBA_EDGE_KERNELS "
                             "to a plugin-flavour export that contains kernels/kernels.json")
    for cand in (base / "kernels" / INDEX, base / INDEX):
        if cand.is_file():
            return cand
    raise SambaEdgeError(f"{base} has no kernels/{INDEX} (the AOT-compiled Triton kernels): re-export the "
                         "artifact with --flavor plugin using a samba-edge that writes kernels")


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise SambaEdgeError("launching the plugin kernels needs cuda-python: `pip install cuda-bindings`") from None
    return driver


def cuda_check(result, what: str, error: type = RuntimeError):
    """Unpack a cuda-python call's (err, *values) result; raise `error` on a non-zero status."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise error(f"{what} failed: CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def _device_sm(driver) -> str:
    dev = cuda_check(driver.cuCtxGetDevice(), "cuCtxGetDevice")
    a = driver.CUdevice_attribute
    major = cuda_check(driver.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    minor = cuda_check(driver.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    return f"sm_{major}{minor}"


def _records(op: str, route: str = "python") -> tuple[Path, list[dict]]:
    """(kernels dir, the op's kernel records in launch order) for the current device's arch."""
    driver = _driver()
    index_path = _index_path()
    index = json.loads(index_path.read_text())
    root = index_path.parent
    sm = _device_sm(driver)
    arch = index.get("archs", {}).get(sm)
    if arch is None:
        raise SambaEdgeError(f"{index_path} has no kernels for this GPU ({sm}); it has "
                             f"{', '.join(index.get('archs', {})) or 'none'}: re-export on a samba-edge that targets {sm}")
    names = index.get("ops", {}).get(op, []) if route == "python" else [index.get("aot_impl", {}).get(op)]
    names = [n for n in names if n]
    recs = []
    for name in names:
        k = arch["kernels"].get(name)
        if k is None:
            errs = [e for e in index.get("errors", []) if e.startswith(f"{name} for {sm}")]
            raise SambaEdgeError(f"kernel {name} for {sm} is missing from {index_path}"
                                 + (f" (compile error at export: {errs[0]})" if errs else ""))
        rec = json.loads((root / k["files"]["meta"]).read_text())
        rec["files"] = k["files"]
        recs.append(rec)
    if not recs:
        raise SambaEdgeError(f"{index_path} lists no kernels for samba.{op}")
    return root, sorted(recs, key=lambda r: arch["kernels"][r["kernel"]].get("launch_order", 0))


def _function(driver, root: Path, rec: dict, sm: str):
    ctx = int(cuda_check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent"))
    use_cubin = "cubin" in rec["files"] and rec["arch"] == sm and _image != "ptx"
    if _image == "cubin" and not use_cubin:
        raise SambaEdgeError(f"no cubin of {rec['entry']} for {sm} (set_image('ptx') to JIT the PTX)")
    f = rec["files"]["cubin" if use_cubin else "ptx"]
    key = (ctx, str(root / f), rec["entry"])
    with _lock:
        if key not in _functions:
            data = (root / f).read_bytes()
            if not use_cubin:
                data += b"\0"
            mod = cuda_check(driver.cuModuleLoadData(data), f"cuModuleLoadData({f})")
            fn = cuda_check(driver.cuModuleGetFunction(mod, rec["entry"].encode()), f"cuModuleGetFunction({rec['entry']})")
            if rec.get("needs_shared_mem_opt_in"):
                cuda_check(driver.cuFuncSetAttribute(
                    fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    int(rec["shared_mem_bytes"])), "cuFuncSetAttribute")
            _functions[key] = (mod, fn)
        return _functions[key][1]


def grid_value(expr: str, env: dict[str, int]) -> int:
    """Evaluate a grid formula of aot.py ('cdiv(E, 32)', 'b * H', '1') over integer variables."""
    from samba_edge.plugins.aot import eval_grid_expr

    try:
        return int(eval_grid_expr(expr, env))
    except ValueError as e:
        raise SambaEdgeError(f"{e} in kernels metadata") from None


def _args(rec: dict, inputs: Sequence[int], outputs: Sequence[int], shapes: dict, attrs: dict):
    """(values, ctypes) of the kernel parameters, in order (aot.arg_values decides each value)."""
    from samba_edge.plugins.aot import arg_values

    pointers = {}
    for a in rec["args"]:
        v = a["value"]
        if v["kind"] in ("input", "output"):
            ptr = int((inputs if v["kind"] == "input" else outputs)[v["index"]])
            if ptr % rec.get("pointer_alignment_bytes", 1):
                raise SambaEdgeError(f"{rec['entry']}: {v['name']} pointer is not "
                                     f"{rec['pointer_alignment_bytes']}-byte aligned")
            pointers[v["name"]] = ptr
    try:
        typed = arg_values(rec, pointers, shapes, attrs)
    except (KeyError, ValueError) as e:
        raise SambaEdgeError(f"{rec['entry']}'s metadata: {e}") from None
    ctype = {"fp32": ctypes.c_float, "i32": ctypes.c_int32}
    return (tuple(float(x) if t == "fp32" else int(x) for t, x in typed),
            tuple(ctypes.c_void_p if t.startswith("*") else ctype[t] for t, _ in typed))


def _launch(op: str, inputs, outputs, shapes: dict, grid_env: dict, attrs: dict, stream: int,
            half: bool = False, route: str = "python") -> None:
    driver = _driver()
    root, recs = _records(op, route)
    sm = _device_sm(driver)
    for rec in recs:
        want = "*fp16" if half else "*fp32"
        qtype = next((a["type"] for a in rec["args"] if a["value"].get("name") in ("q", "k")), want)
        if qtype != want:
            raise SambaEdgeError(f"{rec['entry']} was compiled for {qtype} activations but the engine feeds {want}: "
                                 "re-export with kernels for this dtype")
        grid = [grid_value(g, grid_env) for g in rec["grid"]]
        if 0 in grid:
            continue
        fn = _function(driver, root, rec, sm)
        bx, by, bz = rec["block"]
        cuda_check(driver.cuLaunchKernel(fn, *grid, bx, by, bz, int(rec["shared_mem_bytes"]), stream,
                                     _args(rec, inputs, outputs, shapes, attrs), 0), f"cuLaunchKernel({rec['entry']})")


def launch_selective_scan(inputs: Sequence[int], outputs: Sequence[int], *, batch: int, d_inner: int, d_state: int,
                          seq: int, delta_softplus: int, stream: int, route: str = "python") -> None:
    """samba.SelectiveScan: inputs u, delta, A, B, C, D, z, delta_bias, ssm_state; outputs y, ssm_state_out."""
    if int(delta_softplus) != 1:
        raise SambaEdgeError("SelectiveScan kernels implement delta_softplus=1 only")
    shapes = {"u": (batch, d_inner, seq), "ssm_state": (batch, d_inner, d_state)}
    _launch("SelectiveScan", inputs, outputs, shapes, {"b": batch, "E": d_inner, "T": seq}, {}, stream, route=route)


def launch_sliding_window_attention(inputs: Sequence[int], outputs: Sequence[int], *, batch: int, num_heads: int,
                                    num_kv_heads: int, seq: int, head_size: int, window_rows: int, window: int,
                                    scale: float, half: bool, stream: int, route: str = "python") -> None:
    """samba.SlidingWindowAttention: inputs q, k, v, k_window, v_window, start_pos; outputs y, k/v_window_out."""
    b, H, G, T, hs, C = batch, num_heads, num_kv_heads, seq, head_size, window_rows
    shapes = {"q": (b, H, T, hs), "k": (b, G, T, hs), "v": (b, G, T, hs), "k_window": (b, G, C, hs)}
    _launch("SlidingWindowAttention", inputs, outputs, shapes, {"b": b, "H": H, "G": G, "T": T, "C": C},
            {"window": window, "scale": scale}, stream, half=half, route=route)
