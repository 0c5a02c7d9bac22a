"""An engine directory from `samba-edge build`, checked before CUDA or TensorRT is touched: engine.json
against the manifest beside it, the kernels its plugins name, the TensorRT and GPU at hand. Each
mismatch is a one-line SambaEdgeError naming the fix, never a C++ abort. Torch-, TensorRT- and CUDA-free.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest

ENGINE_JSON = "engine.json"


def check_engine_dir(engine_dir: str | Path) -> tuple[dict, Manifest]:
    """engine.json + the manifest copied beside it, and that they describe the same graph. Torch- and
    TensorRT-free."""
    d = Path(engine_dir)
    try:
        meta = json.loads((d / ENGINE_JSON).read_text())
    except FileNotFoundError:
        raise SambaEdgeError(f"{d} is not an engine directory (no {ENGINE_JSON}); create one with "
                             "`samba-edge build EXPORT_DIR -o ENGINE_DIR`") from None
    except json.JSONDecodeError as e:
        raise SambaEdgeError(f"{d / ENGINE_JSON} is not valid JSON ({e}); rebuild the engine") from None
    man = Manifest.load(d)
    fp = meta.get("artifact", {}).get("fingerprint")
    if fp != man.fingerprint:
        raise SambaEdgeError(f"{d}: the manifest's weights ({man.fingerprint[:12]}) are not the engine's "
                             f"({str(fp)[:12]}); rebuild the engine from the artifact")
    want = [(t.name, t.dtype) for t in man.inputs + man.outputs]
    have = [(t["name"], t["dtype"]) for t in meta.get("inputs", []) + meta.get("outputs", [])]
    if want != have:
        diff = next(((a, b) for a, b in zip(want, have) if a != b), (want[len(have):] or have[len(want):])[:1] + [None])
        raise SambaEdgeError(f"{d}: the engine's tensors do not match its manifest (first difference: {diff[0]} vs "
                             f"{diff[1]}); rebuild the engine from the artifact")
    if not (d / meta.get("engine_file", "engine.plan")).is_file():
        raise SambaEdgeError(f"{d} lacks {meta.get('engine_file', 'engine.plan')}; rebuild the engine")
    if man.flavor == "plugin" and meta.get("plugin_route") == "python":
        check_engine_kernels(d, meta)
    return meta, man


def check_engine_kernels(d: Path, meta: dict):
    """The python-route plugins serialized the key of the kernels they launch: kernels/ beside the engine
    must be those (opened here, so the plugins find them by key once the engine is deserialised)."""
    from samba_edge.plugins.trt_launch import KernelSet

    if not meta.get("kernels"):
        raise SambaEdgeError(f"{d} was built by an older samba-edge whose plugins carry no kernels key; rebuild it "
                             "with `samba-edge build`")
    ks = KernelSet.open(d)
    if ks.key != meta["kernels"]:
        raise SambaEdgeError(f"{d}/kernels ({ks.key[:12]}) are not the kernels the engine was built with "
                             f"({meta['kernels'][:12]}); rebuild the engine from its artifact")
    return ks


def check_runtime_matches(meta: dict, info, gpus: Optional[list]) -> None:
    """The engine must be run by the TensorRT that built it, on the GPU it was built for."""
    built = meta.get("tensorrt", {})
    if (built.get("flavor"), built.get("version")) != (info.flavor, info.version):
        raise SambaEdgeError(f"the engine was built with {built.get('flavor')} {built.get('version')} and this is "
                             f"{info.flavor} {info.version}: engines are tied to one TensorRT version; rebuild it here")
    if not gpus:
        raise SambaEdgeError("no CUDA GPU is visible: TensorRT engines run on NVIDIA GPUs (`samba-edge doctor` says "
                             f"why); on this machine, ONNX Runtime runs {built_from_meta(meta)}")
    want = meta.get("gpu") or {}
    sm = want.get("sm")
    if sm and info.flavor == "tensorrt" and sm != gpus[0]["sm"]:       # TensorRT-RTX engines JIT per GPU
        raise SambaEdgeError(f"the engine was built for {want.get('name', '?')} ({sm}) and this GPU is "
                             f"{gpus[0]['name']} ({gpus[0]['sm']}): build the engine on the device that runs it")


def built_from_meta(meta: dict) -> str:
    """What to run instead of an engine where it cannot run: the artifact it was built from (engine.json)."""
    art = (meta.get("artifact") or {}).get("path")
    if art and (Path(art) / "manifest.json").is_file():
        return f"the artifact the engine was built from: {art}"
    return "the artifact the engine was built from (engine.json names it" + (f": {art}, no longer there)" if art else ")")


def built_from(engine_dir: str | Path) -> str:
    try:
        meta = json.loads((Path(engine_dir) / ENGINE_JSON).read_text())
    except (OSError, ValueError):
        meta = {}
    return built_from_meta(meta if isinstance(meta, dict) else {})
