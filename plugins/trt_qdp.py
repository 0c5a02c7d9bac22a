"""The `tensorrt.plugin` aot_impl route (TensorRT >= 10.9): the samba.* ops as ahead-of-time
"quickly deployable plugins" whose kernels are embedded in the engine, so the engine runs from
trtexec or the C++ runtime with no Python and no samba-edge at all.

    from samba_edge.plugins.trt_qdp import register_aot_plugins
    register_aot_plugins(artifact_dir, sm="sm_90")     # before parsing; `samba-edge build --plugin-route aot`

What TensorRT's API fixes (NVIDIA's tensorrt.plugin sources and samples/python/quickly_deployable_plugins):
  * one kernel per plugin: so the attention op uses `swa_qdp_kernel`, attention and window copy in one
    grid (plugins/triton_swa.py), and the scan `selective_scan_qdp_kernel`;
  * kernel arguments = input pointers, int32 scalars ("extra args", SymInt32 only, no floats: the
    attention scale is a compile-time constant of the kernel), output pointers; Triton's trailing
    scratch pointers are padded with null by TensorRT (sizes are 0, checked at export);
  * PTX: the artifact's kernels/<sm>/*_qdp.ptx for the building GPU's arch (the same AOT compile as
    the Python route, plugins/aot.py); launch grid from the records' formulas over shape expressions.
The Python route (plugins/trt_plugins.py, IPluginV3) remains for TensorRT 10.0-10.8 (JetPack 6).

No `from __future__ import annotations` here: tensorrt.plugin inspects the annotations as objects.

STATUS: NOT RUN ANYWHERE YET. TensorRT >= 10.9 cannot be installed on our machines (TensorRT-RTX has
no tensorrt.plugin); the kernels it embeds are tested (Triton interpreter, ptxas), this glue is not.
"""
import json
from pathlib import Path
from typing import List, Tuple, Union

from samba_edge.runtime.errors import SambaEdgeError

NAMESPACE = "samba"
_registered = False


def aot_route_available() -> bool:
    """Real TensorRT with AOT quickly deployable plugins (10.9+)."""
    try:
        from samba_edge.plugins.trt_import import import_trt

        trt, info = import_trt()
    except SambaEdgeError:
        return False
    if info.flavor != "tensorrt" or not hasattr(trt, "QuickPluginCreationRequest"):
        return False
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        return False
    return True


def _records(artifact: Path, sm: str) -> dict[str, tuple[dict, bytes]]:
    """op -> (kernel record, PTX) of the aot_impl kernels for `sm`."""
    from samba_edge.plugins.aot import KERNELS_DIR, load_index

    try:
        index = load_index(artifact)
    except FileNotFoundError:
        raise SambaEdgeError(f"{artifact} has no {KERNELS_DIR}/ (AOT kernels); re-export with --flavor plugin "
                             "where triton is installed") from None
    arch = index.get("archs", {}).get(sm)
    if arch is None or not index.get("aot_impl"):
        raise SambaEdgeError(f"{artifact}'s kernels have no aot_impl kernels for {sm}; re-export the artifact "
                             f"with this samba-edge (or build with --plugin-route python)")
    out = {}
    for op, name in index["aot_impl"].items():
        k = arch["kernels"][name]
        rec = json.loads((artifact / KERNELS_DIR / k["files"]["meta"]).read_text())
        if rec.get("needs_shared_mem_opt_in"):
            raise SambaEdgeError(f"{name} needs {rec['shared_mem_bytes']} B of shared memory (> 48 KB), which the "
                                 "aot_impl route cannot opt into; build with --plugin-route python")
        out[op] = (rec, (artifact / KERNELS_DIR / k["files"]["ptx"]).read_bytes())
    return out


