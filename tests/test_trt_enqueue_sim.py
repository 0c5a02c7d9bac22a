"""The TensorRT plugins' enqueue driven on CPU: build-time enqueue on garbage buffers, launch-only
enqueue after the first, kernels bound per plugin (not per process), and the real launcher inside a
full ONNX Runtime decode.

What is faked, and why it still fails on a wrong binding:
- `FakeMemory`: "device memory" is host numpy buffers (256-byte aligned, pointer = the buffer's
  address). A kernel may only read/write a WHOLE allocation with exactly the bytes its shape implies,
  so a wrong pointer, shape, head size or dtype in the launch is an illegal access here.
- `FakeDriver`: the cuda.bindings.driver calls trt_launch.py makes, counted one by one. It maps an
  image (cubin bytes) back to the kernel record it was compiled with, refuses a wrong entry name and a
  function handle of another context, and checks block / shared memory against that record. Its
  cuLaunchKernel EXECUTES the kernel: it decodes the parameter list with the record's own argument
  order (the binary's truth, never the launcher's copy), views the buffers and computes exactly that
  kernel's outputs with the numpy reference (plugins/reference.py) over the rows the grid covers;
  nothing else is written (outputs start as NaN).
- The "builder" is ours: it marks model.onnx as `samba-edge build` does, creates every plugin through
  the registered creator with the fields TensorRT's ONNX parser passes, runs the build methods and
  calls enqueue as TensorRT's tactic timing does (real PluginTensorDesc, arbitrary buffer contents).
- In the ORT run every samba.* node goes through a real plugin's enqueue (REFERENCES patched; ort_ops
  looks it up per call): a swapped pointer or a too-small grid changes the logits (checked).
"""
from __future__ import annotations

import builtins
import collections
import copy
import ctypes
import io
import itertools
import os
import pathlib

import numpy as np
import pytest

from samba_edge.runtime.errors import SambaEdgeError

try:
    from samba_edge.plugins.trt_import import import_trt

    trt, _ = import_trt()
except SambaEdgeError as e:
    pytest.skip(f"no TensorRT: {e}", allow_module_level=True)
for _mod in ("onnx", "torch", "triton"):         # export + AOT kernels; ONNX Runtime only for part D
    pytest.importorskip(_mod)

import onnx  # noqa: E402

from samba_edge.plugins import reference, triton_scan, triton_swa, trt_launch  # noqa: E402
from samba_edge.plugins import trt_plugins as tp  # noqa: E402
from samba_edge.plugins.trt_parser import mark_plugin_nodes  # noqa: E402

pytestmark = pytest.mark.slow          # graphs through emulated kernel launches (`pytest -m slow`; CI runs it)
CK, MAX_CHUNK, STREAM = "builtin:samba-tiny-py", 16, 0x5EED
REF = dict(reference.REFERENCES)                 # the true references, taken before any test patches them
SCAN, SWA = "SelectiveScan", "SlidingWindowAttention"
_CTX = itertools.count(0xC0DE000)                # every fake driver is a fresh CUDA context
NP_TYPE = {"*fp32": np.float32, "*fp16": np.float16, "*i64": np.int64}
TRT_TYPE = {np.dtype(np.float32): trt.DataType.FLOAT, np.dtype(np.float16): trt.DataType.HALF,
            np.dtype(np.int64): trt.DataType.INT64}


class FakeMemory:
    def __init__(self):
        self.bufs: dict[int, np.ndarray] = {}

    def alloc(self, shape, dtype, fill=None) -> int:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = np.empty(n + 256, np.uint8)
        buf = raw[(-raw.ctypes.data) % 256:][:n]
        buf.view(dtype)[:] = np.nan if fill is None else 0
        if isinstance(fill, np.ndarray):
            buf[:] = np.ascontiguousarray(fill, dtype).view(np.uint8).reshape(-1)
        self.bufs[buf.ctypes.data] = buf
        return buf.ctypes.data

    def view(self, ptr: int, dtype, shape) -> np.ndarray:
        buf = self.bufs.get(ptr)
        assert buf is not None, f"illegal address {ptr:#x}"
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert n == buf.nbytes, f"access of {n} bytes {tuple(shape)} at {ptr:#x}: the buffer holds {buf.nbytes}"
        return buf.view(dtype).reshape(shape)


