"""TensorRT engine building on CPU with TensorRT-RTX (or real TensorRT where installed): the samba.*
plugins, both optimisation profiles, both flavours. Skipped when no TensorRT is importable.

TensorRT-RTX builds but cannot deserialize or run an engine without a GPU, so the engine is checked
through what TensorRT itself reports at build time (network I/O, read-back profiles, plugin calls)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from samba_edge.runtime.errors import SambaEdgeError


def _trt_or_skip():
    from samba_edge.plugins.trt_import import import_trt

    try:
        return import_trt()
    except SambaEdgeError as e:
        pytest.skip(f"no TensorRT: {e}")


trt, TRT_INFO = _trt_or_skip()
pytest.importorskip("torch")
pytest.importorskip("onnx")

from samba_edge.plugins import trt_plugins as tp  # noqa: E402
from samba_edge.runtime.manifest import Manifest  # noqa: E402
from samba_edge.tools.build_engine import build_engine, parse_size, profile_table  # noqa: E402

CK = "builtin:samba-tiny-py"
MAX_CHUNK = 16


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from samba_edge.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("trt")
    return {f: export_onnx(CK, root / f, flavor=f, max_chunk=MAX_CHUNK) for f in ("plugin", "portable")}


@pytest.fixture(scope="module")
def plugin_build(exports, tmp_path_factory):
    """Build the plugin flavour once (fp32, max batch 2) recording which plugin methods TensorRT called."""
    calls: dict[str, list] = {}
    mp = pytest.MonkeyPatch()

    def record(cls, meth):
        orig = getattr(cls, meth)

        def wrapper(self, *a):
            res = orig(self, *a)
            calls.setdefault(f"{cls.NAME}.{meth}", []).append((a, res, dict(self.attrs)))
            return res
        mp.setattr(cls, meth, wrapper)

    for cls in (tp.SelectiveScanPlugin, tp.SlidingWindowAttentionPlugin):
        for m in ("supports_format_combination", "configure_plugin", "get_fields_to_serialize", "get_output_data_types"):
            record(cls, m)
    try:
        out = build_engine(exports["plugin"], tmp_path_factory.mktemp("eng") / "plugin", max_batch=2,
                           max_chunk=MAX_CHUNK, progress=False)
    finally:
        mp.undo()
    return out, calls


def _meta(engine_dir):
    return json.loads((engine_dir / "engine.json").read_text())


def _check_io(meta, manifest: Manifest):
    ins = {t["name"]: t for t in meta["inputs"]}
    outs = {t["name"]: t for t in meta["outputs"]}
    assert list(ins) == [t.name for t in manifest.inputs]
    assert list(outs) == [t.name for t in manifest.outputs]
    for spec, got in [*((t, ins[t.name]) for t in manifest.inputs), *((t, outs[t.name]) for t in manifest.outputs)]:
        assert got["dtype"] == spec.dtype, spec.name
        assert got["shape"] == [-1 if isinstance(d, str) else d for d in spec.shape], spec.name


def _check_profiles(meta, manifest: Manifest, max_batch: int):
    assert [p["name"] for p in meta["profiles"]] == ["decode", "prefill"]
    assert [p["index"] for p in meta["profiles"]] == [0, 1]
    dec, pre = (p["inputs"] for p in meta["profiles"])
    assert dec["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [max_batch, 1]}
    assert pre["input_ids"] == {"min": [1, 1], "opt": [1, MAX_CHUNK // 2], "max": [max_batch, MAX_CHUNK]}
    for prof in (dec, pre):
        assert prof["start_pos"] == {"min": [1], "opt": [1], "max": [max_batch]}
        for s in manifest.state:                                    # state: batch dynamic, rest fixed
            assert prof[s.name] == {"min": [1, *s.shape], "opt": [1, *s.shape], "max": [max_batch, *s.shape]}


def test_plugin_engine_builds_on_cpu(plugin_build, exports):
    out, calls = plugin_build
    manifest = Manifest.load(exports["plugin"])
    meta = _meta(out)
    assert (out / "engine.plan").stat().st_size > 0
    assert meta["tensorrt"]["flavor"] == TRT_INFO.flavor and meta["artifact"]["fingerprint"] == manifest.fingerprint
    _check_io(meta, manifest)
    _check_profiles(meta, manifest, 2)
    # the parser created our plugins with the node attributes, and TensorRT configured them per profile
    cfg = manifest.model
    scan_attrs = calls["SelectiveScan.configure_plugin"][0][2]
    # the kernels key (a string attribute -> CHAR field) binds each plugin to this artifact's kernels
    from samba_edge.plugins.trt_launch import KernelSet

    key = KernelSet.open(exports["plugin"]).key
    assert meta["kernels"] == key and KernelSet.open(out).key == key
    assert scan_attrs == {"delta_softplus": 1, "d_inner": cfg["expand"] * cfg["n_embd"], "d_state": cfg["d_state"],
                          "kernels": key}
    swa = calls["SlidingWindowAttention.configure_plugin"][0][2]
    assert swa == {"window": cfg["local_window"], "scale": pytest.approx(cfg["head_size"] ** -0.5),
                   "num_heads": cfg["n_head"], "num_kv_heads": cfg["n_query_groups"], "head_size": cfg["head_size"],
                   "kernels": key}
    # configure_plugin once per profile per plugin instance (2 Mamba + 2 attention layers here)
    assert len(calls["SelectiveScan.configure_plugin"]) >= 2 and len(calls["SlidingWindowAttention.configure_plugin"]) >= 2
    # the int64 start_pos input was offered to and accepted by the attention plugin
    accepted = [(a[0], a[1][a[0]].desc.type) for a, res, _ in calls["SlidingWindowAttention.supports_format_combination"]
                if res]
    assert (5, trt.DataType.INT64) in accepted
    assert calls["SelectiveScan.get_fields_to_serialize"] and calls["SlidingWindowAttention.get_fields_to_serialize"]
    plan = (out / "engine.plan").read_bytes()
    assert b"SelectiveScan" in plan and b"SlidingWindowAttention" in plan


def test_plugin_nodes_resolve_under_the_tensorrt_10_3_parser_rule(exports):
    """JetPack 6's TensorRT 10.3 parser takes the namespace from the plugin_namespace attribute only (default
    ""), never from the domain: every exported plugin node must resolve to our creators under that rule."""
    import onnx

    from samba_edge.plugins.trt_parser import check_lookup, parser_keys

    tp.register_plugins()
    registry = trt.get_plugin_registry()
    proto = onnx.load(str(exports["plugin"] / "model.onnx"), load_external_data=False)
    keys = parser_keys(proto, "10.3")
    assert len(keys) == 4 and {k for _, k in keys} == {("SelectiveScan", "1", "samba"),
                                                       ("SlidingWindowAttention", "1", "samba")}
    for _, (name, version, ns) in keys:
        assert registry.get_creator(name, version, ns) is not None
    check_lookup(proto, lambda *k: registry.get_creator(*k) is not None, "10.3.0.30")
    assert Manifest.load(exports["plugin"]).custom_ops[0]["plugin_namespace"] == "samba"
    for node, _ in keys:                     # an export without the attribute fails the 10.3 rule, not the 10.10 one
        node.attribute.remove(next(a for a in node.attribute if a.name == "plugin_namespace"))
    assert all(ns == "" for _, (_, _, ns) in parser_keys(proto, "10.3"))
    assert all(registry.get_creator(*k) is not None for _, k in parser_keys(proto, "10.10"))   # domain fallback
    with pytest.raises(SambaEdgeError, match="TensorRT 10.3's ONNX parser would look up plugin 'SelectiveScan'"):
        check_lookup(proto, lambda *k: registry.get_creator(*k) is not None, "10.3.0.30")


def test_portable_engine_builds_on_cpu(exports, tmp_path):
    manifest = Manifest.load(exports["portable"])
    out = build_engine(exports["portable"], tmp_path / "portable", max_batch=2, max_chunk=MAX_CHUNK, progress=False)
    meta = _meta(out)
    _check_io(meta, manifest)
    _check_profiles(meta, manifest, 2)
    assert meta["plugins"] == []


@pytest.mark.slow
def test_bf16_rope_tables_build(tmp_path):
    """Official-style models round their rotary tables through bfloat16 (two Casts per table): TensorRT
    parses and builds them (the shipped model's fp32 tables have no such Casts)."""
    import onnx

    from samba_edge.export.checkpoint import save_canonical
    from samba_edge.export.onnx_export import export_onnx
    from samba_edge.tests.helpers import tiny_model

    m = tiny_model("tiny_gqa2_w8")
    assert m.config.rope_table_dtype == "bf16"
    art = export_onnx(str(save_canonical(tmp_path / "ck", m.config, m.state_dict())), tmp_path / "art",
                      flavor="portable", max_chunk=MAX_CHUNK)
    g = onnx.load(str(art / "model.onnx")).graph
    assert any(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for a in n.attribute)
               for n in g.node)
    meta = _meta(build_engine(art, tmp_path / "eng", max_batch=1, max_chunk=MAX_CHUNK, progress=False))
    _check_io(meta, Manifest.load(art))