def _launch(trtp, rec: dict, ptx: bytes, descs: dict, attrs: dict):
    """(kernel name, PTX, KernelLaunchParams, extra args) from a kernel record, symbolically: the same
    grid formulas and argument values (aot.eval_grid_expr / aot.arg_values) as the Python launcher,
    over TensorRT shape expressions. TensorRT passes the pointers itself; the int32 values are the extra args."""
    from samba_edge.plugins.aot import arg_values, eval_grid_expr

    shapes = {name: d.shape_expr for name, d in descs.items()}
    names = {n: shapes[v["tensor"]][v["axis"]] for n, v in rec["grid_vars"].items()}
    lp = trtp.KernelLaunchParams()
    lp.grid_x, lp.grid_y, lp.grid_z = (eval_grid_expr(e, names, cdiv=trtp.cdiv) for e in rec["grid"])
    lp.block_x, lp.block_y, lp.block_z = rec["block"]
    lp.shared_mem = int(rec["shared_mem_bytes"])
    extra = [trtp.SymInt32(val) for ty, val in arg_values(rec, {}, shapes, attrs) if ty == "i32"]
    return rec["entry"], ptx, lp, trtp.SymIntExprs.from_tuple(extra)


def register_aot_plugins(artifact: str | Path, sm: str) -> None:
    """Register both ops with tensorrt.plugin (once per process), their kernels taken from `artifact`."""
    global _registered
    if _registered:
        return
    if not aot_route_available():
        raise SambaEdgeError("the aot_impl plugin route needs TensorRT >= 10.9 with tensorrt.plugin; "
                             "use --plugin-route python")
    import tensorrt.plugin as trtp

    recs = _records(Path(artifact), sm)
    TD = trtp.TensorDesc
    scan_rec, scan_ptx = recs["SelectiveScan"]
    swa_rec, swa_ptx = recs["SlidingWindowAttention"]

    @trtp.register(f"{NAMESPACE}::SelectiveScan")
    def scan_desc(u: TD, delta: TD, A: TD, B: TD, C: TD, D: TD, z: TD, delta_bias: TD, ssm_state: TD,
                  delta_softplus: int, d_inner: int, d_state: int) -> Tuple[TD, TD]:
        return u.like(), ssm_state.like()

    @trtp.autotune(f"{NAMESPACE}::SelectiveScan")
    def scan_tune(u: TD, delta: TD, A: TD, B: TD, C: TD, D: TD, z: TD, delta_bias: TD, ssm_state: TD,
                  outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join(["FP32"] * 11))]          # the scan is fp32 (contract)

    @trtp.aot_impl(f"{NAMESPACE}::SelectiveScan")
    def scan_aot(u: TD, delta: TD, A: TD, B: TD, C: TD, D: TD, z: TD, delta_bias: TD, ssm_state: TD,
                 delta_softplus: int, d_inner: int, d_state: int, outputs: Tuple[TD], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        if delta_softplus != 1:
            raise ValueError("samba::SelectiveScan kernels implement delta_softplus=1 only")
        return _launch(trtp, scan_rec, scan_ptx, {"u": u, "ssm_state": ssm_state}, {})

    @trtp.register(f"{NAMESPACE}::SlidingWindowAttention")
    def swa_desc(q: TD, k: TD, v: TD, k_window: TD, v_window: TD, start_pos: TD, window: int, scale: float,
                 num_heads: int, num_kv_heads: int, head_size: int) -> Tuple[TD, TD, TD]:
        return q.like(), k_window.like(), v_window.like()

    @trtp.autotune(f"{NAMESPACE}::SlidingWindowAttention")
    def swa_tune(q: TD, k: TD, v: TD, k_window: TD, v_window: TD, start_pos: TD,
                 outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        dt = "FP16" if swa_rec["args"][0]["type"] == "*fp16" else "FP32"    # the dtype the kernel was built for
        return [trtp.AutoTuneCombination(f"{dt}, {dt}, {dt}, FP32, FP32, INT64, {dt}, FP32, FP32")]

    @trtp.aot_impl(f"{NAMESPACE}::SlidingWindowAttention")
    def swa_aot(q: TD, k: TD, v: TD, k_window: TD, v_window: TD, start_pos: TD, window: int, scale: float,
                num_heads: int, num_kv_heads: int, head_size: int, outputs: Tuple[TD], tactic: int
                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        baked = swa_rec["constexprs"]["SCALE"]
        if abs(baked - scale) > 1e-6 * abs(scale):
            raise ValueError(f"the kernel was compiled for scale {baked}, the node says {scale}: re-export")
        return _launch(trtp, swa_rec, swa_ptx, {"q": q, "k": k, "k_window": k_window}, {"window": window})

    _registered = True
