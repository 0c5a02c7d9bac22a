"""runtime/trt_backend.py's own logic on CPU: device-resident ping-pong state, batch slots, profile
selection, CUDA graph capture, replay and lifetimes, batched steps, snapshots across backends.

No GPU here, so the two things below the backend are simulated, faithfully enough to fail on a wrong
binding: `SimCudart` gives host memory behind 256-byte-aligned integer "device pointers"
(cudaMalloc/memcpy/memset), records work issued during stream capture into graphs that cudaGraphLaunch
replays, refuses what real CUDA refuses while a stream is being captured (cudaMalloc, cudaFree,
synchronisation: the capture is then invalidated and cudaStreamEndCapture fails), and counts graph and
graph-exec creation and destruction. `SimContext` is a TensorRT execution context whose
execute_async_v3 reads its inputs FROM THE BOUND ADDRESSES, runs the ONNX Runtime artifact, and writes
the outputs TO THE BOUND ADDRESSES; set_input_shape refuses shapes outside the current profile (and
returns False, as TensorRT does), set_tensor_address refuses unaligned addresses. A stale state
buffer, a missed swap, a graph replayed with the wrong bindings or a wrong copy direction changes the
logits."""
from __future__ import annotations

import ctypes
import gc
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from samba_edge.export.onnx_export import export_onnx  # noqa: E402
from samba_edge.runtime import SamplingParams, open_model  # noqa: E402
from samba_edge.runtime.errors import SambaEdgeError  # noqa: E402
from samba_edge.runtime.session import Model  # noqa: E402
from samba_edge.runtime.trt_backend import TrtBackend  # noqa: E402

CK = "builtin:samba-tiny-py"
MAX_CHUNK, MAX_BATCH = 16, 3
CAPTURE_UNSUPPORTED, CAPTURE_INVALIDATED = 900, 901          # cudaErrorStreamCapture{Unsupported,Invalidated}


class SimCudart:
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h",
                                     cudaMemcpyDeviceToDevice="d2d")
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal="thread-local")

    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.capture = None                       # list of recorded work while a stream is captured
        self.invalidated = False
        self.graphs, self.execs = set(), set()    # live objects
        self.counts = {"capture": 0, "launch": 0, "malloc": 0, "free": 0, "d2d": 0, "exec_destroy": 0}
        self._next = 1

    def _refuse_in_capture(self):
        if self.capture is not None:              # CUDA: not permitted while capturing; the capture is ruined
            self.invalidated = True
            return True
        return False

    def cudaStreamCreate(self):
        return 0, 1

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaMalloc(self, n):
        if self._refuse_in_capture():
            return CAPTURE_UNSUPPORTED, 0
        raw = np.zeros(n + 256, np.uint8)
        ptr = (raw.ctypes.data + 255) // 256 * 256               # cudaMalloc returns 256-byte aligned memory
        self.mem[ptr] = raw
        self.counts["malloc"] += 1
        return 0, ptr

    def cudaFree(self, p):
        if self._refuse_in_capture():
            return (CAPTURE_UNSUPPORTED,)
        if self.mem.pop(p, None) is None:
            return (1,)                                           # cudaErrorInvalidValue: not ours / double free
        self.counts["free"] += 1
        return (0,)

    def _issue(self, fn):
        if self.capture is not None:
            self.capture.append(fn)
        else:
            fn()
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.counts["d2d"] += kind == "d2d"
        return self._issue(lambda: ctypes.memmove(dst, src, n))

    def cudaMemsetAsync(self, p, v, n, stream):
        return self._issue(lambda: ctypes.memset(p, v, n))

    def cudaStreamSynchronize(self, stream):
        return (CAPTURE_UNSUPPORTED,) if self._refuse_in_capture() else (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capture, self.invalidated = [], False
        return (0,)

    def cudaStreamEndCapture(self, stream):
        work, self.capture = self.capture, None
        if self.invalidated:
            return CAPTURE_INVALIDATED, None
        self.counts["capture"] += 1
        handle = ("graph", self._next, tuple(work))
        self._next += 1
        self.graphs.add(handle)
        return 0, handle

    def cudaGraphInstantiate(self, graph, flags):
        assert graph in self.graphs, "instantiating a destroyed graph"
        handle = ("exec", self._next, graph[2])
        self._next += 1
        self.execs.add(handle)
        return 0, handle

    def cudaGraphDestroy(self, graph):
        self.graphs.remove(graph)
        return (0,)

    def cudaGraphExecDestroy(self, exe):
        self.execs.remove(exe)
        self.counts["exec_destroy"] += 1
        return (0,)

    def cudaGetLastError(self):
        return (0,)

    def cudaGraphLaunch(self, exe, stream):
        assert exe in self.execs, "launching a destroyed graph exec"
        self.counts["launch"] += 1
        for fn in exe[2]:
            fn()
        return (0,)


def _view(ptr: int, shape, dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * n).from_address(ptr), dtype=dtype).reshape(shape)