def _scan_kernel(view, p, rec, grid):
    E, T, N, b = p["E"], p["T"], rec["constexprs"]["N"], grid[1]
    bet, bnt, ben = (b, E, T), (b, N, T), (b, E, N)
    ins = [view(n, s) for n, s in (("u_ptr", bet), ("delta_ptr", bet), ("A_ptr", (E, N)), ("B_ptr", bnt),
                                   ("C_ptr", bnt), ("D_ptr", (E,)), ("z_ptr", bet), ("delta_bias_ptr", (E,)),
                                   ("state_ptr", ben))]
    y, s = REF[SCAN](*ins, delta_softplus=1)
    rows = grid[0] * rec["constexprs"]["BLOCK_E"]             # program x covers BLOCK_E channels
    view("y_ptr", bet)[:, :rows] = y[:, :rows]
    view("state_out_ptr", ben)[:, :rows] = s[:, :rows]


def _swa_kernel(view, p, rec, grid):
    H, G, T, C, hs = p["H"], p["G"], p["T"], p["C"], rec["constexprs"]["HEAD_DIM"]
    b, rest = divmod(grid[1], H)
    assert rest == 0, f"grid y {grid[1]} is not batch * H ({H})"
    q, k, v = view("q_ptr", (b, H, T, hs)), view("k_ptr", (b, G, T, hs)), view("v_ptr", (b, G, T, hs))
    kw, vw, start = view("kw_ptr", (b, G, C, hs)), view("vw_ptr", (b, G, C, hs)), view("start_ptr", (b,))
    y = REF[SWA](q, k, v, kw, vw, start, window=p["W"], scale=np.float32(p["scale"]))[0]
    rows = grid[0] * rec["constexprs"]["BLOCK_M"]
    view("y_ptr", (b, H, T, hs))[:, :, :rows] = y[:, :, :rows]


def _window_update_kernel(view, p, rec, grid):
    T, C, hs, bg = p["T"], p["C"], rec["constexprs"]["HEAD_DIM"], grid[1]     # program y: one (batch, group)
    k, v = view("k_ptr", (bg, 1, T, hs)), view("v_ptr", (bg, 1, T, hs))
    kw, vw = view("kw_ptr", (bg, 1, C, hs)), view("vw_ptr", (bg, 1, C, hs))
    _, kwo, vwo = REF[SWA](np.zeros_like(k), k, v, kw, vw, np.zeros(bg, np.int64), window=C + 1, scale=1.0)
    rows = grid[0] * rec["constexprs"]["BLOCK_R"]
    view("kw_out_ptr", (bg, 1, C, hs))[:, :, :rows] = kwo[:, :, :rows]
    view("vw_out_ptr", (bg, 1, C, hs))[:, :, :rows] = vwo[:, :, :rows]


KERNELS = {"selective_scan_fwd_kernel": _scan_kernel, "swa_fwd_kernel": _swa_kernel,
           "swa_window_update_kernel": _window_update_kernel}


