"""Ahead-of-time compilation of the Triton kernels for the TensorRT plugins: PTX + cubin per GPU arch.

No GPU is needed: `triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda",
ARCH, 32))` runs Triton's compiler and NVIDIA's `ptxas` on the host. For each kernel and arch this
writes the PTX, the cubin and a JSON record with everything a launcher (the TensorRT plugin's
`enqueue`, or tools/gpu_first_run.py) needs: entry name, block size (num_warps * 32), dynamic shared
memory bytes, the grid formula, and the exact argument order, including the two trailing pointer
parameters Triton appends to every kernel (global and profile scratch; both sizes are checked to be 0,
so pass null).

    write_kernels(out_dir, cfg) -> index     # out_dir/kernels/<sm_XX>/<kernel>.{ptx,cubin,json}
                                             # + out_dir/kernels/kernels.json (the index, returned)

Archs: sm_75/80/86/87/89/90/100/110/120 (ARCHS), each with its cubin and its own PTX; sm_75's PTX
(non-"a" target, ISA 6.5) is also the portable PTX (index["portable_ptx"]) that the driver of any
newer GPU JIT-compiles. A launcher picks: exact cubin -> same-arch PTX -> portable PTX.

Shapes (E, T, H, G, W, ...) are runtime arguments, so one compile per arch serves every model with
the same d_state and head_size (compile-time constants, part of the cache key). Compiled results are
cached under $SAMBA_EDGE_CACHE/kernels (default ~/.cache/samba-edge/kernels), keyed by the Triton
version, the kernel source file's hash, the arch and every compile option, so exports stay fast.

See docs/kernels.md for which PTX version targets which JetPack / driver.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import operator
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KERNELS_DIR = "kernels"
INDEX = "kernels.json"
SMEM_DEFAULT_LIMIT = 49152          # above this a launcher must opt in (cuFuncSetAttribute)


# ---- targets --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    arch: int                       # compute capability * 10
    ptx_version: int                # PTX ISA .version * 10 written into the PTX
    ptxas: str                      # "ptxas" (Triton's bundled CUDA 12.x assembler) | "ptxas-blackwell" (CUDA 13.x)
    devices: str
    needs: str                      # the oldest driver / JetPack that loads this PTX

    @property
    def sm(self) -> str:            # folder name and the PTX .target (Triton uses "a" targets from sm_90 on)
        return f"sm_{self.arch}"

    @property
    def arch_specific(self) -> bool:  # an "a" target: runs on exactly this compute capability, no JIT onto newer
        return self.arch >= 90

    @property
    def ptx_target(self) -> str:
        return f"sm_{self.arch}{'a' if self.arch_specific else ''}"


# PTX versions: a driver JIT-compiles PTX only up to the ISA version of its own CUDA release, and
# Triton's default is the ISA of the ptxas it ships (PTX 8.8 for CUDA 12.9, 9.4 for 13.4) -- too new
# for the drivers our users have. So each arch gets the lowest ISA that knows its target:
#  - sm_75 Turing (T4, RTX 20): ISA 6.5 (CUDA 10.2; see the ArchSpec). Also the PORTABLE PTX (below).
#  - sm_80 A100/A30: ISA 7.0 (CUDA 11.0); sm_86 A10/A40/RTX 30: ISA 7.1 (CUDA 11.1);
#    sm_89 L4/L40/RTX 40: ISA 7.8 (CUDA 11.8). Triton emits identical code at these ISAs and at 8.x.
#  - sm_87 Jetson Orin: JetPack 6.1/6.2 = L4T r36.4 = CUDA 12.6, whose driver accepts PTX ISA <= 8.5
#    (CUDA 12.5 and 12.6 both ship ISA 8.5). 8.5 therefore JIT-loads there; 8.8 would be refused.
#  - sm_90a H100/H200: ISA 8.0 (CUDA 12.0, the first with sm_90a): any CUDA 12.x or 13.x driver.
#  - sm_100a B200/GB200 and sm_120a RTX 50 / RTX PRO Blackwell: ISA 8.7 (CUDA 12.8, the first
#    release with these targets).
#  - sm_110a Jetson Thor: ISA 9.0 (CUDA 13.0 = JetPack 7.0; sm_110 exists only from CUDA 13 on).
# Cubins: for every arch but 110 we assemble with Triton's bundled CUDA 12.9 ptxas (by default Triton
# uses its CUDA 13.x ptxas for arch >= 90), so the cubins are CUDA 12 cubins that drivers of the
# CUDA 12 family load through minor-version compatibility; sm_110 needs the CUDA 13 ptxas.
# "a" targets (sm_90a, ...) are arch-specific: sm_90a code runs on CC 9.0 only, sm_100a on 10.0 only.
# Triton 3.9 emits non-"a" targets below sm_90, whose PTX any later GPU's driver can JIT-compile.
ARCHS: dict[int, ArchSpec] = {a.arch: a for a in (
    # 6.5, not the 6.3 LLVM accepts: fp16 attention at head size <= 16 selects ldmatrix (ISA 6.5), and
    # at 6.3 LLVM aborts the process ("Cannot select: intrinsic llvm.nvvm.ldmatrix")
    ArchSpec(75, 65, "ptxas", "T4 / RTX 20xx / Quadro RTX (Turing)", "CUDA 10.2 driver (R440) or newer"),
    ArchSpec(80, 70, "ptxas", "A100 / A30 / A800", "CUDA 11.0 driver (R450) or newer"),
    ArchSpec(86, 71, "ptxas", "A10 / A16 / A40 / RTX 30xx / RTX A2000-A6000", "CUDA 11.1 driver (R455) or newer"),
    ArchSpec(87, 85, "ptxas", "Jetson AGX Orin / Orin NX / Orin Nano", "JetPack 6.1/6.2 (CUDA 12.6 driver) or newer"),
    ArchSpec(89, 78, "ptxas", "L4 / L40 / L40S / RTX 40xx / RTX Ada", "CUDA 11.8 driver (R520) or newer"),
    ArchSpec(90, 80, "ptxas", "H100 / H200 / GH200", "CUDA 12.0 driver (R525) or newer"),
    ArchSpec(100, 87, "ptxas", "B200 / GB200", "CUDA 12.8 driver (R570) or newer"),
    ArchSpec(110, 90, "ptxas-blackwell", "Jetson Thor", "JetPack 7.0 (CUDA 13.0) or newer"),
    ArchSpec(120, 87, "ptxas", "RTX 50xx / RTX PRO Blackwell", "CUDA 12.8 driver (R570) or newer"),
)}

# The portable PTX: the lowest arch's PTX, a non-"a" target at a low ISA (sm_75, ISA 6.5 = CUDA 10.2),
# which the driver of any newer GPU JIT-compiles -- GPUs without an exact image of their own (sm_103
# B300, sm_121 GB10, ...) and older drivers than an arch's own PTX needs (JetPack 5 / 6.0 on Orin).
# The index names it: index["portable_ptx"] = "sm_75" (None when sm_75 was not compiled).
PORTABLE_PTX_ARCH = 75

# The lowest PTX ISA (x10) LLVM's NVPTX backend in Triton 3.9 accepts per target (measured: one below
# aborts the whole process with "LLVM ERROR: PTX version X does not support target", which no
# try/except catches, so compile_kernel refuses such an ArchSpec up front).
MIN_PTX_VERSION = {75: 63, 80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 110: 90, 120: 87}

assert not ARCHS[PORTABLE_PTX_ARCH].arch_specific and PORTABLE_PTX_ARCH == min(ARCHS)


# ---- kernels --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    name: str                       # the kernel's parameter name
    type: str                       # Triton signature type: *fp32, *i64, i32, fp32
    value: dict                     # where the launcher takes it from

    def record(self, index: int) -> dict:
        ctype = {"*fp32": "float*", "*fp16": "__half*", "*bf16": "__nv_bfloat16*", "*i64": "int64_t*", "*i8": "void*",
                 "i32": "int32_t", "fp32": "float"}[self.type]
        return {"index": index, "name": self.name, "type": self.type, "ctype": ctype,
                "bytes": 8 if self.type.startswith("*") else 4, "value": self.value}


def _in(i: int, name: str) -> dict:
    return {"kind": "input", "index": i, "name": name}


def _out(i: int, name: str) -> dict:
    return {"kind": "output", "index": i, "name": name}


def _dim(tensor: str, axis: int) -> dict:
    return {"kind": "shape", "tensor": tensor, "axis": axis}


def _attr(name: str) -> dict:
    return {"kind": "attribute", "name": name}


# Triton appends two pointer parameters to every kernel (global scratch, profile scratch); with both
# sizes 0 (checked at compile time) the launcher passes null.
TRAILING = [Arg("global_scratch", "*i8", {"kind": "null", "why": "Triton global scratch (size 0)"}),
            Arg("profile_scratch", "*i8", {"kind": "null", "why": "Triton profile scratch (size 0)"})]


@dataclass(frozen=True)
class KernelSpec:
    name: str                       # our name; also the file stem
    op: str                         # the ONNX op (plugin) it implements
    module: str                     # plugins/<module>.py
    fn: str                         # the @triton.jit function (= the PTX entry name)
    args: tuple                     # runtime arguments, in the kernel's order
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple                     # three expressions (integers, +, *, cdiv(a, b)) over `grid_vars`
    grid_vars: dict = field(default_factory=dict)   # name -> {"kind": "shape", "tensor", "axis"}
    launch_order: int = 0           # within one op
    route: str = "python"           # python: launched by trt_launch; aot_impl: embedded by tensorrt.plugin

    def signature(self) -> dict:
        sig = {a.name: a.type for a in self.args}
        sig.update({k: "constexpr" for k in self.constexprs})
        return sig


def _cfg_get(cfg, name: str):
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def kernel_specs(cfg, dtype: str = "fp32") -> list[KernelSpec]:
    """The kernels one artifact needs, specialised to its d_state and head_size (everything else runtime)."""
    from samba_edge.plugins import triton_scan as ts, triton_swa as tw   # launch constants (plain ints)

    N, hs = int(_cfg_get(cfg, "d_state")), int(_cfg_get(cfg, "head_size"))
    f = f"*{dtype}"
    scan_args = (Arg("u_ptr", "*fp32", _in(0, "u")), Arg("delta_ptr", "*fp32", _in(1, "delta")),
                 Arg("A_ptr", "*fp32", _in(2, "A")), Arg("B_ptr", "*fp32", _in(3, "B")),
                 Arg("C_ptr", "*fp32", _in(4, "C")), Arg("D_ptr", "*fp32", _in(5, "D")),
                 Arg("z_ptr", "*fp32", _in(6, "z")), Arg("delta_bias_ptr", "*fp32", _in(7, "delta_bias")),
                 Arg("state_ptr", "*fp32", _in(8, "ssm_state")), Arg("y_ptr", "*fp32", _out(0, "y")),
                 Arg("state_out_ptr", "*fp32", _out(1, "ssm_state_out")),
                 Arg("E", "i32", _dim("u", 1)), Arg("T", "i32", _dim("u", 2)))
    swa_args = (Arg("q_ptr", f, _in(0, "q")), Arg("k_ptr", f, _in(1, "k")), Arg("v_ptr", f, _in(2, "v")),
                Arg("kw_ptr", "*fp32", _in(3, "k_window")), Arg("vw_ptr", "*fp32", _in(4, "v_window")),
                Arg("start_ptr", "*i64", _in(5, "start_pos")), Arg("y_ptr", f, _out(0, "y")),
                Arg("H", "i32", _dim("q", 1)), Arg("G", "i32", _dim("k", 1)), Arg("T", "i32", _dim("q", 2)),
                Arg("W", "i32", _attr("window")), Arg("C", "i32", _dim("k_window", 2)),
                Arg("scale", "fp32", _attr("scale")))
    upd_args = (Arg("k_ptr", f, _in(1, "k")), Arg("v_ptr", f, _in(2, "v")),
                Arg("kw_ptr", "*fp32", _in(3, "k_window")), Arg("vw_ptr", "*fp32", _in(4, "v_window")),
                Arg("kw_out_ptr", "*fp32", _out(1, "k_window_out")),
                Arg("vw_out_ptr", "*fp32", _out(2, "v_window_out")),
                Arg("T", "i32", _dim("k", 2)), Arg("C", "i32", _dim("k_window", 2)))
    bd = tw.block_d(hs)
    return [
        KernelSpec("selective_scan", "SelectiveScan", "triton_scan", "selective_scan_fwd_kernel", scan_args,
                   {"N": N, "BLOCK_N": ts.block_n(N), "BLOCK_E": ts.BLOCK_E}, ts.NUM_WARPS, ts.NUM_STAGES,
                   (f"cdiv(E, {ts.BLOCK_E})", "b", "1"),
                   {"b": _dim("u", 0), "E": _dim("u", 1)}),
        KernelSpec("swa_attention", "SlidingWindowAttention", "triton_swa", "swa_fwd_kernel", swa_args,
                   {"HEAD_DIM": hs, "BLOCK_D": bd, "BLOCK_M": tw.BLOCK_M, "BLOCK_N": tw.BLOCK_N},
                   tw.NUM_WARPS, tw.num_stages(dtype == "fp16"), (f"cdiv(T, {tw.BLOCK_M})", "b * H", "1"),
                   {"b": _dim("q", 0), "H": _dim("q", 1), "T": _dim("q", 2)}, launch_order=0),
        KernelSpec("swa_window_update", "SlidingWindowAttention", "triton_swa", "swa_window_update_kernel", upd_args,
                   {"HEAD_DIM": hs, "BLOCK_D": bd, "BLOCK_R": tw.BLOCK_R}, tw.UPDATE_NUM_WARPS, 1,
                   (f"cdiv(C, {tw.BLOCK_R})", "b * G", "1"),
                   {"b": _dim("k", 0), "G": _dim("k", 1), "C": _dim("k_window", 2)}, launch_order=1),
        # the aot_impl route (plugins/trt_qdp.py): one kernel per op, args = inputs, int32 scalars, outputs
        KernelSpec("selective_scan_qdp", "SelectiveScan", "triton_scan", "selective_scan_qdp_kernel",
                   scan_args[:9] + scan_args[11:] + scan_args[9:11],
                   {"N": N, "BLOCK_N": ts.block_n(N), "BLOCK_E": ts.BLOCK_E}, ts.NUM_WARPS, ts.NUM_STAGES,
                   (f"cdiv(E, {ts.BLOCK_E})", "b", "1"), {"b": _dim("u", 0), "E": _dim("u", 1)}, route="aot_impl"),
        KernelSpec("swa_qdp", "SlidingWindowAttention", "triton_swa", "swa_qdp_kernel",
                   swa_args[:6] + swa_args[7:12] + (Arg("BG", "i32", {"kind": "product", "of": [_dim("k", 0), _dim("k", 1)]}),)
                   + (swa_args[6],) + upd_args[4:6],
                   {"SCALE": float(_cfg_get(cfg, "head_size")) ** -0.5, "HEAD_DIM": hs, "BLOCK_D": bd,
                    "BLOCK_M": tw.BLOCK_M, "BLOCK_N": tw.BLOCK_N, "BLOCK_R": tw.BLOCK_R},
                   tw.NUM_WARPS, tw.num_stages(dtype == "fp16"), (f"cdiv(T, {tw.BLOCK_M}) + cdiv(C, {tw.BLOCK_R})", "b * H", "1"),
                   {"b": _dim("q", 0), "H": _dim("q", 1), "T": _dim("q", 2), "C": _dim("k_window", 2)},
                   route="aot_impl"),
    ]


# ---- compiling ------------------------------------------------------------------------------
@contextlib.contextmanager
def _env(**changes: Optional[str]):
    def apply(values: dict) -> None:                       # None means: unset
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in changes}
    try:
        apply(changes)
        yield
    finally:
        apply(old)


def _kernel_module(module: str):
    """The kernel module, whose @triton.jit functions must be compiled-mode JITFunctions."""
    import importlib

    import triton

    mod = importlib.import_module(f"samba_edge.plugins.{module}")
    if triton.knobs.runtime.interpret or not all(isinstance(getattr(mod, s.fn, None), triton.runtime.JITFunction)
                                                 for s in kernel_specs({"d_state": 1, "head_size": 1})
                                                 if s.module == module):
        # triton.language itself is in interpreter mode in such a process; AOT needs a clean one
        raise RuntimeError("ahead-of-time compilation cannot run in a process with TRITON_INTERPRET=1 "
                           "(Triton's interpreter mode); run it in a separate process")
    return mod


def _source_hash(module: str) -> str:
    return hashlib.sha256(Path(__file__).with_name(f"{module}.py").read_bytes()).hexdigest()


def _ptxas(kind: str):
    import triton

    tool = getattr(triton.knobs.nvidia, "ptxas" if kind == "ptxas" else "ptxas_blackwell")
    if tool is None:
        raise RuntimeError(f"Triton's {kind} is missing from this triton install")
    return tool


def cache_root() -> Path:
    return Path(os.environ.get("SAMBA_EDGE_CACHE") or "~/.cache/samba-edge").expanduser() / "kernels"


def _options(spec: KernelSpec, arch: ArchSpec) -> dict:
    return {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "ptx_version": arch.ptx_version,
            "enable_fp_fusion": True}


def _attrs(spec: KernelSpec) -> dict:
    """Every pointer is declared 16-byte aligned (lets Triton vectorise); the launcher checks it."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(spec.args) if a.type.startswith("*")}