class SimContext:
    """An execution context over the ONNX Runtime artifact that only sees device addresses."""

    def __init__(self, inner, cu: SimCudart, max_batch: int = MAX_BATCH, alloc_in_enqueue: bool = False):
        self.inner, self.cu, self.m = inner, cu, inner.manifest
        self.shapes, self.addr, self.profile, self.executed = {}, {}, None, 0
        self.max_batch, self.alloc_in_enqueue, self.on_capture = max_batch, alloc_in_enqueue, None

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        """TensorRT returns False for a shape outside the current profile's [min, max]."""
        seq_max = 1 if self.profile == 0 else MAX_CHUNK
        if not 1 <= shape[0] <= self.max_batch or (name == "input_ids" and not 1 <= shape[1] <= seq_max):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        if ptr % 256:                                 # TensorRT wants 256-byte aligned I/O addresses
            return False
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream):
        assert (self.profile == 0) == (self.shapes["input_ids"][1] == 1)        # the right profile
        shapes, addr = dict(self.shapes), dict(self.addr)        # what a captured graph would hold
        if self.cu.capture is not None and self.on_capture is not None:
            self.on_capture()
        if self.alloc_in_enqueue:                     # a plugin / TensorRT allocating lazily inside enqueue
            err, _ = self.cu.cudaMalloc(64)
            if err:
                return False

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


def sim_backend(ort_model, graphs=True, max_batch=MAX_BATCH, **context) -> TrtBackend:
    be = object.__new__(TrtBackend)                  # everything __init__ does after deserialisation
    be.directory, be.manifest = ort_model.backend.directory, ort_model.backend.manifest
    be.meta = {"max_chunk": MAX_CHUNK, "max_batch": max_batch}
    cu = SimCudart()
    be._attach(SimContext(ort_model.backend, cu, **context), cu, graphs)
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


def _greedy(stream) -> list[int]:
    return [int(np.argmax(stream.last_logits))]


def test_graphs_are_kept_across_turns_and_profiles_and_never_leak(ort_model, monkeypatch):
    import samba_edge.runtime.trt_backend as tb

    monkeypatch.setattr(tb, "GRAPH_CACHE", 4)                  # 3 streams x 2 graphs: evictions happen
    be = sim_backend(ort_model)
    m = Model(be, ort_model.tokenizer)
    ours = [m.new_stream() for _ in range(3)]
    refs = [ort_model.new_stream() for _ in range(3)]
    for turn in range(3):                                      # prefill (profile 1) then decode (profile 0)
        for a, b in zip(ours, refs):
            np.testing.assert_array_equal(a.feed_text(f"x = {turn}\n"), b.feed_text(f"x = {turn}\n"))
            for _ in range(4):
                tok = _greedy(b)
                np.testing.assert_array_equal(a.feed(tok), b.feed(tok))
        if turn == 0:
            first = dict(be.cu.counts)
    cu = be.cu
    assert not cu.graphs                                       # each graph destroyed once instantiated
    assert len(cu.execs) == len(be._graphs) <= 4               # live execs = the cache, evicted ones destroyed
    assert cu.counts["exec_destroy"] == cu.counts["capture"] - len(cu.execs) > 0
    with monkeypatch.context() as mp:                          # a cache big enough: later turns capture nothing
        mp.setattr(tb, "GRAPH_CACHE", 32)
        be2 = sim_backend(ort_model)
        m2 = Model(be2, ort_model.tokenizer)
        s = m2.new_stream()
        for turn in range(3):
            s.feed_text(f"y = {turn}\n")
            for _ in range(4):
                s.feed(_greedy(s))
            if turn == 0:
                captured = be2.cu.counts["capture"]
        assert captured == 2 and be2.cu.counts["capture"] == 2 and be2.cu.counts["launch"] > 0
    assert first["capture"] >= 2
    be.close()
    be2.close()
    assert not cu.execs and not be2.cu.execs                   # close destroys every exec
    del ours, s, m, m2, a                                     # the streams (and their states) go
    gc.collect()
    assert not cu.mem and not be2.cu.mem                       # and every buffer is freed