def test_build_errors(exports, tmp_path, plugin_build):
    with pytest.raises(SambaEdgeError, match="manifest.json"):
        build_engine(tmp_path / "nothing", tmp_path / "e")
    with pytest.raises(SambaEdgeError, match="already exists"):
        build_engine(exports["plugin"], plugin_build[0])
    with pytest.raises(SambaEdgeError, match="max-chunk"):
        build_engine(exports["plugin"], tmp_path / "e", max_chunk=MAX_CHUNK + 1)
    with pytest.raises(SambaEdgeError, match="target"):
        build_engine(exports["plugin"], tmp_path / "e", target="jetson-nano")
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30 and parse_size("100") == 100
    with pytest.raises(SambaEdgeError):
        parse_size("lots")


def test_cli_build(exports, tmp_path):
    from samba_edge.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["build", str(tmp_path / "missing"), "-o", str(tmp_path / "e")])
    assert e.value.code == 2
    main(["build", str(exports["portable"]), "-o", str(tmp_path / "e"), "--max-chunk", "4", "--target", "jetson-orin",
          "--timing-cache", str(tmp_path / "tc.cache"), "--workspace", "256M"])
    meta = _meta(tmp_path / "e")
    assert meta["target"] == "jetson-orin" and meta["workspace"] == 256 << 20 and meta["max_chunk"] == 4
    # TensorRT-RTX has no timing cache (its API calls are no-ops): the builder leaves the file alone there
    assert (tmp_path / "tc.cache").exists() == (TRT_INFO.flavor == "tensorrt")