class FakeDriver:
    """cuda.bindings.driver as trt_launch.py uses it, on an sm_90 device; every call is counted."""

    class CUdevice_attribute:
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = "major", "minor"

    class CUfunction_attribute:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    def __init__(self, mem: FakeMemory, kernel_sets):
        self.mem, self.ctx, self.calls, self.launches = mem, next(_CTX), collections.Counter(), []
        self.images = {ks.files[r["files"]["cubin"]]: r for ks in kernel_sets for r in ks.records.values()
                       if "cubin" in r["files"]}               # the binary -> the record it was compiled with
        self.loaded, self.functions, self._handle = [], {}, itertools.count(1)

    def __getattribute__(self, name):
        if name.startswith("cu"):
            object.__getattribute__(self, "calls")[name] += 1
        return object.__getattribute__(self, name)

    def cuCtxGetCurrent(self):
        return 0, self.ctx

    def cuCtxGetDevice(self):
        return 0, 0

    def cuDeviceGetAttribute(self, attr, dev):
        return 0, {"major": 9, "minor": 0}[attr]

    def cuModuleLoadData(self, data):
        if data not in self.images:
            return 200, None                                   # CUDA_ERROR_INVALID_IMAGE
        self.loaded.append(data)
        return 0, ("module", self.ctx, data)

    def cuModuleGetFunction(self, mod, name):
        rec = self.images[mod[2]]
        if name != rec["entry"].encode():
            return 500, None                                   # CUDA_ERROR_NOT_FOUND
        h = next(self._handle)
        self.functions[h] = (mod[1], mod[2], rec)
        return 0, h

    def cuFuncSetAttribute(self, *a):
        return (0,)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        if f not in self.functions or self.functions[f][0] != self.ctx:
            return (400,)                                      # CUDA_ERROR_INVALID_HANDLE: not of this context
        _, image, rec = self.functions[f]
        assert (bx, by, bz) == tuple(rec["block"]) and shared == rec["shared_mem_bytes"] and extra == 0
        values, types = params
        assert len(values) == len(types) == len(rec["args"]), rec["entry"]
        p = {}
        for a, v, t in zip(rec["args"], values, types):        # the BINARY's parameter order
            assert t is (ctypes.c_void_p if a["type"].startswith("*") else
                         {"i32": ctypes.c_int32, "fp32": ctypes.c_float}[a["type"]]), (rec["entry"], a["name"])
            p[a["name"]] = v
        assert p["global_scratch"] == p["profile_scratch"] == 0
        self.launches.append({"entry": rec["entry"], "grid": (gx, gy, gz), "values": list(values), "image": image,
                              "stream": stream})
        view = lambda name, shape: self.mem.view(p[name], NP_TYPE[next(a["type"] for a in rec["args"]  # noqa: E731
                                                                      if a["name"] == name)], shape)
        with np.errstate(all="ignore"):                        # garbage inputs: NaN/inf are fine
            KERNELS[rec["entry"]](view, p, rec, (gx, gy, gz))
        return (0,)


# ---- a fake builder: plugins as TensorRT's ONNX parser creates them ---------------------------------
def make_plugin(node):
    """Creator lookup by (op_type, plugin_version, plugin_namespace); fields = the node's attributes among
    the creator's declared fields, typed as the parser types them (INT32 / FLOAT32 / CHAR)."""
    attrs = {a.name: a for a in node.attribute}
    text = lambda n, d: attrs[n].s.decode() if n in attrs else d  # noqa: E731
    creator = trt.get_plugin_registry().get_creator(node.op_type, text("plugin_version", "1"),
                                                    text("plugin_namespace", ""))
    keep, fields = [], []
    for f in creator.field_names:
        a = attrs.get(f.name)
        if a is None:
            continue
        arr, kind = {onnx.AttributeProto.INT: (np.array([a.i], np.int32), "INT32"),
                     onnx.AttributeProto.FLOAT: (np.array([a.f], np.float32), "FLOAT32"),
                     onnx.AttributeProto.STRING: (np.frombuffer(a.s, np.int8).copy(), "CHAR")}[a.type]
        keep.append(arr)
        fields.append(trt.PluginField(f.name, arr, getattr(trt.PluginFieldType, kind)))
    return creator.create_plugin(node.name, trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD)


def contract_io(plugin, b, T, half=False):
    """(shape, dtype) of every input and output of the op, per docs/op-contracts.md."""
    a, f, act = plugin.attrs, np.float32, np.float16 if half else np.float32
    if plugin.NAME == SCAN:
        E, N = a["d_inner"], a["d_state"]
        ins = [(b, E, T), (b, E, T), (E, N), (b, N, T), (b, N, T), (E,), (b, E, T), (E,), (b, E, N)]
        return [(s, f) for s in ins], [((b, E, T), f), ((b, E, N), f)]
    H, G, hs, C = a["num_heads"], a["num_kv_heads"], a["head_size"], a["window"] - 1
    ins = [((b, H, T, hs), act), ((b, G, T, hs), act), ((b, G, T, hs), act), ((b, G, C, hs), f),
           ((b, G, C, hs), f), ((b,), np.int64)]
    return ins, [((b, H, T, hs), act), ((b, G, C, hs), f), ((b, G, C, hs), f)]


def desc(shape, dtype):
    d = trt.PluginTensorDesc()
    d.dims, d.type = trt.Dims(list(shape)), TRT_TYPE[np.dtype(dtype)]
    return d


