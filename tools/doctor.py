"""`samba-edge doctor`: what this machine can do with samba-edge. Never crashes on a CPU-only machine.

Reports TensorRT (flavour + version, or why not), the CUDA driver and GPUs (through cuda-python's
`cuda.bindings.driver` when installed), whether this is a Jetson (JetPack release), whether the samba.*
plugin creators register, Triton, and -- given an artifact -- its AOT kernels for this GPU.
Each check is {"name", "status": ok | warn | missing | error, "detail"}.
"""
from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version as pkg_version
from pathlib import Path
from typing import Any, Optional

STATUSES = ("ok", "warn", "missing", "error")


from samba_edge.plugins.cuda_probe import _check, _first_line, check_cuda  # noqa: F401  (re-exported)


def check_tensorrt() -> dict:
    from samba_edge.plugins.trt_import import import_trt
    from samba_edge.runtime.errors import SambaEdgeError

    try:
        _, info = import_trt()
    except SambaEdgeError as e:
        return _check("tensorrt", "missing", str(e))
    except Exception as e:  # noqa: BLE001
        return _check("tensorrt", "error", _first_line(e))
    note = (" (TensorRT-RTX: builds engines on CPU as a structural check; deploy with TensorRT on the target)"
            if info.flavor == "tensorrt-rtx" else "")
    return _check("tensorrt", "ok", f"{info.flavor} {info.version}{note}", flavor=info.flavor, version=info.version)


def check_jetson() -> Optional[dict]:
    rel = Path("/etc/nv_tegra_release")
    if not rel.exists():
        return None
    head = rel.read_text(errors="replace").splitlines()[0] if rel.stat().st_size else ""
    return _check("jetson", "ok", f"Jetson: {head.strip('# ').strip()} (see docs/jetson.md)")


def check_plugins(trt_ok: bool) -> dict:
    if not trt_ok:
        return _check("plugins", "missing", "needs TensorRT")
    try:
        from samba_edge.plugins.trt_import import import_trt
        from samba_edge.plugins.trt_plugins import NAMESPACE, VERSION, register_plugins

        trt, _ = import_trt()
        creators = register_plugins()
        reg = trt.get_plugin_registry()
        names = [c.name for c in creators if reg.get_creator(c.name, VERSION, NAMESPACE) is not None]
        if len(names) != 2:
            return _check("plugins", "error", f"only {names} registered")
        from samba_edge.plugins.trt_qdp import aot_route_available

        aot = ("aot_impl route available (engines run without Python)" if aot_route_available() else
               "aot_impl route unavailable (needs TensorRT >= 10.9): engines run in samba-edge's runtime")
        return _check("plugins", "ok", f"{NAMESPACE}::{', '.join(names)} v{VERSION} registered (python route); {aot}")
    except Exception as e:  # noqa: BLE001
        return _check("plugins", "error", _first_line(e))


def check_triton() -> dict:
    try:
        v = pkg_version("triton")
    except PackageNotFoundError:
        return _check("triton", "missing", "not installed (needed only to compile kernels at export: pip install triton)")
    return _check("triton", "ok", f"triton {v} (AOT kernel compilation at export needs no GPU)")


def check_kernels(artifact: Optional[str], sm: Optional[str]) -> Optional[dict]:
    if artifact is None:
        return None

    from samba_edge.runtime.manifest import Manifest
    from samba_edge.runtime.errors import SambaEdgeError

    try:
        m = Manifest.load(artifact)
    except SambaEdgeError as e:
        return _check("kernels", "error", str(e))
    if m.flavor != "plugin":
        return _check("kernels", "ok", f"{m.flavor} flavour: no custom kernels needed")
    from samba_edge.plugins.trt_launch import KernelSet

    try:
        ks = KernelSet(artifact)
    except SambaEdgeError as e:
        return _check("kernels", "missing", f"{e}; the TensorRT plugins cannot run")
    archs = sorted(ks.index.get("archs", {}))
    portable = ks.index.get("portable_ptx")
    have = f"kernels for {', '.join(archs) or 'no arch'}" + (f" (portable PTX {portable})" if portable else "")
    if sm is None:
        return _check("kernels", "ok", f"{have} (no GPU here to match)", archs=archs)
    try:                                            # what the launcher would load on this GPU, kernel by kernel
        names = {n for ns in ks.index.get("ops", {}).values() for n in ns} | set(ks.index.get("aot_impl", {}).values())
        images = sorted({ks.image(name, sm)[1].describe() for name in names})
    except SambaEdgeError as e:
        return _check("kernels", "error", f"{have}; this GPU is {sm}: {e}", archs=archs)
    return _check("kernels", "ok", f"{have}; this GPU ({sm}) loads {', '.join(images)}", archs=archs)


def run_doctor(artifact: Optional[str] = None) -> dict:
    checks = []
    try:
        se = pkg_version("samba-edge")
    except PackageNotFoundError:
        se = "unknown"
    trt = check_tensorrt()
    drv, gpu, sm = check_cuda()
    checks += [trt, drv, gpu]
    jet = check_jetson()
    if jet:
        checks.append(jet)
    checks += [check_plugins(trt["status"] == "ok"), check_triton()]
    for mod, pkg in (("onnxruntime", "onnxruntime"), ("torch", "torch")):
        try:
            checks.append(_check(mod, "ok", f"{pkg} {pkg_version(pkg)}"))
        except PackageNotFoundError:
            checks.append(_check(mod, "missing", f"not installed (pip install {pkg})"))
    k = check_kernels(artifact, sm)
    if k:
        checks.append(k)
    can_build = trt["status"] == "ok"
    can_run = can_build and gpu["status"] == "ok" and trt.get("flavor") == "tensorrt"
    return {"samba_edge": se, "python": sys.version.split()[0], "platform": f"{platform.system()} {platform.machine()}",
            "checks": checks, "can_build_engine": can_build, "can_run_engine": can_run}


def render_text(report: dict) -> str:
    mark = {"ok": "ok  ", "warn": "warn", "missing": "--  ", "error": "FAIL"}
    lines = [f"samba-edge {report['samba_edge']}, Python {report['python']}, {report['platform']}"]
    for c in report["checks"]:
        lines.append(f"  [{mark[c['status']]}] {c['name']:<12} {c['detail']}")
    lines.append(f"build engines: {'yes' if report['can_build_engine'] else 'no'}; "
                 f"run TensorRT engines: {'yes' if report['can_run_engine'] else 'no'}")
    return "\n".join(lines)
