"""Plain launchers for the AOT-compiled Triton kernels (plugins/aot.py), called by the TensorRT
plugins' `enqueue` (plugins/trt_plugins.py) and by tools/gpu_first_run.py.

    kernels = KernelSet.open(artifact_or_engine_dir)      # reads kernels/ once; kernels.key: content hash
    scan = Launcher(kernels, "SelectiveScan")             # per plugin instance (one per execution context)
    launch_selective_scan(scan, inputs, outputs, batch=, d_inner=, d_state=, seq=, delta_softplus=, stream=)
    launch_sliding_window_attention(swa, inputs, outputs, batch=, ..., half=False, stream=)

Kernels are bound to the plugin that needs them, never to the process: a plugin carries its
KernelSet's content key (a serialized field, so an engine names its own kernels), and
`KernelSet.by_key(key)` finds the set the builder or the TensorRT backend opened. Two engines with
different kernels (fp16 beside fp32, another head size) in one process each launch their own.

What enqueue costs: the first launch of a Launcher queries the device once (context, compute
capability), picks each kernel's image and loads it (modules are shared per context by the
KernelSet); every later launch is the argument packing and cuLaunchKernel only: no disk I/O, no
driver queries. Real TensorRT calls enqueue during the build to time tactics, with build-time
buffers: the launch then needs nothing but the plugin object itself.

Image choice per kernel (`Launcher.loaded` says which): the cubin of the device's exact arch ->
that arch's PTX (JIT by the driver) -> the portable PTX (the lowest arch's non-"a" PTX, index field
`portable_ptx`), which any newer GPU's driver can JIT. `image="cubin" | "ptx" | "portable"` forces one.

`route="aot_impl"` launches the single-kernel entry points that the tensorrt.plugin route embeds
(plugins/trt_qdp.py), so tools/gpu_first_run.py verifies both routes' kernels with this code.
`inputs` / `outputs` are device pointers (ints) in the op contract's order (docs/op-contracts.md).

STATUS: written against plugins/aot.py's record format; run in CI with a fake driver only.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from samba_edge.plugins.errors import SambaEdgeError

INDEX = "kernels.json"
IMAGES = (None, "cubin", "ptx", "portable")


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


def _sm_number(sm: str) -> int:
    return int(sm.removeprefix("sm_").rstrip("a"))


@dataclass(frozen=True)
class Image:
    kind: str                       # "cubin" | "ptx" | "portable"
    arch: str                       # the arch the image was compiled for
    data: bytes

    def describe(self) -> str:
        return {"cubin": f"cubin {self.arch}", "ptx": f"PTX {self.arch} (driver JIT)",
                "portable": f"portable PTX {self.arch} (driver JIT)"}[self.kind]


class KernelSet:
    """An artifact's kernels/ folder, read once: the index, every record and every image."""

    _open: dict[str, "KernelSet"] = {}          # key -> set: content-addressed, so sets never collide
    _open_lock = threading.Lock()

    def __init__(self, path: str | Path) -> None:
        base = Path(path)
        index_path = next((c for c in (base / "kernels" / INDEX, base / INDEX) if c.is_file()), None)
        if index_path is None:
            raise SambaEdgeError(f"{base} has no kernels/{INDEX} (the AOT-compiled Triton kernels): re-export the "
                                 "artifact with --flavor plugin using a samba-edge that writes kernels")
        self.root = index_path.parent
        raw = index_path.read_bytes()
        try:
            self.index = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SambaEdgeError(f"{index_path} is not valid JSON ({e}); re-export the artifact") from None
        digest = hashlib.sha256(raw)
        self.records: dict[tuple[str, str], dict] = {}          # (sm, kernel) -> record
        self.files: dict[str, bytes] = {}
        for sm, arch in sorted(self.index.get("archs", {}).items()):
            for name, k in sorted(arch.get("kernels", {}).items()):
                try:
                    meta = (self.root / k["files"]["meta"]).read_bytes()
                    for f in k["files"].values():
                        self.files[f] = (self.root / f).read_bytes()
                except (OSError, KeyError) as e:
                    raise SambaEdgeError(f"{self.root}: kernel {name} for {sm} is incomplete ({e}); "
                                         "re-export the artifact") from None
                digest.update(meta)
                digest.update(hashlib.sha256(b"".join(self.files[f] for f in sorted(k["files"].values()))).digest())
                self.records[(sm, name)] = {**json.loads(meta), "files": k["files"],
                                            "launch_order": k.get("launch_order", 0)}
        self.key = digest.hexdigest()[:32]
        self._functions: dict[tuple, Any] = {}                  # (context, kernel, image) -> (module, function)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> "KernelSet":
        """Read `path`'s kernels and make them findable by their key (what plugins serialize)."""
        ks = cls(path)
        with cls._open_lock:
            return cls._open.setdefault(ks.key, ks)

    @classmethod
    def by_key(cls, key: str) -> "KernelSet":
        ks = cls._open.get(key)
        if ks is None:
            raise SambaEdgeError(f"the samba.* plugin kernels {key[:12]} are not loaded in this process: open the "
                                 "engine through samba_edge.runtime (open_model), or call "
                                 "samba_edge.plugins.trt_launch.KernelSet.open(ENGINE_OR_ARTIFACT_DIR) first")
        return ks

    # ---- choosing ---------------------------------------------------------------------------
    def kernel_names(self, op: str, route: str) -> list[str]:
        names = self.index.get("ops", {}).get(op, []) if route == "python" else [self.index.get("aot_impl", {}).get(op)]
        names = [n for n in names if n]
        if not names:
            raise SambaEdgeError(f"{self.root / INDEX} lists no {route}-route kernels for samba.{op}; re-export")
        return names

    def image(self, name: str, sm: str, force: Optional[str] = None,
              kinds: tuple = ("cubin", "ptx", "portable")) -> tuple[dict, Image]:
        """(record, image) of kernel `name` for a device of arch `sm`: exact cubin -> same-arch PTX -> portable PTX
        (`kinds` narrows the order, `force` picks one)."""
        portable = self.index.get("portable_ptx")
        tried = []
        for kind, arch in (("cubin", sm), ("ptx", sm), ("portable", portable)):
            if kind not in kinds or force not in (None, kind) or arch is None:
                continue
            rec = self.records.get((arch, name))
            f = rec["files"].get("cubin" if kind == "cubin" else "ptx") if rec else None
            if f is None:
                tried.append(f"{kind} {arch}: none")
                continue
            if kind == "portable" and _sm_number(sm) < _sm_number(arch):
                tried.append(f"portable PTX is {arch}, newer than the device")
                continue
            data = self.files[f] if kind == "cubin" else self.files[f] + b"\0"
            return rec, Image(kind, arch, data)
        errs = [e for e in self.index.get("errors", []) if e.startswith(f"{name} for {sm}")]
        raise SambaEdgeError(f"{self.root / INDEX} has no usable image of {name} for this GPU ({sm}; tried "
                             f"{'; '.join(tried) or 'nothing'}{'; compile error: ' + errs[0] if errs else ''}): "
                             f"re-export with a samba-edge that targets {sm}")

    def function(self, driver, ctx: int, rec: dict, image: Image):
        key = (ctx, rec["kernel"], image.kind, image.arch)
        with self._lock:
            if key not in self._functions:
                mod = cuda_check(driver.cuModuleLoadData(image.data), f"cuModuleLoadData({rec['kernel']}, "
                                 f"{image.describe()})", SambaEdgeError)
                fn = cuda_check(driver.cuModuleGetFunction(mod, rec["entry"].encode()),
                                f"cuModuleGetFunction({rec['entry']})", SambaEdgeError)
                if rec.get("needs_shared_mem_opt_in"):
                    cuda_check(driver.cuFuncSetAttribute(
                        fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        int(rec["shared_mem_bytes"])), "cuFuncSetAttribute", SambaEdgeError)
                self._functions[key] = (mod, fn)
            return self._functions[key][1]


