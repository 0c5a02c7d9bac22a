"""TensorRT backend: runs an engine directory from `samba-edge build` behind the runtime's backend interface.

    backend = TrtBackend("engine_dir")                 # open_model(engine_dir) picks it
    state = backend.new_state(1)                       # DeviceState: lives on the GPU
    logits, state = backend.run(input_ids, start_pos, state)
    backend.close()                                    # graphs, buffers, stream (also at garbage collection)

* The recurrent state stays in device memory: each DeviceState owns two buffer sets (ping/pong);
  the engine reads one and writes the other, and they swap. Only token ids / positions go up and
  the logits come down per call; snapshots copy the state to the host (and back), so snapshots from
  ORT or PyTorch restore here and vice versa. Numpy state lists are accepted too (validate, eval).
* Batched steps (Model.step) run on a persistent slot per batch size: the streams' rows are gathered
  into it on the device, and stay there as long as the same streams step together, so a batched
  decode loop copies and allocates nothing per step; a row moves back to its stream's own buffers
  only when that stream is used otherwise (alone, in another group, for a snapshot).
* Profile 0 (decode) serves seq == 1, profile 1 (prefill) 1 < seq <= max_chunk; set_input_shape's
  refusals are errors, never ignored.
* Decode steps replay a CUDA graph captured per (batch, bound buffers): a stream or a slot alternates
  between two graphs, kept across steps, turns and profile switches (LRU, destroyed on eviction and
  at close; the graph itself is destroyed once instantiated). A graph is replayed only while the
  context's last plain execution had its shapes (TensorRT holds a graph valid for the shapes it was
  captured with), else the step runs plainly first. If a capture fails, the capture is ended, the
  error cleared, and the backend falls back to plain execute_async_v3 with a one-line note (trtexec's
  behaviour). Device memory is never allocated or freed while a capture is open (frees wait).
* Before anything touches CUDA or deserialises the engine, the engine directory is checked against
  its manifest, its kernels, this TensorRT and this GPU: a mismatch is a one-line error, never a C++ abort.

STATUS: the checks run on CPU in CI (tests/test_trt_build.py), and so does everything after
deserialisation against a simulated CUDA runtime and execution context that refuses what CUDA refuses
during capture and counts graph lifetimes (tests/test_trt_backend_sim.py); real TensorRT + CUDA have
NOT run it yet (no GPU was available): docs/jetson.md.
"""
from __future__ import annotations

import collections
import sys
import weakref
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.engine_dir import check_engine_dir, check_runtime_matches
from samba_edge.runtime.errors import SambaEdgeError
GRAPH_CACHE = 32                                   # captured decode graphs kept (2 per active stream)


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise SambaEdgeError("the trt backend needs cuda-python: pip install cuda-bindings") from None
    return cudart


class DeviceState:
    """A stream's (or a batch slot's) recurrent state on the GPU: two buffer sets, swapped after each step.
    A stream's state may live as row `home[1]` of a batch slot `home[0]` (TrtBackend.stack_states)."""

    def __init__(self, backend: "TrtBackend", batch: int) -> None:
        self.backend, self.batch, self.cur = backend, batch, 0
        self.nbytes = [batch * s_bytes for s_bytes in backend.state_row_bytes]
        self.sets = [[backend.malloc(n) for n in self.nbytes] for _ in range(2)]
        self.home: Optional[tuple["Slot", int]] = None

    def reads(self) -> list[int]:
        return self.sets[self.cur]

    def writes(self) -> list[int]:
        return self.sets[1 - self.cur]

    def swap(self) -> None:
        self.cur = 1 - self.cur

    def release(self) -> None:
        sets, self.sets = self.sets, []
        for ptrs in sets:
            for p in ptrs:
                self.backend.free(p)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the CUDA context may already be gone
            pass


class Slot(DeviceState):
    """A persistent batch of `batch` rows; rows[r] is a weak reference to the stream state living there."""

    def __init__(self, backend: "TrtBackend", batch: int) -> None:
        super().__init__(backend, batch)
        self.rows: list[Optional[weakref.ref]] = [None] * batch

    def resident(self, r: int) -> Optional[DeviceState]:
        ref = self.rows[r]
        return ref() if ref is not None else None