def enqueue_args(plugin, mem, rng, b, T, half=False):
    """enqueue's arguments on build-time buffers: arbitrary bytes, start_pos any int64; outputs NaN."""
    ins, outs = contract_io(plugin, b, T, half)
    start = np.array([-(2 ** 40) - 3, 2 ** 31 + 5, 2 ** 62][:b], np.int64)
    garbage = lambda s, dt: rng.integers(0, 256, int(np.prod(s)) * np.dtype(dt).itemsize, np.uint8).view(dt)  # noqa
    pin = [mem.alloc(s, dt, start if dt is np.int64 else garbage(s, dt)) for s, dt in ins]
    return [desc(*x) for x in ins], [desc(*x) for x in outs], pin, [mem.alloc(s, dt) for s, dt in outs], 0, STREAM


def build_and_enqueue(plugin, mem, rng, b, T, half=False):
    """What TensorRT calls at build time, then enqueue as tactic timing does. Returns the pointers."""
    ins, outs = contract_io(plugin, b, T, half)
    dyn = [trt.DynamicPluginTensorDesc() for _ in ins + outs]
    for d, (shape, dt) in zip(dyn, ins + outs):
        d.desc.dims, d.desc.type = trt.Dims(list(shape)), TRT_TYPE[np.dtype(dt)]
    assert all(plugin.supports_format_combination(i, dyn, len(ins)) for i in range(len(dyn)))
    assert plugin.get_output_data_types([d.desc.type for d in dyn[:len(ins)]]) == [d.desc.type for d in dyn[len(ins):]]
    plugin.configure_plugin(dyn[:len(ins)], dyn[len(ins):])
    assert plugin.get_workspace_size(dyn[:len(ins)], dyn[len(ins):]) == 0
    args = enqueue_args(plugin, mem, rng, b, T, half)
    plugin.enqueue(*args)
    return args[2], args[3]


def expected_launches(plugin, pin, pout, b, T):
    a = plugin.attrs
    if plugin.NAME == SCAN:
        E = a["d_inner"]
        return [("selective_scan_fwd_kernel", triton_scan.grid(E, b), pin + pout + [E, T, 0, 0])]
    H, G, W = a["num_heads"], a["num_kv_heads"], a["window"]
    return [("swa_fwd_kernel", triton_swa.fwd_grid(T, b, H), pin + pout[:1] + [H, G, T, W, W - 1, a["scale"], 0, 0]),
            ("swa_window_update_kernel", triton_swa.update_grid(W - 1, b, G), pin[1:5] + pout[1:] + [T, W - 1, 0, 0])]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from samba_edge.export.onnx_export import export_onnx

    return export_onnx(CK, tmp_path_factory.mktemp("enqueue") / "plugin", flavor="plugin", max_chunk=MAX_CHUNK,
                       kernel_archs="75,90")                  # sm_90: the simulated device


@pytest.fixture(scope="module")
def kernels(artifact):
    return trt_launch.KernelSet.open(artifact)


def _graph(artifact, key):
    """model.onnx with the plugin nodes marked as `samba-edge build` marks them (key None: unmarked)."""
    proto = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    if key is not None:
        mark_plugin_nodes(proto, kernels=key)
    return proto


def _nodes(proto, op=None):
    return [n for n in proto.graph.node if n.domain == "samba" and op in (None, n.op_type)]


def _install(monkeypatch, *kernel_sets) -> FakeDriver:
    tp.register_plugins()
    drv = FakeDriver(FakeMemory(), kernel_sets)
    monkeypatch.setattr(trt_launch, "_driver", lambda: drv)
    return drv


@pytest.fixture
def fake(monkeypatch, kernels):
    return _install(monkeypatch, kernels)