def grid_value(expr: str, env: dict[str, int]) -> int:
    """Evaluate a grid formula of aot.py ('cdiv(E, 32)', 'b * H', '1') over integer variables."""
    from samba_edge.plugins.aot import eval_grid_expr

    try:
        return int(eval_grid_expr(expr, env))
    except ValueError as e:
        raise SambaEdgeError(f"{e} in kernels metadata") from None


class Launcher:
    """One op's kernels for one device context: prepared on the first launch, then launch-only."""

    def __init__(self, kernels: KernelSet, op: str, route: str = "python", image: Optional[str] = None) -> None:
        if image not in IMAGES:
            raise ValueError(f"image must be one of {IMAGES}, got {image!r}")
        self.kernels, self.op, self.route, self.force = kernels, op, route, image
        self._prepared: Optional[list[tuple[dict, Any]]] = None
        self.loaded: list[str] = []                             # "swa_fwd_kernel: cubin sm_90", ...

    def _prepare(self, driver) -> list[tuple[dict, Any]]:
        ctx = int(cuda_check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent", SambaEdgeError))
        dev = cuda_check(driver.cuCtxGetDevice(), "cuCtxGetDevice", SambaEdgeError)
        a = driver.CUdevice_attribute
        cc = [cuda_check(driver.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute", SambaEdgeError)
              for attr in (a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)]
        sm = f"sm_{cc[0]}{cc[1]}"
        out = []
        for name in self.kernels.kernel_names(self.op, self.route):
            rec, image = self.kernels.image(name, sm, self.force)
            qtype = next((a["type"] for a in rec["args"] if a["value"].get("name") in ("q", "k")), None)
            rec = {**rec, "activation_type": qtype} if qtype else rec
            out.append((rec, self.kernels.function(driver, ctx, rec, image)))
            self.loaded.append(f"{rec['entry']}: {image.describe()}")
        return sorted(out, key=lambda rf: rf[0]["launch_order"])

    def launch(self, inputs, outputs, shapes: dict, grid_env: dict, attrs: dict, stream: int, half: bool = False):
        driver = _driver()
        if self._prepared is None:
            self._prepared = self._prepare(driver)
        want = "*fp16" if half else "*fp32"
        for rec, fn in self._prepared:
            qtype = rec.get("activation_type", want)
            if qtype != want:
                raise SambaEdgeError(f"{rec['entry']} was compiled for {qtype} activations but the engine feeds "
                                     f"{want}: re-export with kernels for this dtype")
            grid = [grid_value(g, grid_env) for g in rec["grid"]]
            if 0 in grid:
                continue
            bx, by, bz = rec["block"]
            cuda_check(driver.cuLaunchKernel(fn, *grid, bx, by, bz, int(rec["shared_mem_bytes"]), stream,
                                             _args(rec, inputs, outputs, shapes, attrs), 0),
                       f"cuLaunchKernel({rec['entry']})", SambaEdgeError)


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


def launch_selective_scan(launcher: Launcher, inputs: Sequence[int], outputs: Sequence[int], *, batch: int,
                          d_inner: int, d_state: int, seq: int, delta_softplus: int, stream: int) -> None:
    """samba.SelectiveScan: inputs u, delta, A, B, C, D, z, delta_bias, ssm_state; outputs y, ssm_state_out."""
    if int(delta_softplus) != 1:
        raise SambaEdgeError("SelectiveScan kernels implement delta_softplus=1 only")
    shapes = {"u": (batch, d_inner, seq), "ssm_state": (batch, d_inner, d_state)}
    launcher.launch(inputs, outputs, shapes, {"b": batch, "E": d_inner, "T": seq}, {}, stream)


def launch_sliding_window_attention(launcher: Launcher, inputs: Sequence[int], outputs: Sequence[int], *,
                                    batch: int, num_heads: int, num_kv_heads: int, seq: int, head_size: int,
                                    window_rows: int, window: int, scale: float, half: bool, stream: int) -> None:
    """samba.SlidingWindowAttention: inputs q, k, v, k_window, v_window, start_pos; outputs y, k/v_window_out."""
    b, H, G, T, hs, C = batch, num_heads, num_kv_heads, seq, head_size, window_rows
    shapes = {"q": (b, H, T, hs), "k": (b, G, T, hs), "v": (b, G, T, hs), "k_window": (b, G, C, hs)}
    launcher.launch(inputs, outputs, shapes, {"b": b, "H": H, "G": G, "T": T, "C": C},
                    {"window": window, "scale": scale}, stream, half=half)
