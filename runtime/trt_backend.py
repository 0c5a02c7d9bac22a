"""TensorRT backend: runs an engine directory from `samba-edge build` behind the runtime's backend interface.

    backend = TrtBackend("engine_dir")                 # open_model(engine_dir) picks it
    state = backend.new_state(1)                       # DeviceState: lives on the GPU
    logits, state = backend.run(input_ids, start_pos, state)

* The recurrent state stays in device memory: each DeviceState owns two buffer sets (ping/pong);
  the engine reads one and writes the other, and they swap. Only token ids / positions go up and
  the logits come down per call; snapshots copy the state to the host (and back), so snapshots from
  ORT or PyTorch restore here and vice versa. Numpy state lists are accepted too (validate, eval).
* Profile 0 (decode) serves seq == 1, profile 1 (prefill) 1 < seq <= max_chunk.
* Decode steps replay a CUDA graph captured per (batch, bound buffers): a stream alternates between
  two graphs. The plugins launch plain kernels through the driver API on TensorRT's stream and
  neither allocate nor synchronise in enqueue, so their launches are captured too.
* Before anything touches CUDA or deserialises the engine, the engine directory is checked against
  its manifest, this TensorRT and this GPU: a mismatch is a one-line error, never a C++ abort.

STATUS: the checks run on CPU in CI (tests/test_trt_build.py), and so does everything after
deserialisation against a simulated CUDA runtime and execution context (tests/test_trt_backend_sim.py);
real TensorRT + CUDA have NOT run it yet (no GPU was available): docs/jetson.md.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest

ENGINE_JSON = "engine.json"
GRAPH_CACHE = 32                                   # captured decode graphs kept (2 per active stream)


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
    return meta, man


def check_runtime_matches(meta: dict, info, gpus: Optional[list]) -> None:
    """The engine must be run by the TensorRT that built it, on the GPU it was built for."""
    built = meta.get("tensorrt", {})
    if (built.get("flavor"), built.get("version")) != (info.flavor, info.version):
        raise SambaEdgeError(f"the engine was built with {built.get('flavor')} {built.get('version')} and this is "
                             f"{info.flavor} {info.version}: engines are tied to one TensorRT version; rebuild it here")
    if not gpus:
        raise SambaEdgeError("no CUDA GPU is visible: the trt backend runs engines on NVIDIA GPUs "
                             "(`samba-edge doctor` says why; use --backend ort on CPU)")
    want = meta.get("gpu") or {}
    sm = want.get("sm")
    if sm and info.flavor == "tensorrt" and sm != gpus[0]["sm"]:       # TensorRT-RTX engines JIT per GPU
        raise SambaEdgeError(f"the engine was built for {want.get('name', '?')} ({sm}) and this GPU is "
                             f"{gpus[0]['name']} ({gpus[0]['sm']}): build the engine on the device that runs it")


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise SambaEdgeError("the trt backend needs cuda-python: pip install cuda-bindings") from None
    return cudart


class DeviceState:
    """A stream's (or a batch's) recurrent state on the GPU: two buffer sets, swapped after each step."""

    def __init__(self, backend: "TrtBackend", batch: int) -> None:
        self.backend, self.batch, self.cur = backend, batch, 0
        self.nbytes = [batch * s_bytes for s_bytes in backend.state_row_bytes]
        self.sets = [[backend.malloc(n) for n in self.nbytes] for _ in range(2)]

    def reads(self) -> list[int]:
        return self.sets[self.cur]

    def writes(self) -> list[int]:
        return self.sets[1 - self.cur]

    def swap(self) -> None:
        self.cur = 1 - self.cur

    def __del__(self) -> None:
        try:
            for ptrs in self.sets:
                for p in ptrs:
                    self.backend.free(p)
        except Exception:  # noqa: BLE001 - interpreter shutdown: the CUDA context may already be gone
            pass


class TrtBackend:
    name = "trt"

    def __init__(self, engine_dir: str | Path, graphs: bool = True) -> None:
        from samba_edge.plugins.trt_import import import_trt
        from samba_edge.tools.doctor import check_cuda

        self.directory = Path(engine_dir)
        self.meta, self.manifest = check_engine_dir(self.directory)
        trt, info = import_trt()
        _, gpu, _ = check_cuda()
        check_runtime_matches(self.meta, info, gpu.get("gpus"))
        if self.manifest.flavor == "plugin" and self.meta.get("plugin_route") == "python":
            from samba_edge.plugins.trt_launch import set_kernels_dir
            from samba_edge.plugins.trt_plugins import register_plugins

            register_plugins()                                 # before deserialisation, every process
            set_kernels_dir(self.directory)                    # kernels/ was copied in by `build`
        cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((self.directory / self.meta["engine_file"]).read_bytes())
        if self.engine is None:
            raise SambaEdgeError(f"TensorRT could not load {engine_dir} (see its log above); rebuild it on this device")
        self._attach(self.engine.create_execution_context(), cudart, graphs)

    def _attach(self, context, cudart, graphs: bool) -> None:
        """Everything after deserialisation: the execution context, a stream, fixed staging buffers.
        (tests/test_trt_backend_sim.py drives this with a simulated CUDA runtime and context.)"""
        self.context, self.cu = context, cudart
        self.stream = self._ok(self.cu.cudaStreamCreate(), "cudaStreamCreate")
        self._in = [t.name for t in self.manifest.inputs]
        self._out = [t.name for t in self.manifest.outputs]
        self.state_row_bytes = [int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.manifest.state]
        self.max_chunk, self.max_batch = int(self.meta["max_chunk"]), int(self.meta["max_batch"])
        V = int(self.manifest.outputs[0].shape[-1])
        rows = 1 if self.manifest.logits == "last" else self.max_chunk
        # fixed staging buffers: their addresses never change, so captured graphs stay valid
        self.ids_buf = self.malloc(self.max_batch * self.max_chunk * 8)
        self.pos_buf = self.malloc(self.max_batch * 8)
        self.logits_buf = self.malloc(self.max_batch * rows * V * 4)
        self._profile: Optional[int] = None
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self.use_graphs = graphs

    # ---- memory ---------------------------------------------------------------------------------
    def _ok(self, result, what: str):
        from samba_edge.plugins.trt_launch import cuda_check

        return cuda_check(result, what, SambaEdgeError)

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.cu.cudaMalloc(max(nbytes, 256)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.cu.cudaFree(ptr)

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        k = getattr(self.cu.cudaMemcpyKind, f"cudaMemcpy{kind}")
        self._ok(self.cu.cudaMemcpyAsync(dst, src, nbytes, k, self.stream), f"cudaMemcpyAsync({kind})")

    def _sync(self) -> None:
        self._ok(self.cu.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    # ---- the state protocol (runtime/backends.py) -----------------------------------------------
    def new_state(self, batch: int) -> DeviceState:
        st = DeviceState(self, batch)
        for p, n in zip(st.reads(), st.nbytes):
            self._ok(self.cu.cudaMemsetAsync(p, 0, n, self.stream), "cudaMemsetAsync")
        return st

    def state_from_host(self, arrays: Sequence[np.ndarray]) -> DeviceState:
        arrays = [np.ascontiguousarray(a, np.dtype(s.dtype)) for a, s in zip(arrays, self.manifest.state)]
        st = DeviceState(self, arrays[0].shape[0])
        for p, a in zip(st.reads(), arrays):
            self._copy(p, a.ctypes.data, a.nbytes, "HostToDevice")
        self._sync()
        return st

    def state_to_host(self, st: DeviceState) -> list[np.ndarray]:
        out = [np.empty([st.batch, *s.shape], np.dtype(s.dtype)) for s in self.manifest.state]
        for p, a in zip(st.reads(), out):
            self._copy(a.ctypes.data, p, a.nbytes, "DeviceToHost")
        self._sync()
        return out

    def stack_states(self, states: Sequence[DeviceState]) -> DeviceState:
        """Rows of several states into one batch, device to device."""
        st = DeviceState(self, sum(s.batch for s in states))
        for i, row_bytes in enumerate(self.state_row_bytes):
            off = 0
            for s in states:
                self._copy(st.reads()[i] + off, s.reads()[i], s.batch * row_bytes, "DeviceToDevice")
                off += s.batch * row_bytes
        return st

    def split_state(self, st: DeviceState, batch: int) -> list[DeviceState]:
        parts = [DeviceState(self, 1) for _ in range(batch)]
        for i, row_bytes in enumerate(self.state_row_bytes):
            for r, part in enumerate(parts):
                self._copy(part.reads()[i], st.reads()[i] + r * row_bytes, row_bytes, "DeviceToDevice")
        return parts

    # ---- one step -------------------------------------------------------------------------------
    def run(self, input_ids: np.ndarray, start_pos: np.ndarray, state):
        host = not isinstance(state, DeviceState)
        st = self.state_from_host(state) if host else state
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(start_pos, np.int64)
        b, t = ids.shape
        if not 1 <= b <= self.max_batch or not 1 <= t <= self.max_chunk or st.batch != b:
            raise SambaEdgeError(f"batch {b} x seq {t} (state batch {st.batch}) is outside the engine's profiles "
                                 f"(batch 1..{self.max_batch}, seq 1..{self.max_chunk}); rebuild with larger limits")
        self._copy(self.ids_buf, ids.ctypes.data, ids.nbytes, "HostToDevice")
        self._copy(self.pos_buf, pos.ctypes.data, pos.nbytes, "HostToDevice")
        profile = 0 if t == 1 else 1
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, int(self.stream))
            self._profile = profile
            self._graphs.clear()
        bound = [self.ids_buf, self.pos_buf, *st.reads(), self.logits_buf, *st.writes()]
        for name, shape in zip(self._in, [(b, t), (b,), *([b, *s.shape] for s in self.manifest.state)]):
            self.context.set_input_shape(name, tuple(shape))
        for name, ptr in zip(self._in + self._out, bound):
            self.context.set_tensor_address(name, ptr)
        if t == 1 and self.use_graphs:
            self._launch_graph((b, *bound))
        else:
            self._execute()
        logits = np.empty(tuple(self.context.get_tensor_shape(self._out[0])), np.float32)
        self._copy(logits.ctypes.data, self.logits_buf, logits.nbytes, "DeviceToHost")
        self._sync()
        st.swap()
        return logits, (self.state_to_host(st) if host else st)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise SambaEdgeError("TensorRT failed to run the engine (see its log above)")

    def _launch_graph(self, key: tuple) -> None:
        """Replay the decode step's CUDA graph for these bindings; capture it on first use (after one
        plain run, which lets TensorRT and the plugins finish their lazy set-up outside the capture)."""
        cu = self.cu
        exe = self._graphs.get(key)
        if exe is None:
            self._execute()
            self._sync()
            mode = cu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            self._ok(cu.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            ok = self.context.execute_async_v3(int(self.stream))
            graph = self._ok(cu.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            if not ok:
                raise SambaEdgeError("TensorRT failed to capture the decode step in a CUDA graph; "
                                     "open the model with graphs=False")
            exe = self._ok(cu.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            self._graphs[key] = exe
            if len(self._graphs) > GRAPH_CACHE:
                self._graphs.popitem(last=False)
            return                                     # the plain run above already did this step's work
        self._graphs.move_to_end(key)
        self._ok(cu.cudaGraphLaunch(exe, self.stream), "cudaGraphLaunch")