def test_profile_table_odd_chunk(exports):
    m = Manifest.load(exports["plugin"])
    p = profile_table(m, 1, 3)
    assert p[1]["inputs"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [3, 1]}


# ---- the plugin classes against docs/op-contracts.md ---------------------------------------------
SCAN = {"delta_softplus": 1, "d_inner": 8, "d_state": 4}
SWA = {"window": 8, "scale": 0.25, "num_heads": 4, "num_kv_heads": 2, "head_size": 16}
F, H, I64, I32 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.INT64, trt.DataType.INT32


def _descs(types, fmt=None):
    out = []
    for t in types:
        d = trt.DynamicPluginTensorDesc()
        d.desc.type = t
        if fmt is not None:
            d.desc.format = fmt
        out.append(d)
    return out


def _accepts(plugin, types, fmt=None):
    descs = _descs(types, fmt)
    return all(plugin.supports_format_combination(i, descs, plugin.N_IN) for i in range(len(types)))


def _fc(attrs, spec):
    keep = []
    return tp._collection(attrs, spec, keep), keep


def test_creators_declare_contract_fields():
    tp.register_plugins()
    reg = trt.get_plugin_registry()
    for cls, fields in ((tp.SelectiveScanCreator, tp.SCAN_FIELDS), (tp.SlidingWindowAttentionCreator, tp.SWA_FIELDS)):
        c = cls()
        assert (c.plugin_namespace, c.plugin_version) == ("samba", "1")
        assert [f.name for f in c.field_names] == list(fields)
        assert reg.get_creator(c.name, "1", "samba") is not None
    assert tp.register_plugins() is tp.register_plugins()            # idempotent


