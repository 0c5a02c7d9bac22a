"""The CUDA driver and GPUs as cuda-python's driver API sees them; never raises on a CPU-only machine.
Ground floor: `samba-edge doctor`, the engine builder and the TensorRT backend all ask here.
Each check is {"name", "status": ok | warn | missing | error, "detail"}."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def _check(name: str, status: str, detail: str, **extra) -> dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, **extra}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


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