def _cache_key(spec: KernelSpec, arch: ArchSpec, ptxas_version: str) -> str:
    import triton

    key = {"triton": triton.__version__, "source_sha256": _source_hash(spec.module), "fn": spec.fn,
           "aot_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),      # the record's format
           "arch": arch.arch, "ptxas": [arch.ptxas, ptxas_version], "signature": spec.signature(),
           "constexprs": spec.constexprs, "options": _options(spec, arch),
           "attrs": sorted(str(k) for k in _attrs(spec)), "line_info": False, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _entry_params(ptx: str, entry: str) -> list[str]:
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\(([^)]*)\)", ptx)
    if not m:
        raise RuntimeError(f"entry {entry} not found in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def _resource_usage(cubin: Path, entry: str) -> Optional[dict]:
    """Registers / stack / local memory from `cuobjdump -res-usage` (Triton ships it); None if unavailable."""
    try:
        import triton

        tool = triton.knobs.nvidia.cuobjdump
        out = subprocess.run([tool.path, "-res-usage", str(cubin)], capture_output=True, text=True, timeout=60).stdout
    except Exception:  # noqa: BLE001 - informational only
        return None
    m = re.search(r"Function " + re.escape(entry) + r":\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return None
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "static_shared_bytes": int(m.group(3)),
            "local_bytes": int(m.group(4))}


def compile_kernel(spec: KernelSpec, arch: ArchSpec) -> tuple[Path, dict]:
    """Compile (or fetch from the cache) one kernel for one arch -> (cache dir, record)."""
    import triton
    from triton.backends.compiler import GPUTarget

    low = MIN_PTX_VERSION.get(arch.arch)
    if low is not None and arch.ptx_version < low:     # LLVM would abort the process, not raise
        raise RuntimeError(f"PTX ISA {arch.ptx_version / 10:.1f} does not know {arch.ptx_target}: "
                           f"Triton {triton.__version__} needs at least {low / 10:.1f}")
    ptxas = _ptxas(arch.ptxas)
    key = _cache_key(spec, arch, ptxas.version)
    root = cache_root()
    final = _cache_dir(spec, arch, key)
    if (final / "meta.json").is_file():
        return final, json.loads((final / "meta.json").read_text())

    mod = _kernel_module(spec.module)
    fn = getattr(mod, spec.fn)
    src = triton.compiler.ASTSource(fn, spec.signature(), spec.constexprs, _attrs(spec))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="samba-edge-triton-") as tcache, \
            _env(TRITON_CACHE_DIR=tcache,
                 # no line info: it embeds this machine's absolute source paths in the PTX and cubin
                 TRITON_DISABLE_LINE_INFO="1",
                 # Triton assembles arch >= 90 with its "ptxas-blackwell"; point it at the chosen one
                 TRITON_PTXAS_BLACKWELL_PATH=ptxas.path):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch.arch, 32), options=_options(spec, arch))
    seconds = time.perf_counter() - t0
    md = compiled.metadata
    if md.global_scratch_size or md.profile_scratch_size:
        raise RuntimeError(f"{spec.fn} on {arch.sm} needs Triton scratch memory "
                           f"({md.global_scratch_size}/{md.profile_scratch_size} bytes); the launcher passes null")
    ptx = compiled.asm["ptx"]
    params = _entry_params(ptx, md.name)
    all_args = list(spec.args) + TRAILING
    expected = [{"i32": "u32", "fp32": "f32"}.get(a.type, "u64") for a in all_args]      # pointers: u64
    if params != expected:
        raise RuntimeError(f"{md.name}: the PTX entry's parameters {params} differ from the expected {expected} "
                           "(the kernel's runtime arguments + 2 Triton scratch pointers): Triton's ABI changed")
    record = {
        "kernel": spec.name, "op": spec.op, "entry": md.name, "arch": arch.sm, "ptx_target": arch.ptx_target,
        "ptx_version": f"{arch.ptx_version // 10}.{arch.ptx_version % 10}",
        "ptxas": {"tool": arch.ptxas, "cuda_release": ptxas.version},
        "triton_version": triton.__version__, "source": f"plugins/{spec.module}.py",
        "source_sha256": _source_hash(spec.module), "cache_key": key,
        "constexprs": spec.constexprs, "num_warps": md.num_warps, "num_stages": spec.num_stages,
        "num_ctas": md.num_ctas, "enable_fp_fusion": True,
        "block": [md.num_warps * 32, 1, 1], "grid": list(spec.grid), "grid_vars": spec.grid_vars,
        "shared_mem_bytes": md.shared, "needs_shared_mem_opt_in": md.shared > SMEM_DEFAULT_LIMIT,
        "global_scratch_bytes": md.global_scratch_size, "profile_scratch_bytes": md.profile_scratch_size,
        "cluster_dims": [1, 1, 1], "launch_cooperative_grid": md.launch_cooperative_grid, "launch_pdl": md.launch_pdl,
        "pointer_alignment_bytes": 16,
        "args": [a.record(i) for i, a in enumerate(all_args)],
        "ptx_params": params,
        "compile_seconds": round(seconds, 3),
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        (tmp / "kernel.ptx").write_text(ptx)
        if compiled.asm.get("cubin"):
            (tmp / "kernel.cubin").write_bytes(compiled.asm["cubin"])
            record["resources"] = _resource_usage(tmp / "kernel.cubin", md.name)
        (tmp / "meta.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.replace(tmp, final)                    # atomic; another process may have won the race
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, record


def _cache_dir(spec: KernelSpec, arch: ArchSpec, key: Optional[str] = None) -> Path:
    """The cache folder of one (kernel, arch) compile (`key`: its _cache_key, computed if not given);
    meta.json in it means it is done."""
    key = key or _cache_key(spec, arch, _ptxas(arch.ptxas).version)
    return cache_root() / f"{spec.name}-{arch.sm}-{key[:24]}"


def _compile_quietly(spec: KernelSpec, arch: ArchSpec) -> None:
    try:
        compile_kernel(spec, arch)
    except Exception:  # noqa: BLE001 - write_kernels compiles it again in-process and records the error
        pass


def _precompile(jobs: list[tuple[KernelSpec, ArchSpec]]) -> None:
    """Fill the cache for the jobs it lacks in parallel processes (each compile is one CPU-bound
    Triton + ptxas run; exports compile 5 kernels x 9 archs). Best effort: whatever a worker did not
    leave in the cache, write_kernels compiles in-process, where errors are recorded."""
    import concurrent.futures
    import multiprocessing

    todo = [(s, a) for s, a in jobs if not (_cache_dir(s, a) / "meta.json").is_file()]
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                  len(todo))
    if workers < 2 or os.environ.get("TRITON_INTERPRET") == "1":
        return
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile_quietly, *zip(*todo)))
    except Exception as e:  # noqa: BLE001 - e.g. a worker killed by an LLVM abort: go on serially
        log.warning("parallel kernel compilation stopped (%s); compiling in-process", type(e).__name__)