def test_scan_plugin_contract():
    fc, _keep = _fc(SCAN, tp.SCAN_FIELDS)
    p = tp.SelectiveScanCreator().create_plugin("scan", fc, trt.TensorRTPhase.BUILD)
    assert p.attrs == SCAN and p.num_outputs == 2
    assert (p.plugin_name, p.plugin_namespace, p.plugin_version) == ("SelectiveScan", "samba", "1")
    assert p.get_output_data_types([F] * 9) == [F, F]
    assert _accepts(p, [F] * 11, trt.TensorFormat.LINEAR)
    for pos in range(11):                                     # any non-fp32 tensor is refused
        assert not _accepts(p, [H if i == pos else F for i in range(11)])
    # outputs mirror u (b, E, T) and ssm_state (b, E, N): told apart here by rank
    ranks = {0: 3, 8: 5}
    shapes = p.get_output_shapes([trt.DimsExprs(ranks.get(i, 2)) for i in range(9)], [], None)
    assert [len(s) for s in shapes] == [3, 5]
    assert p.get_workspace_size([], []) == 0 and p.get_valid_tactics() == []
    # serialise -> create (runtime phase) -> same attributes; clone keeps them
    ser = p.get_fields_to_serialize()
    assert {f.name: np.asarray(f.data).tolist() for f in ser} == {k: [v] for k, v in SCAN.items()}
    q = tp.SelectiveScanCreator().create_plugin("scan", ser, trt.TensorRTPhase.RUNTIME)
    assert q.attrs == SCAN and p.clone().attrs == SCAN and p.clone() is not p


def test_swa_plugin_contract():
    fc, _keep = _fc(SWA, tp.SWA_FIELDS)
    p = tp.SlidingWindowAttentionCreator().create_plugin("swa", fc, trt.TensorRTPhase.BUILD)
    assert p.attrs == SWA and p.num_outputs == 3
    for act in (F, H):                                        # q/k/v/y fp32 or fp16, windows fp32, start_pos int64
        assert _accepts(p, [act, act, act, F, F, I64, act, F, F])
        assert p.get_output_data_types([act, act, act, F, F, I64]) == [act, F, F]
    assert not _accepts(p, [F, H, F, F, F, I64, F, F, F])     # k must match q
    assert not _accepts(p, [H, H, H, H, F, I64, H, F, F])     # windows stay fp32
    assert not _accepts(p, [F, F, F, F, F, I32, F, F, F])     # start_pos is int64, not int32
    assert not _accepts(p, [H, H, H, F, F, I64, F, F, F])     # y has q's type
    ranks = {0: 3, 3: 4, 4: 5}
    shapes = p.get_output_shapes([trt.DimsExprs(ranks.get(i, 2)) for i in range(6)], [], None)
    assert [len(s) for s in shapes] == [3, 4, 5]               # y ~ q, k_window_out ~ k_window, v_window_out ~ v_window
    ser = p.get_fields_to_serialize()
    q = tp.SlidingWindowAttentionCreator().create_plugin("swa", ser, trt.TensorRTPhase.RUNTIME)
    assert q.attrs == SWA


def test_plugin_missing_attribute_is_an_error():
    fc, _keep = _fc({"d_inner": 8}, tp.SCAN_FIELDS)
    with pytest.raises(ValueError, match="delta_softplus"):
        tp.SelectiveScanPlugin(tp._fields(fc, tp.SCAN_FIELDS))


def test_launcher_without_kernels_is_a_clear_error(tmp_path):
    from samba_edge.plugins import trt_launch

    with pytest.raises(SambaEdgeError, match="kernels.json"):
        trt_launch.KernelSet.open(tmp_path)
    with pytest.raises(SambaEdgeError, match="not loaded in this process"):
        trt_launch.KernelSet.by_key("0" * 32)
    plugin = tp.SelectiveScanPlugin({"delta_softplus": 1, "d_inner": 8, "d_state": 4})   # parsed without build
    with pytest.raises(RuntimeError, match="samba-edge build"):
        plugin.launcher()
    assert trt_launch.grid_value("cdiv(E, 32)", {"E": 65}) == 3
    assert trt_launch.grid_value("b * H", {"b": 2, "H": 4}) == 8


