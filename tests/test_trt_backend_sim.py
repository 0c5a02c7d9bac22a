"""runtime/trt_backend.py's own logic on CPU: device-resident ping-pong state, profile selection, CUDA
graph capture and replay, batched steps, snapshots across backends.

No GPU here, so the two things below the backend are simulated, faithfully enough to fail on a wrong
binding: `SimCudart` gives host memory behind integer "device pointers" (cudaMalloc/memcpy/memset) and
records work issued during stream capture into graphs that cudaGraphLaunch replays; `SimContext` is a
TensorRT execution context whose execute_async_v3 reads its inputs FROM THE BOUND ADDRESSES, runs the
ONNX Runtime artifact, and writes the outputs TO THE BOUND ADDRESSES. A stale state buffer, a missed
swap, a graph replayed with the wrong bindings or a wrong copy direction changes the logits."""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from samba_edge.export.onnx_export import export_onnx  # noqa: E402
from samba_edge.runtime import SamplingParams, open_model  # noqa: E402
from samba_edge.runtime.session import Model  # noqa: E402
from samba_edge.runtime.trt_backend import TrtBackend  # noqa: E402

CK = "builtin:samba-tiny-py"
MAX_CHUNK, MAX_BATCH = 16, 2


class SimCudart:
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h",
                                     cudaMemcpyDeviceToDevice="d2d")
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal="thread-local")

    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.capture = None                       # list of recorded work while a stream is captured
        self.counts = {"capture": 0, "launch": 0}

    def cudaStreamCreate(self):
        return 0, 1

    def cudaMalloc(self, n):
        buf = np.zeros(n, np.uint8)
        self.mem[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFree(self, p):
        self.mem.pop(p, None)
        return (0,)

    def _issue(self, fn):
        if self.capture is not None:
            self.capture.append(fn)
        else:
            fn()
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        return self._issue(lambda: ctypes.memmove(dst, src, n))

    def cudaMemsetAsync(self, p, v, n, stream):
        return self._issue(lambda: ctypes.memset(p, v, n))

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capture = self.capture, None
        self.counts["capture"] += 1
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, exe, stream):
        self.counts["launch"] += 1
        for fn in exe:
            fn()
        return (0,)


def _view(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * n).from_address(ptr), dtype=dtype).reshape(shape)


class SimContext:
    """An execution context over the ONNX Runtime artifact that only sees device addresses."""

    def __init__(self, inner, cu: SimCudart):
        self.inner, self.cu, self.m = inner, cu, inner.manifest
        self.shapes, self.addr, self.profiles, self.executed = {}, {}, [], 0

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def get_tensor_shape(self, name):
        b, t = self.shapes["input_ids"]
        return (b, t if self.m.logits == "all" else 1, self.m.vocab_size)

    def execute_async_v3(self, stream):
        assert (self.profiles[-1] == 0) == (self.shapes["input_ids"][1] == 1)     # the right profile
        shapes, addr = dict(self.shapes), dict(self.addr)        # what a captured graph would hold

        def run():
            self.executed += 1
            ids = _view(addr["input_ids"], shapes["input_ids"], np.int64).copy()
            pos = _view(addr["start_pos"], shapes["start_pos"], np.int64).copy()
            state = [_view(addr[s.name], shapes[s.name], s.dtype).copy() for s in self.m.state]
            logits, new = self.inner.run(ids, pos, state)
            _view(addr["logits"], logits.shape, np.float32)[...] = logits
            for s, x in zip(self.m.state, new):
                _view(addr[s.output], x.shape, s.dtype)[...] = x

        self.cu._issue(run)
        return True


@pytest.fixture(scope="module")
def ort_model(tmp_path_factory):
    return open_model(str(export_onnx(CK, tmp_path_factory.mktemp("sim") / "tiny", flavor="portable",
                                      max_chunk=MAX_CHUNK)))


def sim_backend(ort_model, graphs=True) -> TrtBackend:
    be = object.__new__(TrtBackend)                  # everything __init__ does after deserialisation
    be.directory, be.manifest = ort_model.backend.directory, ort_model.backend.manifest
    be.meta = {"max_chunk": MAX_CHUNK, "max_batch": MAX_BATCH}
    cu = SimCudart()
    be._attach(SimContext(ort_model.backend, cu), cu, graphs)
    return be


PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


@pytest.mark.parametrize("graphs", [True, False])
def test_streams_on_the_trt_backend_equal_onnx_runtime(ort_model, graphs):
    be = sim_backend(ort_model, graphs)
    m = Model(be, ort_model.tokenizer)
    a, b = m.new_stream(), ort_model.new_stream()
    np.testing.assert_array_equal(a.feed_text(PROMPT), b.feed_text(PROMPT))          # prefill: 2+ chunks
    greedy = SamplingParams(max_new_tokens=12)
    assert list(a.generate_ids(greedy)) == list(b.generate_ids(greedy))              # decode steps
    np.testing.assert_array_equal(a.last_logits, b.last_logits)
    for x, y in zip(be.state_to_host(a.state), b.state):
        np.testing.assert_array_equal(x, y)                                          # state on the "device"
    np.testing.assert_array_equal(a.feed([5, 6, 7]), b.feed([5, 6, 7]))              # prefill after decode
    if graphs:
        # one stream alternates between its two buffer sets: two captured graphs, then replays only
        assert be.cu.counts["capture"] == 2 and be.cu.counts["launch"] == 12 - 2
    else:
        assert be.cu.counts["capture"] == 0


def test_batched_steps_and_snapshots_cross_backends(ort_model, tmp_path):
    be = sim_backend(ort_model)
    m = Model(be, ort_model.tokenizer)
    s1, s2 = m.new_stream(), m.new_stream()
    s1.feed_text(PROMPT)
    s2.feed_text("import os\n")
    r1, r2 = ort_model.new_stream(), ort_model.new_stream()
    r1.feed_text(PROMPT)
    r2.feed_text("import os\n")
    for _ in range(3):                                                # two rows at different positions
        toks = [[int(np.argmax(s.last_logits))] for s in (s1, s2)]
        m.step([s1, s2], toks)
        ort_model.step([r1, r2], toks)
    np.testing.assert_array_equal(s1.last_logits, r1.last_logits)
    np.testing.assert_array_equal(s2.last_logits, r2.last_logits)
    s1.snapshot(tmp_path / "trt.safetensors")                         # device -> snapshot -> ONNX Runtime
    r2.snapshot(tmp_path / "ort.safetensors")                         # and ONNX Runtime -> device
    a, b = ort_model.restore(tmp_path / "trt.safetensors"), m.restore(tmp_path / "ort.safetensors")
    np.testing.assert_array_equal(a.feed([9]), r1.feed([9]))
    np.testing.assert_array_equal(b.feed([9]), r2.feed([9]))


def test_out_of_profile_calls_are_refused(ort_model):
    from samba_edge.runtime.errors import SambaEdgeError

    be = sim_backend(ort_model)
    st = be.new_state(MAX_BATCH + 1)
    with pytest.raises(SambaEdgeError, match="outside the engine's profiles"):
        be.run(np.zeros((MAX_BATCH + 1, 1), np.int64), np.zeros(MAX_BATCH + 1, np.int64), st)
    with pytest.raises(SambaEdgeError, match="outside the engine's profiles"):
        be.run(np.zeros((1, MAX_CHUNK + 1), np.int64), np.zeros(1, np.int64), be.new_state(1))
