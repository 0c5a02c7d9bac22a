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


def _check(name: str, status: str, detail: str, **extra) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, **extra}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


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


def check_cuda() -> tuple[dict, dict, Optional[str]]:
    """(driver check, gpu check, this GPU's sm_XX or None)."""
    try:
        from cuda.bindings import driver
    except Exception as e:  # noqa: BLE001
        hint = "pip install cuda-bindings" if isinstance(e, ImportError) else _first_line(e)
        gpu = _check("gpu", "warn" if Path("/dev/nvidia0").exists() else "missing",
                     "/dev/nvidia0 present (install cuda-bindings to query it)" if Path("/dev/nvidia0").exists()
                     else "no NVIDIA device node (/dev/nvidia0)")
        return _check("cuda_driver", "missing", f"cuda-python not importable ({hint})"), gpu, None
    try:
        (err,) = driver.cuInit(0)
    except Exception as e:  # noqa: BLE001 - libcuda.so missing raises here on some versions
        return (_check("cuda_driver", "missing", f"no CUDA driver ({_first_line(e)})"),
                _check("gpu", "missing", "no CUDA driver"), None)
    if int(err) != 0:
        return (_check("cuda_driver", "missing", f"cuInit failed: {err.name if hasattr(err, 'name') else err}"),
                _check("gpu", "missing", "no usable GPU"), None)
    err, v = driver.cuDriverGetVersion()
    drv = _check("cuda_driver", "ok", f"CUDA driver API {v // 1000}.{(v % 1000) // 10}", version=int(v))
    err, n = driver.cuDeviceGetCount()
    if int(err) != 0 or n == 0:
        return drv, _check("gpu", "missing", "the CUDA driver sees no GPU"), None
    gpus, sm = [], None
    a = driver.CUdevice_attribute
    for i in range(n):
        _, dev = driver.cuDeviceGet(i)
        _, name = driver.cuDeviceGetName(128, dev)
        _, major = driver.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        _, minor = driver.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        _, mem = driver.cuDeviceTotalMem(dev)
        name = name.split(b"\0", 1)[0].decode(errors="replace")
        gpus.append({"index": i, "name": name, "sm": f"sm_{major}{minor}", "memory_gib": round(mem / 2**30, 1)})
        sm = sm or f"sm_{major}{minor}"
    return drv, _check("gpu", "ok", "; ".join(f"{g['name']} ({g['sm']}, {g['memory_gib']} GiB)" for g in gpus),
                       gpus=gpus), sm


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
    import json

    from samba_edge.runtime.manifest import Manifest
    from samba_edge.runtime.errors import SambaEdgeError

    try:
        m = Manifest.load(artifact)
    except SambaEdgeError as e:
        return _check("kernels", "error", str(e))
    if m.flavor != "plugin":
        return _check("kernels", "ok", f"{m.flavor} flavour: no custom kernels needed")
    index = Path(artifact) / "kernels" / "kernels.json"
    if not index.exists():
        return _check("kernels", "missing", f"{index} is missing: the TensorRT plugins cannot run; re-export the "
                                            "artifact with a samba-edge that writes kernels")
    try:
        archs = sorted(json.loads(index.read_text()).get("archs", {}))
    except (OSError, ValueError) as e:
        return _check("kernels", "error", f"{index}: {_first_line(e)}")
    if sm is None:
        return _check("kernels", "ok", f"kernels for {', '.join(archs) or 'no arch'} (no GPU here to match)", archs=archs)
    status = "ok" if sm in archs else "error"
    return _check("kernels", status, f"kernels for {', '.join(archs)}; this GPU is {sm}", archs=archs)


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