def test_rtx_soname_fix_in_cache_dir():
    if TRT_INFO.flavor != "tensorrt-rtx":
        pytest.skip("TensorRT-RTX only")
    from samba_edge.plugins.trt_import import cache_dir

    links = list(cache_dir().glob("trt-rtx-*/libtensorrt_rtx.so"))
    assert links and all(os.path.realpath(x).endswith("libtensorrt_rtx.so.1") for x in links)


@pytest.mark.slow                       # two exports, a calibration and two engine builds (~40 s)
def test_fp16_and_int8_artifacts_build(tmp_path):
    """Strongly typed: TensorRT keeps the graph's types, so the parsed network must show fp16 GEMMs with
    fp32 norm statistics and scan (fp16), and int8 Q/DQ pairs around the GEMMs (int8)."""
    from samba_edge.calibration.int8 import calibrate
    from samba_edge.export.onnx_export import export_onnx

    calls: list = []
    orig = tp.SlidingWindowAttentionPlugin.supports_format_combination

    def record(self, pos, in_out, n_in):
        res = orig(self, pos, in_out, n_in)
        if res:
            calls.append((pos, in_out[pos].desc.type))
        return res

    f16 = export_onnx(CK, tmp_path / "fp16", dtype="fp16", max_chunk=MAX_CHUNK)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tp.SlidingWindowAttentionPlugin, "supports_format_combination", record)
        net = _meta(build_engine(f16, tmp_path / "e16", max_batch=2, max_chunk=MAX_CHUNK, progress=False))["network"]
    _check_io(_meta(tmp_path / "e16"), Manifest.load(f16))
    out = net["output_dtypes"]
    assert out["MATRIX_MULTIPLY"].get("HALF", 0) >= 20                  # all GEMMs but dt_proj's two
    assert set(out["REDUCE"]) == {"FLOAT"} and out["PLUGIN_V3"] == {"FLOAT": 2, "HALF": 2}
    assert (0, trt.DataType.HALF) in calls and (3, trt.DataType.FLOAT) in calls   # fp16 q, fp32 window

    text = tmp_path / "calib.txt"
    text.write_text(open(__file__).read() * 3)
    f32 = export_onnx(CK, tmp_path / "fp32", max_chunk=MAX_CHUNK)
    calibrate(f32, tmp_path / "int8", [str(text)], samples=4, chunk=MAX_CHUNK, progress=False)
    import onnx

    n_q = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node)
    meta = _meta(build_engine(tmp_path / "int8", tmp_path / "e8", max_batch=2, max_chunk=MAX_CHUNK, progress=False))
    _check_profiles(meta, Manifest.load(tmp_path / "int8"), 2)
    assert meta["artifact"]["dtype"] == "int8"
    assert meta["network"]["output_dtypes"]["QUANTIZE"] == {"INT8": n_q} and n_q >= 20
    assert meta["network"]["layers"]["DEQUANTIZE"] == n_q + 25          # activations + 24 GEMM weights + the head


# ---- the engine directory and the trt backend's checks (everything before CUDA) ---------------
def test_engine_dir_is_self_contained_and_checked(plugin_build, tmp_path):
    import shutil

    from samba_edge.runtime.engine_dir import check_engine_dir

    out, _ = plugin_build
    meta, man = check_engine_dir(out)
    assert man.fingerprint == meta["artifact"]["fingerprint"]
    assert (out / man.tokenizer).is_file() and (out / "engine.plan").is_file()
    if man.kernels:
        assert (out / man.kernels).is_file()                 # the plugins' AOT kernels travel with the engine
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["outputs"][1]["dtype"] = "float16"                      # a manifest that does not match the engine
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SambaEdgeError, match="do not match its manifest"):
        check_engine_dir(bad)
    m["fingerprint"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SambaEdgeError, match="weights"):
        check_engine_dir(bad)
    (out.parent / "noplan").mkdir()
    shutil.copy2(out / "engine.json", out.parent / "noplan")
    shutil.copy2(out / "manifest.json", out.parent / "noplan")
    with pytest.raises(SambaEdgeError, match="lacks engine.plan"):
        check_engine_dir(out.parent / "noplan")