def test_batched_decode_allocates_and_copies_nothing_per_step(ort_model):
    be = sim_backend(ort_model)
    m = Model(be, ort_model.tokenizer)
    ours, refs = [m.new_stream() for _ in range(3)], [ort_model.new_stream() for _ in range(3)]
    for i, (a, b) in enumerate(zip(ours, refs)):
        a.feed_text(PROMPT[: 20 + 7 * i])                      # rows at different positions
        b.feed_text(PROMPT[: 20 + 7 * i])

    def step():
        toks = [_greedy(r) for r in refs]
        got = m.step(ours, toks)
        want = ort_model.step(refs, toks)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)

    step()
    step()                                                     # the slot's two buffer sets: two captures
    before = dict(be.cu.counts)
    for _ in range(5):
        step()
    after = be.cu.counts
    assert after["malloc"] == before["malloc"] and after["free"] == before["free"]        # no allocation
    assert after["d2d"] == before["d2d"]                                                  # no gather/scatter
    assert after["capture"] == before["capture"] and after["launch"] - before["launch"] == 5      # replays only
    assert sum(key[0] == 3 for key in be._graphs) == 2         # the slot's two buffer sets: two graphs
    # a stream used alone leaves the slot (its row is copied home) and is gathered again afterwards
    tok = _greedy(refs[1])
    np.testing.assert_array_equal(ours[1].feed(tok), refs[1].feed(tok))
    step()
    for a, b in zip(ours, refs):                               # state read back from slot rows and own buffers
        for x, y in zip(be.state_to_host(a.state), b.state):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(SambaEdgeError, match="twice"):
        be.stack_states([ours[0].state, ours[0].state])


def test_a_failed_capture_falls_back_to_plain_execution(ort_model, capsys):
    be = sim_backend(ort_model, alloc_in_enqueue=True)        # enqueue allocates: CUDA refuses it in a capture
    m = Model(be, ort_model.tokenizer)
    a, b = m.new_stream(), ort_model.new_stream()
    a.feed_text("import os\n")
    b.feed_text("import os\n")
    for _ in range(4):
        tok = _greedy(b)
        np.testing.assert_array_equal(a.feed(tok), b.feed(tok))
    assert not be.use_graphs and be.cu.counts["capture"] == 0 and not be.cu.graphs and not be.cu.execs
    err = capsys.readouterr().err
    assert err.count("CUDA graph capture of the decode step failed") == 1 and err.count("\n") == 1


def test_frees_wait_until_the_capture_ends(ort_model):
    be = sim_backend(ort_model)
    m = Model(be, ort_model.tokenizer)
    doomed = [be.new_state(1)]
    freed_before = be.cu.counts["free"]

    def drop():                                                # a state garbage-collected in mid-capture
        doomed.clear()
        gc.collect()

    be.context.on_capture = drop
    s = m.new_stream()
    s.feed([5])                                                # decode: captured; the hook frees `doomed`
    assert be.use_graphs and be.cu.counts["capture"] == 1      # the capture was not invalidated
    n_state = len(be.manifest.state)
    assert be.cu.counts["free"] == freed_before + 2 * n_state     # its two buffer sets, freed after the capture
    assert not be._deferred_frees


def test_refused_shapes_are_errors(ort_model):
    be = sim_backend(ort_model, max_batch=MAX_BATCH)
    be.context.max_batch = 2                                   # the engine's profiles stop at batch 2
    with pytest.raises(SambaEdgeError, match="TensorRT refused shape"):
        be.run(np.zeros((3, 1), np.int64), np.zeros(3, np.int64), be.new_state(3))