def requested_archs(spec: Optional[str] = None) -> list[int]:
    """`export --kernel-archs` (else $SAMBA_EDGE_KERNEL_ARCHS, else every arch): "87", "sm_87,90", "all".
    Fewer archs make exports faster and artifacts smaller; without 75 there is no portable PTX for newer GPUs."""
    from samba_edge.plugins.errors import SambaEdgeError

    text = spec if spec is not None else os.environ.get("SAMBA_EDGE_KERNEL_ARCHS", "all")
    if text.strip().lower() in ("", "all"):
        return sorted(ARCHS)
    try:
        archs = sorted({int(x.strip().lower().removeprefix("sm_")) for x in text.split(",") if x.strip()})
    except ValueError:
        archs = []
    if not archs or any(a not in ARCHS for a in archs):
        raise SambaEdgeError(f"kernel archs {text!r}: give a comma-separated list of {', '.join(map(str, sorted(ARCHS)))} "
                             "(e.g. 87 for Jetson Orin, 75,90 for the portable PTX plus H100) or all")
    return archs


def write_kernels(out_dir: Path, cfg, archs: Optional[list[int]] = None, strict: bool = False,
                  dtype: str = "fp32") -> dict:
    """Compile every kernel of the plugin ops for every arch into out_dir/kernels/; returns the index.

    Writes out_dir/kernels/<sm_XX>/<kernel>.ptx / .cubin / .json and out_dir/kernels/kernels.json.
    index["portable_ptx"] names the arch (sm_75) whose PTX is the portable one, which the driver of any
    newer GPU can JIT-compile (None if `archs` leaves it out); index["archs"][sm]["arch_specific"] says
    whether that arch's PTX is an "a" target (runs on exactly that compute capability).
    A kernel that fails to compile for an arch is recorded in the index under "errors" (and logged);
    with strict=True it raises instead.
    """
    import triton

    out = Path(out_dir) / KERNELS_DIR
    out.mkdir(parents=True, exist_ok=True)
    specs = kernel_specs(cfg, dtype)                      # dtype: the attention's q/k/v/y (scan: fp32 always)
    index: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "triton_version": triton.__version__,
        "note": "PTX + cubin of the samba.* plugin kernels; launch per the per-kernel JSON (docs/kernels.md)",
        "model": {"d_state": int(_cfg_get(cfg, "d_state")), "head_size": int(_cfg_get(cfg, "head_size"))},
        "attention_dtype": dtype,
        "ops": {}, "archs": {}, "errors": [],
    }
    for s in specs:                  # "ops": what trt_launch runs; "aot_impl": what trt_qdp embeds
        if s.route == "python":
            index["ops"].setdefault(s.op, []).append(s.name)
        else:
            index.setdefault("aot_impl", {})[s.op] = s.name
    _precompile([(s, ARCHS[a]) for a in (archs or sorted(ARCHS)) for s in specs])
    for a in (archs or sorted(ARCHS)):
        arch = ARCHS[a]
        entry = {"arch": arch.arch, "ptx_target": arch.ptx_target, "arch_specific": arch.arch_specific,
                 "devices": arch.devices, "needs": arch.needs,
                 "ptx_version": f"{arch.ptx_version // 10}.{arch.ptx_version % 10}", "kernels": {}}
        (out / arch.sm).mkdir(exist_ok=True)
        for s in specs:
            try:
                cdir, rec = compile_kernel(s, arch)
            except Exception as e:  # noqa: BLE001 - recorded; an export must not fail on one arch
                if strict:
                    raise
                first = (str(e).strip().splitlines() or [""])[0]
                msg = f"{s.name} for {arch.sm}: {type(e).__name__}: {first}"
                log.warning("kernel compile failed: %s", msg)
                index["errors"].append(msg)
                continue
            files = {"ptx": f"{arch.sm}/{s.name}.ptx", "meta": f"{arch.sm}/{s.name}.json"}
            shutil.copyfile(cdir / "kernel.ptx", out / files["ptx"])
            if (cdir / "kernel.cubin").is_file():
                files["cubin"] = f"{arch.sm}/{s.name}.cubin"
                shutil.copyfile(cdir / "kernel.cubin", out / files["cubin"])
            rec = {**rec, "files": files}
            (out / files["meta"]).write_text(json.dumps(rec, indent=2) + "\n")
            entry["kernels"][s.name] = {"entry": rec["entry"], "files": files,
                                        "shared_mem_bytes": rec["shared_mem_bytes"], "block": rec["block"],
                                        "grid": rec["grid"], "launch_order": s.launch_order, "op": s.op}
        index["archs"][arch.sm] = entry
    # the arch whose PTX any newer GPU's driver can JIT (the launcher's last resort); None if not built
    portable = ARCHS[PORTABLE_PTX_ARCH].sm
    index["portable_ptx"] = portable if portable in index["archs"] else None
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def load_index(artifact_dir: Path) -> dict:
    return json.loads((Path(artifact_dir) / KERNELS_DIR / INDEX).read_text())