def test_trt_backend_refuses_other_tensorrt_gpu_or_none(plugin_build):
    from samba_edge.plugins.trt_import import TrtInfo
    from samba_edge.runtime.engine_dir import check_runtime_matches

    meta = json.loads((plugin_build[0] / "engine.json").read_text())
    gpu = [{"name": "NVIDIA Jetson AGX Orin", "sm": "sm_87"}]
    check_runtime_matches(meta, TRT_INFO, gpu)                                   # same TensorRT: fine
    with pytest.raises(SambaEdgeError, match="tied to one TensorRT version"):
        check_runtime_matches(meta, TrtInfo(TRT_INFO.flavor, "0.0.1", TRT_INFO.module), gpu)
    with pytest.raises(SambaEdgeError, match="no CUDA GPU"):
        check_runtime_matches(meta, TRT_INFO, [])
    real = {**meta, "tensorrt": {"flavor": "tensorrt", "version": "10.3.0"}, "gpu": {"name": "H200", "sm": "sm_90"}}
    with pytest.raises(SambaEdgeError, match="build the engine on the device"):
        check_runtime_matches(real, TrtInfo("tensorrt", "10.3.0", "tensorrt"), gpu)


def test_open_engine_without_gpu_is_a_clean_error(plugin_build, exports, capsys):
    from samba_edge.runtime import open_model
    from samba_edge.tools.cli import main
    from samba_edge.tools.doctor import check_cuda

    if check_cuda()[1].get("gpus"):
        pytest.skip("a GPU is present: test_trt_backend_on_gpu covers it")
    art = str(exports["plugin"].resolve())
    with pytest.raises(SambaEdgeError, match="no CUDA GPU") as e:
        open_model(str(plugin_build[0]))                                         # auto -> trt
    assert f"ONNX Runtime runs the artifact the engine was built from: {art}" in str(e.value)
    with pytest.raises(SambaEdgeError, match="samba-edge build"):
        open_model(str(exports["plugin"]), "trt")
    with pytest.raises(SambaEdgeError, match="engine directory") as e:         # no circle: it names what to run
        open_model(str(plugin_build[0]), "ort")
    assert art in str(e.value) and "--backend ort" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["generate", str(plugin_build[0]), "-p", "def f():", "-n", "2"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0


@pytest.mark.gpu
def test_trt_backend_on_gpu(exports, tmp_path):
    """Where a GPU and TensorRT meet: the engine matches ONNX Runtime in prefill and in graph-replayed
    decode, batched streams work, and snapshots cross backends both ways."""
    from samba_edge.runtime import SamplingParams, open_model
    from samba_edge.tools.doctor import check_cuda

    if not check_cuda()[1].get("gpus"):
        pytest.skip("no CUDA GPU")
    eng = build_engine(exports["plugin"], tmp_path / "eng", max_batch=2, max_chunk=MAX_CHUNK, progress=False)
    trt_m, ort_m = open_model(str(eng)), open_model(str(exports["plugin"]))
    assert trt_m.backend.name == "trt"
    prompt = list(range(5, 5 + 2 * MAX_CHUNK + 3))
    a, b = trt_m.new_stream(), ort_m.new_stream()
    np.testing.assert_allclose(a.feed(prompt), b.feed(prompt), atol=1e-3, rtol=1e-3)
    for t in (7, 9, 11):                                       # decode: CUDA graphs, ping-pong state
        np.testing.assert_allclose(a.feed([t]), b.feed([t]), atol=1e-3, rtol=1e-3)
    ga = list(a.generate_ids(SamplingParams(max_new_tokens=20)))
    a.snapshot(tmp_path / "s.safetensors")
    gb = list(b.generate_ids(SamplingParams(max_new_tokens=20)))
    assert ga == gb
    c = ort_m.restore(tmp_path / "s.safetensors")              # trt -> ort
    d = trt_m.restore(tmp_path / "s.safetensors")              # and back
    np.testing.assert_allclose(c.feed([3]), d.feed([3]), atol=1e-3, rtol=1e-3)
    out = trt_m.step([a, d], [[4], [4]])                       # batched decode across two streams
    assert len(out) == 2 and all(np.isfinite(o).all() for o in out)


def test_plugin_routes(plugin_build, exports, tmp_path):
    from samba_edge.plugins.trt_qdp import aot_route_available

    assert _meta(plugin_build[0])["plugin_route"] == ("aot_impl" if aot_route_available() else "python")
    assert _meta(build_engine(exports["portable"], tmp_path / "p", max_chunk=4, progress=False))["plugin_route"] is None
    if not aot_route_available():               # TensorRT-RTX / TensorRT < 10.9: a clear refusal, nothing written
        with pytest.raises(SambaEdgeError, match="10.9"):
            build_engine(exports["plugin"], tmp_path / "aot", plugin_route="aot", progress=False)
        assert not (tmp_path / "aot").exists()
    with pytest.raises(SambaEdgeError, match="plugin-route"):
        build_engine(exports["plugin"], tmp_path / "x", plugin_route="cuda", progress=False)


def test_validate_trt_runner_needs_an_engine_of_this_artifact(plugin_build, exports, tmp_path):
    import shutil

    pytest.importorskip("polygraphy")
    from samba_edge.tools.doctor import check_cuda
    from samba_edge.tools.validate import validate

    with pytest.raises(SambaEdgeError, match="--engine"):
        validate(str(exports["plugin"]), backends=("trt",), steps=1, chunks=(1, 7))
    other = tmp_path / "other"                                    # a consistent engine dir of other weights
    shutil.copytree(plugin_build[0], other)
    for f, path in (("manifest.json", ["fingerprint"]), ("engine.json", ["artifact", "fingerprint"])):
        d = json.loads((other / f).read_text())
        (d if len(path) == 1 else d[path[0]])[path[-1]] = "f" * 64
        (other / f).write_text(json.dumps(d))
    with pytest.raises(SambaEdgeError, match="other weights"):
        validate(str(exports["plugin"]), backends=("trt",), steps=1, chunks=(1, 7), engine=str(other))
    if not check_cuda()[1].get("gpus"):
        with pytest.raises(SambaEdgeError, match="no CUDA GPU"):
            validate(str(exports["plugin"]), backends=("ort", "trt"), steps=1, chunks=(1, 7),
                     engine=str(plugin_build[0]))


def test_serving_graph_engines_for_triton(exports, tmp_path):
    """The serving graph (Triton's tensorrt backend, implicit state) builds with its position and START inputs
    in both profiles; a plugin-flavour serving engine needs the aot_impl route (Triton is a C++ server)."""
    from samba_edge.plugins.trt_qdp import aot_route_available

    manifest = Manifest.load(exports["portable"])
    meta = _meta(build_engine(exports["portable"], tmp_path / "serve", max_batch=3, max_chunk=MAX_CHUNK,
                              progress=False, serving="server"))
    names = [t["name"] for t in meta["inputs"]]
    assert names == ["input_ids", "pos", "START", "READY", *[s.name for s in manifest.state]]
    assert [t["name"] for t in meta["outputs"]][:3] == ["logits", "next_token", "pos_out"]
    assert meta["graph"] == "serving (server sampling)"
    for p in meta["profiles"]:
        assert p["inputs"]["pos"]["max"] == [3, 1] and p["inputs"]["START"]["min"] == [1, 1]
        assert "start_pos" not in p["inputs"]
    if not aot_route_available():
        with pytest.raises(SambaEdgeError, match="cannot load python-route plugins"):
            build_engine(exports["plugin"], tmp_path / "plug", progress=False, serving="server")
        assert not (tmp_path / "plug").exists()
