"""The `tensorrt.plugin` aot_impl route (TensorRT >= 10.9): the samba.* ops as ahead-of-time
"quickly deployable plugins" whose kernels are embedded in the engine, so the engine runs from
trtexec or the C++ runtime with no Python and no samba-edge at all.

    from samba_edge.plugins.trt_qdp import register_aot_plugins
    register_aot_plugins(sm="sm_90")     # before parsing; `samba-edge build --plugin-route aot`
    # each node's `kernels` attribute (written by build) names the trt_launch.KernelSet it embeds

What TensorRT's API fixes (NVIDIA's tensorrt.plugin sources and samples/python/quickly_deployable_plugins):
  * one kernel per plugin: so the attention op uses `swa_qdp_kernel`, attention and window copy in one
    grid (plugins/triton_swa.py), and the scan `selective_scan_qdp_kernel`;
  * kernel arguments = input pointers, int32 scalars ("extra args", SymInt32 only, no floats: the
    attention scale is a compile-time constant of the kernel), output pointers; Triton's trailing
    scratch pointers are padded with null by TensorRT (sizes are 0, checked at export);
  * PTX: the artifact's kernels/<sm>/*_qdp.ptx for the building GPU's arch, else the portable PTX (the
    same AOT compile as the Python route, plugins/aot.py); launch grid from the records' formulas over
    shape expressions.
The Python route (plugins/trt_plugins.py, IPluginV3) remains for TensorRT 10.0-10.8 (JetPack 6).

No `from __future__ import annotations` here: tensorrt.plugin inspects the annotations as objects.

STATUS: NOT RUN ANYWHERE YET. TensorRT >= 10.9 cannot be installed on our machines (TensorRT-RTX has
no tensorrt.plugin); the kernels it embeds are tested (Triton interpreter, ptxas), this glue is not.
"""
from typing import List, Tuple, Union

from samba_edge.plugins.trt_import import import_trt
from samba_edge.plugins.errors import SambaEdgeError

NAMESPACE = "samba"
_registered = False


def aot_route_available() -> bool:
    """Real TensorRT with AOT quickly deployable plugins (10.9+)."""
    try:
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


def aot_kernel(kernels: str, op: str, sm: str) -> tuple[dict, bytes]:
    """(record, PTX) of op's aot_impl kernel for `sm`, from the kernel set the node names (its `kernels`
    attribute, written by `samba-edge build`): the arch's own PTX, else the portable PTX."""
    from samba_edge.plugins.trt_launch import KernelSet

    ks = KernelSet.by_key(kernels)
    name = ks.kernel_names(op, "aot_impl")[0]
    rec, image = ks.image(name, sm, kinds=("ptx", "portable"))
    if rec.get("needs_shared_mem_opt_in"):
        raise SambaEdgeError(f"{name} needs {rec['shared_mem_bytes']} B of shared memory (> 48 KB), which the "
                             "aot_impl route cannot opt into; build with --plugin-route python")
    return rec, image.data.rstrip(b"\0")


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


def register_aot_plugins(sm: str) -> None:
    """Register both ops with tensorrt.plugin (once per process). Each node's kernels come from the
    KernelSet its `kernels` attribute names (trt_launch.KernelSet.open(artifact) before parsing), so
    artifacts with other head sizes or dtypes build side by side in one process."""
    global _registered
    if _registered:
        return
    if not aot_route_available():
        raise SambaEdgeError("the aot_impl plugin route needs TensorRT >= 10.9 with tensorrt.plugin; "
                             "use --plugin-route python")
    import tensorrt.plugin as trtp

    TD = trtp.TensorDesc

    @trtp.register(f"{NAMESPACE}::SelectiveScan")
    def scan_desc(u: TD, delta: TD, A: TD, B: TD, C: TD, D: TD, z: TD, delta_bias: TD, ssm_state: TD,
                  delta_softplus: int, d_inner: int, d_state: int, kernels: str) -> Tuple[TD, TD]:
        return u.like(), ssm_state.like()

    @trtp.autotune(f"{NAMESPACE}::SelectiveScan")
    def scan_tune(u: TD, delta: TD, A: TD, B: TD, C: TD, D: TD, z: TD, delta_bias: TD, ssm_state: TD,
                  outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(", ".join(["FP32"] * 11))]          # the scan is fp32 (contract)

    @trtp.aot_impl(f"{NAMESPACE}::SelectiveScan")
    def scan_aot(u: TD, delta: TD, A: TD, B: TD, C: TD, D: TD, z: TD, delta_bias: TD, ssm_state: TD,
                 delta_softplus: int, d_inner: int, d_state: int, kernels: str, outputs: Tuple[TD], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        if delta_softplus != 1:
            raise ValueError("samba::SelectiveScan kernels implement delta_softplus=1 only")
        rec, ptx = aot_kernel(kernels, "SelectiveScan", sm)
        return _launch(trtp, rec, ptx, {"u": u, "ssm_state": ssm_state}, {})

    @trtp.register(f"{NAMESPACE}::SlidingWindowAttention")
    def swa_desc(q: TD, k: TD, v: TD, k_window: TD, v_window: TD, start_pos: TD, window: int, scale: float,
                 num_heads: int, num_kv_heads: int, head_size: int, kernels: str) -> Tuple[TD, TD, TD]:
        return q.like(), k_window.like(), v_window.like()

    @trtp.autotune(f"{NAMESPACE}::SlidingWindowAttention")
    def swa_tune(q: TD, k: TD, v: TD, k_window: TD, v_window: TD, start_pos: TD,
                 outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        # both precisions are offered; the strongly typed network has fixed q's, and aot_impl checks the kernel's
        return [trtp.AutoTuneCombination(f"{dt}, {dt}, {dt}, FP32, FP32, INT64, {dt}, FP32, FP32") for dt in ("FP32", "FP16")]

    @trtp.aot_impl(f"{NAMESPACE}::SlidingWindowAttention")
    def swa_aot(q: TD, k: TD, v: TD, k_window: TD, v_window: TD, start_pos: TD, window: int, scale: float,
                num_heads: int, num_kv_heads: int, head_size: int, kernels: str, outputs: Tuple[TD], tactic: int
                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        rec, ptx = aot_kernel(kernels, "SlidingWindowAttention", sm)
        baked = rec["constexprs"]["SCALE"]
        if abs(baked - scale) > 1e-6 * abs(scale):
            raise ValueError(f"the kernel was compiled for scale {baked}, the node says {scale}: re-export")
        want = "*fp16" if q.dtype == import_trt()[0].DataType.HALF else "*fp32"
        if rec["args"][0]["type"] != want:
            raise ValueError(f"the kernel was compiled for {rec['args'][0]['type']} q, the node feeds {want}: re-export")
        return _launch(trtp, rec, ptx, {"q": q, "k": k, "k_window": k_window}, {"window": window})

    _registered = True