# ---- A: build-time enqueue ---------------------------------------------------------------------------
def test_build_time_enqueue_on_garbage_launches_every_kernel(artifact, kernels, fake):
    rng = np.random.default_rng(0)
    nodes = _nodes(_graph(artifact, kernels.key))
    assert sorted(n.op_type for n in nodes) == [SCAN, SCAN, SWA, SWA]
    for node in nodes:
        plugin = make_plugin(node)
        for b, T in ((2, MAX_CHUNK), (1, 1), (2, 5)):          # prefill max, decode, an odd chunk
            n0 = len(fake.launches)
            pin, pout = build_and_enqueue(plugin, fake.mem, rng, b, T)
            got = [(x["entry"], x["grid"], x["values"]) for x in fake.launches[n0:]]
            assert got == expected_launches(plugin, pin, pout, b, T), (node.name, b, T)
            assert all(x["stream"] == STREAM for x in fake.launches[n0:])
        # the engine path: serialized fields -> the runtime-phase plugin finds the same kernels
        creator = trt.get_plugin_registry().get_creator(plugin.NAME, "1", "samba")
        again = creator.create_plugin(node.name, plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
        assert again.attrs == plugin.attrs and again.launcher().kernels is plugin.launcher().kernels
    assert all(x.endswith("cubin sm_90") for x in plugin.launcher().loaded)


def test_enqueue_without_bound_kernels_names_the_fix(artifact, fake):
    rng = np.random.default_rng(1)
    unmarked = make_plugin(_nodes(_graph(artifact, key=None), SWA)[0])       # a plain TensorRT parse
    assert "kernels" not in unmarked.attrs
    with pytest.raises(RuntimeError, match="samba-edge build"):
        build_and_enqueue(unmarked, fake.mem, rng, 1, 1)
    stranger = make_plugin(_nodes(_graph(artifact, key="ab" * 16), SCAN)[0])  # an engine of kernels not opened
    with pytest.raises(SambaEdgeError, match=r"KernelSet\.open\(ENGINE_OR_ARTIFACT_DIR\)"):
        build_and_enqueue(stranger, fake.mem, rng, 1, 1)
    assert not fake.launches and not fake.loaded


# ---- B: launch-only enqueue, per-context preparation ---------------------------------------------------
def _no_file_io(mp):
    def refuse(*a, **k):
        raise AssertionError("file I/O during enqueue")

    for obj, name in ((builtins, "open"), (io, "open"), (os, "open"), (pathlib.Path, "read_bytes"),
                      (pathlib.Path, "read_text"), (pathlib.Path, "open"), (pathlib.Path, "is_file"),
                      (pathlib.Path, "stat")):
        mp.setattr(obj, name, refuse)


def test_enqueue_after_the_first_only_launches(artifact, kernels, fake):
    rng = np.random.default_rng(2)
    graph = _graph(artifact, kernels.key)
    plugins = [make_plugin(_nodes(graph, SCAN)[0]), make_plugin(_nodes(graph, SWA)[0])]
    for p in plugins:
        build_and_enqueue(p, fake.mem, rng, 1, MAX_CHUNK)
    assert fake.calls["cuCtxGetCurrent"] == 2 and fake.calls["cuModuleLoadData"] == 3    # 1 scan + 2 SWA kernels
    calls = [(p, enqueue_args(p, fake.mem, rng, b, T)) for p in plugins for b, T in ((1, 1), (2, 3))]
    fake.calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        _no_file_io(mp)
        for _ in range(3):                                  # other shapes than the first: still launch-only
            for p, args in calls:
                p.enqueue(*args)
    assert dict(fake.calls) == {"cuLaunchKernel": 3 * 2 * (1 + 2)}


def test_clones_prepare_per_context_and_share_the_kernel_set(artifact, kernels, fake):
    rng = np.random.default_rng(3)
    first, second = (make_plugin(n) for n in _nodes(_graph(artifact, kernels.key), SCAN))
    build_and_enqueue(first, fake.mem, rng, 1, 1)
    assert fake.calls["cuModuleLoadData"] == 1
    clone, attached = first.clone(), first.attach_to_context(None)
    with pytest.MonkeyPatch.context() as mp:
        _no_file_io(mp)
        build_and_enqueue(clone, fake.mem, rng, 1, 1)       # same context: queries again, loads nothing
        build_and_enqueue(second, fake.mem, rng, 2, 1)      # another plugin instance, same kernels
        assert fake.calls["cuModuleLoadData"] == 1 and fake.calls["cuCtxGetCurrent"] == 3
        fake.ctx = next(_CTX)                                # TensorRT attaches a copy to another context
        build_and_enqueue(attached, fake.mem, rng, 1, 1)     # its own module there (else: invalid handle)
    assert fake.calls["cuModuleLoadData"] == 2 and len(fake.launches) == 4
    launchers = [p.launcher() for p in (first, clone, attached, second)]
    assert len({id(x) for x in launchers}) == 4 and all(x.kernels is launchers[0].kernels for x in launchers)


# ---- C: kernels bound per plugin, never per process -----------------------------------------------------
@pytest.fixture(scope="module")
def other_kernels(kernels, tmp_path_factory):
    """fp16 attention kernels of the same model, and kernels of another head size / d_state (sm_90 only)."""
    from samba_edge.export.config import get_config
    from samba_edge.plugins.aot import write_kernels

    root = tmp_path_factory.mktemp("other")
    write_kernels(root / "fp16", kernels.index["model"], archs=[90], strict=True, dtype="fp16")
    write_kernels(root / "hs8", get_config("tiny_gqa2_w8"), archs=[90], strict=True)
    return trt_launch.KernelSet.open(root / "fp16"), trt_launch.KernelSet.open(root / "hs8")


def test_two_kernel_sets_in_one_process_stay_apart(artifact, kernels, other_kernels, monkeypatch):
    from samba_edge.export.config import get_config

    ks16, ks8 = other_kernels
    assert len({kernels.key, ks16.key, ks8.key}) == 3
    drv = _install(monkeypatch, kernels, ks16, ks8)
    rng = np.random.default_rng(4)
    c8 = get_config("tiny_gqa2_w8")
    swa = lambda key: _nodes(_graph(artifact, key=key), SWA)[0]  # noqa: E731
    small = {"window": c8.local_window, "scale": c8.head_size ** -0.5, "num_heads": c8.n_head,
             "num_kv_heads": c8.n_query_groups, "head_size": c8.head_size, "kernels": ks8.key}
    plugins = [(make_plugin(swa(kernels.key)), kernels, False), (make_plugin(swa(ks16.key)), ks16, True),
               (tp.SlidingWindowAttentionPlugin(small), ks8, False),
               (tp.SelectiveScanPlugin({"delta_softplus": 1, "d_inner": 64, "d_state": c8.d_state,
                                        "kernels": ks8.key}), ks8, False)]
    images = {}
    for p, ks, half in plugins + plugins[:1]:               # the first engine again, after the others
        n0 = len(drv.launches)
        build_and_enqueue(p, drv.mem, rng, 2, 3, half=half)
        own = {ks.files[ks.records["sm_90", n]["files"]["cubin"]] for n in ks.kernel_names(p.NAME, "python")}
        assert {x["image"] for x in drv.launches[n0:]} == own, (p.NAME, ks.key)
        images.setdefault(p.NAME, {})[ks.key] = own
    for a, b in itertools.combinations(images[SWA].values(), 2):
        assert not a & b                                     # three different attention binaries
    # a wrong binding is caught: head size 8 shapes on head size 64 kernels; fp16 activations on fp32 ones
    wrong = tp.SlidingWindowAttentionPlugin({**small, "kernels": kernels.key})
    with pytest.raises(AssertionError, match="the buffer holds"):
        build_and_enqueue(wrong, drv.mem, rng, 1, 1)
    with pytest.raises(SambaEdgeError, match="compiled for \\*fp32"):
        build_and_enqueue(make_plugin(swa(kernels.key)), drv.mem, rng, 1, 1, half=True)


# ---- D: ONNX Runtime decode with every samba.* node through plugin.enqueue + the fake driver ---------
PROMPT = [(7 * i + 3) % 4000 + 5 for i in range(MAX_CHUNK + 7)]     # two chunks: 16 + 7


def _greedy(model, steps=5):
    s = model.new_stream()
    logits = [s.feed(PROMPT)]
    for _ in range(steps):
        logits.append(s.feed([int(np.argmax(logits[-1]))]))
    return np.stack(logits), [np.array(x) for x in s.state]


def _via_enqueue(plugins, mem, errors: list):
    """A REFERENCES entry that runs the op's nodes through their own plugins' enqueue on fake device memory
    (ORT runs them in graph order, hence the cycle). An exception inside an onnxruntime-extensions op aborts
    the process, so it is kept in `errors` and NaN returned."""
    turn = itertools.cycle(plugins)

    def run(*arrays, **attrs):
        plugin = next(turn)
        ins = [(a.shape, a.dtype.type) for a in arrays]
        outs = [ins[i] for i in plugin.OUT_FROM_IN]
        try:
            for k, v in attrs.items():
                assert v == pytest.approx(plugin.attrs[k]), k
            pin = [mem.alloc(s, d, a) for (s, d), a in zip(ins, arrays)]
            pout = [mem.alloc(s, d) for s, d in outs]
            plugin.enqueue([desc(*x) for x in ins], [desc(*x) for x in outs], pin, pout, 0, STREAM)
            result = tuple(mem.view(p, d, s).copy() for p, (s, d) in zip(pout, outs))
            for p in pin + pout:
                del mem.bufs[p]
            return result
        except BaseException as e:  # noqa: BLE001 - re-raised after the ORT run
            errors.append(e)
            return tuple(np.full(s, np.nan, d) for s, d in outs)
    return run


@pytest.fixture(scope="module")
def ort_model(artifact):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxruntime_extensions")
    from samba_edge.runtime.backends import OrtBackend
    from samba_edge.runtime.session import Model

    model = Model(OrtBackend(artifact, ops="reference"))     # the samba.* nodes through REFERENCES (swappable)
    assert model.backend.name == "ort" and model.manifest.flavor == "plugin"
    return model, _greedy(model)                            # the plain plugin-flavour run: numpy references


def _run_through_plugins(artifact, kernels, ort_model, monkeypatch):
    drv, graph, errors = _install(monkeypatch, kernels), _graph(artifact, kernels.key), []
    plugins = {op: [make_plugin(n) for n in _nodes(graph, op)] for op in (SCAN, SWA)}   # one per node
    for op, ps in plugins.items():
        monkeypatch.setitem(reference.REFERENCES, op, _via_enqueue(ps, drv.mem, errors))
    try:
        out = _greedy(ort_model[0])
    finally:
        monkeypatch.undo()
    if errors:
        raise errors[0]
    assert all(p._launcher is not None for ps in plugins.values() for p in ps)   # every node launched
    return out, drv


def test_ort_decode_through_plugin_enqueue_matches(artifact, kernels, ort_model, monkeypatch):
    (logits, state), drv = _run_through_plugins(artifact, kernels, ort_model, monkeypatch)
    ref_logits, ref_state = ort_model[1]
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-6)
    for a, b in zip(state, ref_state):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    runs = 2 + 5                                             # model calls: 2 prefill chunks, 5 decode steps
    assert collections.Counter(x["entry"] for x in drv.launches) == {
        "selective_scan_fwd_kernel": 2 * runs, "swa_fwd_kernel": 2 * runs, "swa_window_update_kernel": 2 * runs}
    assert drv.calls["cuModuleLoadData"] == 3 and drv.calls["cuCtxGetDevice"] == 4   # 4 plugins share 3 modules


@pytest.mark.parametrize("fault", ["swap k_window / v_window pointers", "window-update grid too small"])
def test_a_wrong_launch_binding_changes_the_logits(artifact, kernels, ort_model, monkeypatch, fault):
    """Fault injection: the launcher is given a corrupted copy of one record (the binary is unchanged)."""
    image = trt_launch.KernelSet.image

    def corrupted(self, name, sm, force=None, **kw):
        rec, img = image(self, name, sm, force, **kw)
        rec = copy.deepcopy(rec)
        if name == "swa_attention" and fault.startswith("swap"):
            a = rec["args"]
            a[3]["value"], a[4]["value"] = a[4]["value"], a[3]["value"]
        elif name == "swa_window_update" and fault.startswith("window"):
            rec["grid"] = ["cdiv(C, 64)", *rec["grid"][1:]]
        return rec, img

    monkeypatch.setattr(trt_launch.KernelSet, "image", corrupted)
    (logits, _), _ = _run_through_plugins(artifact, kernels, ort_model, monkeypatch)
    assert not np.allclose(logits, ort_model[1][0], atol=1e-3)
    assert np.isfinite(logits).all() == fault.startswith("swap")  # a swap is silent: finite, wrong logits
