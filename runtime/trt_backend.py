"""TensorRT backend (the same interface as runtime/backends.py): runs an engine from `samba-edge build`.

    backend = TrtBackend("engine_dir")                 # artifact from engine.json, or pass artifact=
    logits, next_state = backend.run(input_ids, start_pos, state)      # numpy in, numpy out

Profile 0 (decode) serves seq == 1, profile 1 (prefill) 1 < seq <= max_chunk. Buffers are device
allocations via cuda-python (`cuda.bindings.runtime`), grown on demand; the samba.* plugins are
registered and pointed at the artifact's AOT kernels before the engine is deserialized.

STATUS: UNTESTED. Written against the TensorRT 10 Python API (name-based tensors, execute_async_v3);
no GPU was available where it was written, it is not wired into `open_model` / `--backend`, and
nothing in tests/ runs it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise SambaEdgeError("the trt backend needs cuda-python: pip install cuda-bindings") from None
    return cudart


def _ok(result, what: str):
    from samba_edge.plugins.trt_launch import cuda_check

    return cuda_check(result, what, SambaEdgeError)


class TrtBackend:
    name = "trt"

    def __init__(self, engine_dir: str | Path, artifact: Optional[str | Path] = None) -> None:
        from samba_edge.plugins.trt_import import import_trt

        self.directory = Path(engine_dir)
        try:
            self.meta = json.loads((self.directory / "engine.json").read_text())
        except FileNotFoundError:
            raise SambaEdgeError(f"{engine_dir} is not an engine directory (no engine.json); "
                                 "create one with `samba-edge build`") from None
        art = Path(artifact) if artifact is not None else Path(self.meta["artifact"]["path"])
        self.manifest = Manifest.load(art)
        if self.manifest.fingerprint != self.meta["artifact"]["fingerprint"]:
            raise SambaEdgeError(f"{engine_dir} was built from other weights than {art}; rebuild the engine")
        trt, info = import_trt()
        if info.flavor != self.meta["tensorrt"]["flavor"] or info.version != self.meta["tensorrt"]["version"]:
            raise SambaEdgeError(f"{engine_dir} was built with {self.meta['tensorrt']['flavor']} "
                                 f"{self.meta['tensorrt']['version']}, this is {info.flavor} {info.version}: rebuild it")
        if self.manifest.flavor == "plugin":
            from samba_edge.plugins.trt_launch import set_kernels_dir
            from samba_edge.plugins.trt_plugins import register_plugins

            register_plugins()
            set_kernels_dir(art)
        self.cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((self.directory / self.meta["engine_file"]).read_bytes())
        if self.engine is None:
            raise SambaEdgeError(f"TensorRT could not load {engine_dir} (another GPU or TensorRT version?); rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = _ok(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._in = [t.name for t in self.manifest.inputs]
        self._out = [t.name for t in self.manifest.outputs]
        self._buffers: dict[str, tuple[int, int]] = {}          # name -> (pointer, bytes)
        self._profile: Optional[int] = None
        self.max_chunk = int(self.meta["max_chunk"])
        self.max_batch = int(self.meta["max_batch"])

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                _ok(self.cudart.cudaFree(ptr), "cudaFree")
            size = max(nbytes, 256)
            ptr = int(_ok(self.cudart.cudaMalloc(size), "cudaMalloc"))
            self._buffers[name] = (ptr, size)
        return ptr

    def run(self, input_ids: np.ndarray, start_pos: np.ndarray, state: Sequence[np.ndarray]):
        cu = self.cudart
        input_ids = np.ascontiguousarray(input_ids, np.int64)
        b, t = input_ids.shape
        if not 1 <= b <= self.max_batch or not 1 <= t <= self.max_chunk:
            raise SambaEdgeError(f"batch {b} x seq {t} is outside the engine's profiles "
                                 f"(batch 1..{self.max_batch}, seq 1..{self.max_chunk}); rebuild with larger limits")
        profile = 0 if t == 1 else 1
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, int(self.stream))
            self._profile = profile
        feeds = [input_ids, np.ascontiguousarray(start_pos, np.int64),
                 *(np.ascontiguousarray(s, np.dtype(spec.dtype)) for s, spec in zip(state, self.manifest.inputs[2:]))]
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in zip(self._in, feeds):
            self.context.set_input_shape(name, arr.shape)
            ptr = self._buffer(name, arr.nbytes)
            _ok(cu.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream), "cudaMemcpyAsync")
            self.context.set_tensor_address(name, ptr)
        outs = []
        for name, spec in zip(self._out, self.manifest.outputs):
            shape = tuple(self.context.get_tensor_shape(name))
            arr = np.empty(shape, np.dtype(spec.dtype))
            self.context.set_tensor_address(name, self._buffer(name, arr.nbytes))
            outs.append(arr)
        if not self.context.execute_async_v3(int(self.stream)):
            raise SambaEdgeError("TensorRT failed to run the engine (see the TensorRT log above)")
        for name, arr in zip(self._out, outs):
            _ok(cu.cudaMemcpyAsync(arr.ctypes.data, self._buffers[name][0], arr.nbytes, d2h, self.stream),
                "cudaMemcpyAsync")
        _ok(cu.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return outs[0], outs[1:]

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