class TrtBackend:
    name = "trt"

    def __init__(self, engine_dir: str | Path, graphs: bool = True) -> None:
        from samba_edge.plugins.cuda_probe import check_cuda
        from samba_edge.plugins.trt_import import import_trt

        self.directory = Path(engine_dir)
        self.meta, self.manifest = check_engine_dir(self.directory)      # opens the engine's kernels too
        trt, info = import_trt()
        _, gpu, _ = check_cuda()
        check_runtime_matches(self.meta, info, gpu.get("gpus"))
        if self.manifest.flavor == "plugin" and self.meta.get("plugin_route") == "python":
            from samba_edge.plugins.trt_plugins import register_plugins

            register_plugins()                                 # before deserialisation, every process
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
        self._capturing, self._deferred_frees = False, []
        self.stream = self._ok(self.cu.cudaStreamCreate(), "cudaStreamCreate")
        self._in = [t.name for t in self.manifest.inputs]
        self._out = [t.name for t in self.manifest.outputs]
        self.state_row_bytes = [int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.manifest.state]
        self.max_chunk, self.max_batch = int(self.meta["max_chunk"]), int(self.meta["max_batch"])
        self.vocab = int(self.manifest.outputs[0].shape[-1])
        self._all_logits = self.manifest.logits == "all"
        rows = self.max_chunk if self._all_logits else 1
        # fixed staging buffers: their addresses never change, so captured graphs stay valid
        self.ids_buf = self.malloc(self.max_batch * self.max_chunk * 8)
        self.pos_buf = self.malloc(self.max_batch * 8)
        self.logits_buf = self.malloc(self.max_batch * rows * self.vocab * 4)
        self._profile: Optional[int] = None
        self._executed_shape: Optional[tuple[int, int]] = None   # (batch, seq) of the last plain execution
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self._slots: dict[int, Slot] = {}
        self.use_graphs = graphs
        self.closed = False

    # ---- memory ---------------------------------------------------------------------------------
    def _ok(self, result, what: str):
        from samba_edge.plugins.trt_launch import cuda_check

        return cuda_check(result, what, SambaEdgeError)

    def malloc(self, nbytes: int) -> int:
        assert not self._capturing, "cudaMalloc during stream capture"
        return int(self._ok(self.cu.cudaMalloc(max(nbytes, 256)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        if self._capturing:                  # a state garbage-collected mid-capture: free after the capture
            self._deferred_frees.append(ptr)
            return
        self._forget_graphs(ptr)
        self.cu.cudaFree(ptr)

    def _forget_graphs(self, ptr: int) -> None:
        for key in [k for k in self._graphs if ptr in k[1:]]:
            self._ok(self.cu.cudaGraphExecDestroy(self._graphs.pop(key)), "cudaGraphExecDestroy")

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        k = getattr(self.cu.cudaMemcpyKind, f"cudaMemcpy{kind}")
        self._ok(self.cu.cudaMemcpyAsync(dst, src, nbytes, k, self.stream), f"cudaMemcpyAsync({kind})")

    def _sync(self) -> None:
        self._ok(self.cu.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Destroy every graph exec, free the slots and staging buffers, destroy the stream."""
        if getattr(self, "closed", True):
            return
        self.closed = True
        self._sync()
        for exe in self._graphs.values():
            self.cu.cudaGraphExecDestroy(exe)
        self._graphs.clear()
        for slot in self._slots.values():
            for r in range(slot.batch):
                if slot.resident(r) is not None:
                    self._evict(slot.resident(r))
            slot.release()
        self._slots.clear()
        for p in (self.ids_buf, self.pos_buf, self.logits_buf):
            self.cu.cudaFree(p)
        self.cu.cudaStreamDestroy(self.stream)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- the state protocol (runtime/backends.py) -----------------------------------------------
    def new_state(self, batch: int) -> DeviceState:
        st = DeviceState(self, batch)
        for p, n in zip(st.reads(), st.nbytes):
            self._ok(self.cu.cudaMemsetAsync(p, 0, n, self.stream), "cudaMemsetAsync")
        return st

    def state_from_host(self, arrays: Sequence[np.ndarray], position=None) -> DeviceState:
        arrays = [np.ascontiguousarray(a, np.dtype(s.dtype)) for a, s in zip(arrays, self.manifest.state)]
        st = DeviceState(self, arrays[0].shape[0])
        for p, a in zip(st.reads(), arrays):
            self._copy(p, a.ctypes.data, a.nbytes, "HostToDevice")
        self._sync()
        return st

    def _rows(self, st: DeviceState) -> tuple[list[int], int]:
        """(buffer addresses, byte offset of the row) where a state's current data lives."""
        if st.home is None:
            return st.reads(), 0
        slot, r = st.home
        return slot.reads(), r

    def state_to_host(self, st: DeviceState, position=None) -> list[np.ndarray]:
        out = [np.empty([st.batch, *s.shape], np.dtype(s.dtype)) for s in self.manifest.state]
        bufs, r = self._rows(st)
        for p, a, row in zip(bufs, out, self.state_row_bytes):
            self._copy(a.ctypes.data, p + r * row, a.nbytes, "DeviceToHost")
        self._sync()
        return out

    def _evict(self, st: DeviceState) -> None:
        """Move a stream's row out of its slot, back into the stream's own buffers."""
        if st.home is None:
            return
        slot, r = st.home
        for dst, src, row in zip(st.reads(), slot.reads(), self.state_row_bytes):
            self._copy(dst, src + r * row, row, "DeviceToDevice")
        slot.rows[r], st.home = None, None

    def stack_states(self, states: Sequence[DeviceState]) -> DeviceState:
        """The states' rows as one batch: the persistent slot of that batch size, with each stream's row
        copied in on the device only if it is not already there (a decode loop over the same streams
        copies nothing after its first step)."""
        if len({id(s) for s in states}) != len(states):
            raise SambaEdgeError("the same stream appears twice in one batched step; pass each stream once")
        if any(isinstance(s, Slot) or s.batch != 1 for s in states):
            raise SambaEdgeError("stack_states takes single-stream states")
        if len(states) == 1:
            self._evict(states[0])
            return states[0]
        b = len(states)
        slot = self._slots.get(b)
        if slot is None:
            slot = self._slots[b] = Slot(self, b)
        for r, s in enumerate(states):                       # residents that must leave, and movers, go home
            old = slot.resident(r)
            if old is not None and old is not s:
                self._evict(old)
        for s in states:
            if s.home is not None and s.home != (slot, states.index(s)):
                self._evict(s)
        for r, s in enumerate(states):
            if s.home is None:
                for dst, src, row in zip(slot.reads(), s.reads(), self.state_row_bytes):
                    self._copy(dst + r * row, src, row, "DeviceToDevice")
                slot.rows[r], s.home = weakref.ref(s), (slot, r)
        return slot

    def split_state(self, st: DeviceState, batch: int) -> list[DeviceState]:
        if isinstance(st, Slot):                             # the streams stay resident: nothing moves
            rows = [st.resident(r) for r in range(batch)]
            if all(x is not None for x in rows):
                return rows
        if st.batch == 1 and batch == 1:
            return [st]
        parts = [DeviceState(self, 1) for _ in range(batch)]     # a host-made batch (validate): copy rows out
        for i, row_bytes in enumerate(self.state_row_bytes):
            for r, part in enumerate(parts):
                self._copy(part.reads()[i], st.reads()[i] + r * row_bytes, row_bytes, "DeviceToDevice")
        return parts

    # ---- one step -------------------------------------------------------------------------------
    def run(self, input_ids: np.ndarray, start_pos: np.ndarray, state):
        host = not isinstance(state, DeviceState)
        st = self.state_from_host(state) if host else state
        if st.home is not None:                              # a slot row used alone: bring it home first
            self._evict(st)
        ids = np.ascontiguousarray(input_ids, np.int64)
        pos = np.ascontiguousarray(start_pos, np.int64)
        b, t = ids.shape
        if not 1 <= b <= self.max_batch or not 1 <= t <= self.max_chunk or st.batch != b:
            raise SambaEdgeError(f"batch {b} x seq {t} (state batch {st.batch}) is outside the engine's profiles "
                                 f"(batch 1..{self.max_batch}, seq 1..{self.max_chunk}); rebuild with larger limits")
        self._copy(self.ids_buf, ids.ctypes.data, ids.nbytes, "HostToDevice")
        self._copy(self.pos_buf, pos.ctypes.data, pos.nbytes, "HostToDevice")
        bound = (self.ids_buf, self.pos_buf, *st.reads(), self.logits_buf, *st.writes())
        key = (b, *bound)
        if t == 1 and self.use_graphs and key in self._graphs and self._executed_shape == (b, t):
            self._graphs.move_to_end(key)
            self._ok(self.cu.cudaGraphLaunch(self._graphs[key], self.stream), "cudaGraphLaunch")
        else:
            self._bind(b, t, bound)
            self._execute()
            self._executed_shape = (b, t)
            if t == 1 and self.use_graphs and not host and key not in self._graphs:
                self._capture(key)                           # (host states are one-call buffers: no graph)
        logits = np.empty((b, t if self._all_logits else 1, self.vocab), np.float32)
        self._copy(logits.ctypes.data, self.logits_buf, logits.nbytes, "DeviceToHost")
        self._sync()
        st.swap()
        return logits, (self.state_to_host(st) if host else st)

    def _bind(self, b: int, t: int, bound: tuple) -> None:
        profile = 0 if t == 1 else 1
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, int(self.stream))
            self._profile = profile
        for name, shape in zip(self._in, [(b, t), (b,), *([b, *s.shape] for s in self.manifest.state)]):
            if not self.context.set_input_shape(name, tuple(shape)):
                raise SambaEdgeError(f"TensorRT refused shape {tuple(shape)} for input {name} in profile {profile}; "
                                     "the engine's profiles do not cover this call: rebuild it (samba-edge build)")
        for name, ptr in zip(self._in + self._out, bound):
            if not self.context.set_tensor_address(name, ptr):
                raise SambaEdgeError(f"TensorRT refused the address of {name}; rebuild the engine")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise SambaEdgeError("TensorRT failed to run the engine (see its log above)")

    def _capture(self, key: tuple) -> None:
        """Capture the decode step just run plainly (TensorRT and the plugins finished their lazy set-up
        in it) into a CUDA graph for the next steps with these bindings. On failure: end the capture,
        clear the error, run without graphs from now on, and say so once."""
        cu = self.cu
        self._sync()
        mode = cu.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        err = cu.cudaStreamBeginCapture(self.stream, mode)
        ok, graph = False, None
        if int(err[0] if isinstance(err, tuple) else err) == 0:
            self._capturing = True
            try:
                ok = bool(self.context.execute_async_v3(int(self.stream)))
            finally:
                res = cu.cudaStreamEndCapture(self.stream)
                self._capturing = False
            ok = ok and int(res[0]) == 0 and res[1] is not None
            graph = res[1] if len(res) > 1 else None
        exe = None
        if ok:
            res = cu.cudaGraphInstantiate(graph, 0)
            exe = res[1] if int(res[0]) == 0 else None
        if graph is not None:
            cu.cudaGraphDestroy(graph)                 # the exec keeps what it needs
        if exe is None:
            cu.cudaGetLastError()                      # clear the sticky capture error
            self.use_graphs = False
            print("note: CUDA graph capture of the decode step failed; running without CUDA graphs",
                  file=sys.stderr)
        else:
            self._graphs[key] = exe
            if len(self._graphs) > GRAPH_CACHE:
                self._ok(cu.cudaGraphExecDestroy(self._graphs.popitem(last=False)[1]), "cudaGraphExecDestroy")
        for p in self._deferred_frees:
            self.free(p)
        self._deferred_frees.clear()