# ---- for launchers written in Python (plugins/trt_launch.py, tools/gpu_first_run.py, tests) -----------------------------
def eval_grid_expr(expr: str, names: dict, cdiv=None):
    """Evaluate a grid expression: integers, names, +, *, cdiv(a, b). Nothing else is accepted.
    With `cdiv` given, names may be symbolic (TensorRT shape expressions, plugins/trt_qdp.py)."""
    import ast

    cdiv = cdiv or (lambda a, b: -(-int(a) // int(b)))

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cdiv" \
                and len(node.args) == 2 and not node.keywords:
            return cdiv(ev(node.args[0]), ev(node.args[1]))
        raise ValueError(f"unsupported grid expression {expr!r}")

    return ev(_parse_grid(expr))


@functools.lru_cache(maxsize=256)
def _parse_grid(expr: str):
    """Grid formulas are few and fixed per record: parse each once (enqueue evaluates them per launch)."""
    import ast

    return ast.parse(expr, mode="eval")


def eval_grid(record: dict, shapes: dict[str, tuple]) -> tuple[int, int, int]:
    """The launch grid of a kernel record, given the op's tensor shapes by contract name."""
    names = {n: shapes[v["tensor"]][v["axis"]] for n, v in record["grid_vars"].items()}
    gx, gy, gz = (int(eval_grid_expr(e, names)) for e in record["grid"])
    return gx, gy, gz


def arg_values(record: dict, pointers: dict[str, int], shapes: dict[str, tuple], attributes: dict) -> list:
    """(type, value) per kernel parameter, in order: device pointers by contract name, shape
    values, attributes, and 0 (null) for Triton's trailing scratch pointers. Shapes may be symbolic
    (TensorRT shape expressions, plugins/trt_qdp.py); pointers may then be left out (None)."""
    out = []
    for a in record["args"]:
        v = a["value"]
        kind = v["kind"]
        if kind in ("input", "output"):
            val = pointers.get(v["name"])
        elif kind == "shape":
            val = shapes[v["tensor"]][v["axis"]]
        elif kind == "attribute":
            val = attributes[v["name"]]
        elif kind == "null":
            val = 0
        elif kind == "product":                          # e.g. batch * kv groups (works on symbolic dims too)
            val = functools.reduce(operator.mul, (shapes[d["tensor"]][d["axis"]] for d in v["of"]))
        else:
            raise ValueError(f"unknown argument kind {kind!r}")
        out.append((a["type"], val))
    return out
