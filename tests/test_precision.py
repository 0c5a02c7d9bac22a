"""FP16 export and INT8 calibration of the shipped tiny model: graph types, Q/DQ placement, accuracy
against fp32 on real text, streaming consistency, bad input. (TensorRT-RTX builds: test_trt_build.py.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow          # fp16 / int8 exports and calibration (`pytest -m slow`; CI runs it)

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from samba_edge.calibration.int8 import calibrate, gemm_labels  # noqa: E402
from samba_edge.export.onnx_export import export_onnx  # noqa: E402
from samba_edge.runtime import open_model  # noqa: E402
from samba_edge.runtime.errors import SambaEdgeError  # noqa: E402
from samba_edge.runtime.manifest import Manifest  # noqa: E402
from samba_edge.tools.evaluate import evaluate  # noqa: E402

CK = "builtin:samba-tiny-py"
PKG = Path(__file__).resolve().parents[1]
MAX_CHUNK = 64


def _text(paths) -> str:
    return "\n".join((PKG / p).read_text(encoding="utf-8") for p in paths)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Real Python source, as the tiny model was trained on: calibration and scoring use different files."""
    root = tmp_path_factory.mktemp("text")
    calib, held = root / "calib.txt", root / "held.txt"
    calib.write_text(_text(["runtime/session.py", "export/checkpoint.py", "tools/bench.py"]))
    held.write_text(_text(["tools/validate.py", "export/config.py"]))
    return {"calib": calib, "held": held}


@pytest.fixture(scope="module")
def arts(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("prec")
    out = {
        "fp32": export_onnx(CK, root / "fp32", max_chunk=MAX_CHUNK),
        "fp16": export_onnx(CK, root / "fp16", dtype="fp16", max_chunk=MAX_CHUNK),
        "fp16-portable": export_onnx(CK, root / "fp16p", flavor="portable", dtype="fp16", max_chunk=MAX_CHUNK),
    }
    calibrate(out["fp32"], root / "int8", [str(texts["calib"])], samples=24, chunk=64, method="percentile",
              progress=False)
    out["int8"] = root / "int8"
    return out


def _types(path: Path) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = m.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]} | \
           {i.name: i.data_type for i in g.initializer}


# ---- fp16 -----------------------------------------------------------------------------------
def test_fp16_graph_is_typed_as_promised(arts):
    man = Manifest.load(arts["fp16"])
    assert man.dtype == "float16"
    assert all(t.dtype in ("int64", "float32") for t in man.inputs + man.outputs)     # state + logits fp32
    g = onnx.load(str(arts["fp16"] / "model.onnx")).graph
    inits = {i.name: i.data_type for i in g.initializer}
    labels = gemm_labels(onnx.load(str(arts["fp16"] / "model.onnx")), man.model)
    types = _types(arts["fp16"] / "model.onnx")
    gemm_w = {n.input[1] for n in g.node if n.name in labels}
    dt_proj = {n.input[1] for n in g.node if labels.get(n.name, "").endswith("dt_proj")}
    assert {types[w] for w in gemm_w - dt_proj} == {TensorProto.FLOAT16}                # GEMMs in fp16
    assert {types[w] for w in dt_proj} == {TensorProto.FLOAT}                           # delta path fp32
    for name, t in inits.items():
        if name.endswith(("A_log", ".D", "dt_proj.bias")):
            assert t == TensorProto.FLOAT, name
    for n in g.node:
        if n.op_type == "SelectiveScan":                                                # the scan: fp32 only
            assert {types[i] for i in n.input if i in types} == {TensorProto.FLOAT}
        if n.op_type == "SlidingWindowAttention":                   # q/k/v in fp16, the window state fp32
            assert [types[i] for i in n.input[:5]] == [TensorProto.FLOAT16] * 3 + [TensorProto.FLOAT] * 2
        if n.op_type == "ReduceMean":                                                   # norm statistics
            assert types[n.input[0]] == TensorProto.FLOAT
    pg = onnx.load(str(arts["fp16-portable"] / "model.onnx")).graph
    ptypes = _types(arts["fp16-portable"] / "model.onnx")
    assert {ptypes[n.input[0]] for n in pg.node if n.op_type == "Softmax"} == {TensorProto.FLOAT}


def _stream_logits(path, ids, chunks):
    """Every position's logits, feeding chunks of the given sizes (cycled) with the state carried; the final
    state in the manifest's layout (ONNX Runtime keeps a plugin graph's windows as rings)."""
    be = open_model(str(path)).backend
    state = be.new_state(1)
    out, p, i = [], 0, 0
    while p < len(ids):
        c = ids[p:p + chunks[i % len(chunks)]]
        logits, state = be.run(c[None], np.array([p]), state)
        out.append(logits[0])
        p, i = p + len(c), i + 1
    return np.concatenate(out), be.state_to_host(state, p)


@pytest.fixture(scope="module")
def held_ids(arts, texts):
    tok = open_model(str(arts["fp32"])).tokenizer
    return np.asarray(tok.encode(texts["held"].read_text())[:300])


@pytest.mark.parametrize("kind", ["fp16", "fp16-portable"])
def test_fp16_tracks_fp32(arts, held_ids, kind):
    ref, ref_state = _stream_logits(arts["fp32"], held_ids, [MAX_CHUNK])
    got, state = _stream_logits(arts[kind], held_ids, [MAX_CHUNK])
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.97
    man = Manifest.load(arts[kind])
    for spec, a, b in zip(man.state, state, ref_state):
        assert a.dtype == np.float32, spec.name                    # the state stays fp32 between calls
        assert np.abs(a - b).max() < 0.05 * max(1.0, np.abs(b).max()), spec.name


def test_fp16_flavours_agree_and_chunking_is_exact(arts, held_ids):
    a, sa = _stream_logits(arts["fp16"], held_ids, [MAX_CHUNK])
    b, sb = _stream_logits(arts["fp16-portable"], held_ids, [1, 7, 64])
    assert np.abs(a - b).max() < 2e-2
    assert all(np.abs(x - y).max() < 2e-2 for x, y in zip(sa, sb))


# ---- int8 -----------------------------------------------------------------------------------
def test_int8_qdq_is_where_promised(arts):
    man = Manifest.load(arts["int8"])
    src = Manifest.load(arts["fp32"])
    assert man.dtype == "int8" and man.fingerprint == src.fingerprint
    q = man.quantization
    assert q["method"] == "percentile" and q["tokens"] == 24 * 64 and q["kept_fp32"] == []   # head int8 too
    m = onnx.load(str(arts["int8"] / "model.onnx"))
    g = m.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    labels = gemm_labels(onnx.load(str(arts["fp32"] / "model.onnx")), src.model)
    assert sorted(labels.values()) == q["quantized"]
    assert len(q["quantized"]) == 4 * 3 + 2 * 4 + 2 * 2 + 1             # MLPs; Mamba in/x/dt/out; attn qkv/proj; head
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()                  # symmetric int8, zero point 0
            if n.input[0] in inits:                                      # weights: per output channel
                attr = {a.name: a.i for a in n.attribute}
                assert inits[n.input[1]].shape == (inits[n.input[0]].shape[1],) and attr.get("axis") == 1
            else:                                                        # activations: per tensor
                assert inits[n.input[1]].size == 1
    quantized_gemms = set()
    for n in g.node:
        feeds = [producer.get(i) for i in n.input]
        dq_fed = any(p is not None and p.op_type == "DequantizeLinear" for p in feeds)
        if n.op_type == "MatMul" and dq_fed:
            quantized_gemms.add(n.name)
        elif dq_fed:            # conv1d, the scan, attention, norms, softmax, state: never fed by a DQ
            pytest.fail(f"{n.op_type} {n.name} consumes a dequantised tensor")
    assert len(quantized_gemms) == len(q["quantized"])
    users = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    shared = [n.name for n in g.node if n.op_type == "DequantizeLinear" and users.get(n.output[0], 0) != 1]
    assert not shared, f"activation DQs shared between GEMMs (ORT then cannot fuse integer GEMMs): {shared[:3]}"
    assert all(producer[o.name].op_type not in ("DequantizeLinear", "QuantizeLinear") for o in g.output)  # state


def test_int8_accuracy_on_real_text(arts, texts):
    ref = evaluate(str(arts["fp32"]), text=str(texts["held"]), max_tokens=1500)
    got = evaluate(str(arts["int8"]), text=str(texts["held"]), max_tokens=1500, agree_with=str(arts["fp32"]))
    assert got["tokens"] == ref["tokens"]
    assert got["ppl"] < ref["ppl"] * 1.05                            # loose: 24 calibration chunks, 1.5K tokens
    assert got["top1_agreement"] > 0.9


def test_int8_streaming_is_consistent(arts, held_ids):
    """Static scales: chunking changes a token's result only where fp32 noise (~1e-6) flips an int8
    rounding (one step, ~1e-2): rare and small, far below the int8-vs-fp32 error."""
    a, sa = _stream_logits(arts["int8"], held_ids[:150], [MAX_CHUNK])
    b, sb = _stream_logits(arts["int8"], held_ids[:150], [1, 5, 33])
    ref, _ = _stream_logits(arts["fp32"], held_ids[:150], [MAX_CHUNK])
    assert np.abs(a - b).mean() < 0.1 * np.abs(a - ref).mean()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.98
    assert all(np.abs(x - y).mean() < 1e-2 for x, y in zip(sa, sb))


def test_int8_validate_passes_and_catches_a_broken_scale(arts, tmp_path):
    import shutil

    from samba_edge.tools.validate import validate

    assert validate(str(arts["int8"]), steps=4, chunks=(1, 7))["passed"]
    broken = tmp_path / "broken"
    shutil.copytree(arts["int8"], broken)
    m = onnx.load(str(broken / "model.onnx"))
    labels = gemm_labels(onnx.load(str(arts["fp32"] / "model.onnx")), Manifest.load(arts["fp32"]).model)
    w3 = next(n for n in m.graph.node if labels.get(n.name) == "h.2.mlp.w3")
    dq = next(n for n in m.graph.node if n.output[0] == w3.input[1])             # its weight's DequantizeLinear
    for init in m.graph.initializer:
        if init.name == dq.input[1]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 8, init.name))
    onnx.save(m, str(broken / "model.onnx"))
    from samba_edge.runtime.integrity import record

    record(broken)                     # a faulty calibration: a wrong scale under a consistent manifest
    assert not validate(str(broken), steps=4, chunks=(1, 7))["passed"]


def test_calibrate_options(arts, texts, tmp_path):
    rec = calibrate(arts["fp32"], tmp_path / "x", [str(texts["calib"])], samples=4, chunk=32, method="max",
                    exclude=["*.mlp.*"], include_head=True, progress=False)
    assert "lm_head" in rec["quantized"] and not any(".mlp." in x for x in rec["quantized"])
    assert all(".mlp." in x for x in rec["kept_fp32"])
    out = open_model(str(tmp_path / "x")).new_stream().feed([1, 2, 3])
    assert np.isfinite(out).all()


def test_calibrate_bad_input(arts, texts, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    cases = [
        (dict(export_dir=arts["fp32"], texts=[str(short)], samples=8, chunk=64), "tokens"),
        (dict(export_dir=arts["int8"], texts=[str(texts["calib"])]), "already quantised"),
        (dict(export_dir=arts["fp16"], texts=[str(texts["calib"])]), "fp32 export"),
        (dict(export_dir=arts["fp32"], texts=[str(texts["calib"])], method="kl"), "unknown calibration method"),
        (dict(export_dir=arts["fp32"], texts=[str(bad)]), "not UTF-8"),
        (dict(export_dir=arts["fp32"], texts=[]), "give calibration data"),
        (dict(export_dir=arts["fp32"], texts=[str(texts["calib"])], exclude=["*"]), "nothing to quantise"),
    ]
    for kw, msg in cases:
        with pytest.raises(SambaEdgeError, match=msg):
            calibrate(out=out, progress=False, **kw)
        assert not out.exists()
    assert not list(tmp_path.glob(".*out*"))                          # no temp leftovers either


def test_cli_calibrate_and_export_dtype(arts, texts, tmp_path, capsys):
    from samba_edge.tools.cli import main

    with pytest.raises(SystemExit) as e:
        main(["calibrate", str(arts["fp32"]), "-o", str(tmp_path / "o"), "--text", str(texts["calib"]),
              "--method", "minmax"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown calibration method" in err
    with pytest.raises(SystemExit) as e:
        main(["export", CK, "-o", str(tmp_path / "e"), "--dtype", "bf16"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_fp16_export_ships_fp16_attention_kernels(arts):
    pytest.importorskip("triton")
    import json

    from samba_edge.plugins.aot import load_index

    index = load_index(arts["fp16"])
    assert index["attention_dtype"] == "fp16" and not index["errors"]
    sm = next(iter(index["archs"]))
    for name, want in (("swa_attention", "*fp16"), ("selective_scan", "*fp32")):
        meta = json.loads((arts["fp16"] / "kernels" / index["archs"][sm]["kernels"][name]["files"]["meta"]).read_text())
        assert meta["args"][0]["type"] == want, name                  # q (attention) / u (scan, fp32 always)


def test_calibration_reader_groups_carry_the_stream(arts):
    """Grouped reading (what keeps calibration's memory to one group) hands out the same chunks with the
    same carried state as one pass over the whole stream; the state is what the (tapped) calibration
    session's own run of the previous chunk produced."""
    from samba_edge.calibration.int8 import StreamReader, _StateTap
    from samba_edge.runtime.backends import OrtBackend

    backend = OrtBackend(arts["fp32"], ops="reference")      # a session with the graph's own outputs (no rings)
    ids = np.random.default_rng(0).integers(0, backend.manifest.vocab_size, 7 * 16, dtype=np.int64)

    def feeds(group):
        reader, out, calls = StreamReader(backend.manifest, ids, 7, 16, group=group), [], 0
        tap = _StateTap(backend.session, reader)
        for part in reader.groups():
            calls += 1
            while (f := part.get_next()) is not None:
                out.append(f)
                tap.run(None, f)
        return out, calls

    one, calls1 = feeds(7)
    grouped, calls3 = feeds(3)
    assert (calls1, calls3, len(one), len(grouped)) == (1, 3, 7, 7)
    for a, b in zip(one, grouped):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert grouped[5]["start_pos"][0] == 5 * 16 and np.abs(grouped[5][list(grouped[5])[2]]).sum() > 0
    state = backend.manifest.empty_state(1)                          # == the runtime carrying the stream
    for f in one[:5]:
        _, state = backend.run(f["input_ids"], f["start_pos"], state)
    assert all(np.array_equal(x, grouped[5][s.name]) for x, s in zip(state, backend.manifest.state))


def test_calibrate_peak_memory_is_one_group(arts, texts, tmp_path):
    """48 chunks of 128 tokens: holding every activation (ORT's one-call default) peaks near 1.6 GB here;
    streamed statistics stay within the sessions' own footprint."""
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child would report the (large)
    # pytest process's own peak
    code = ("import sys; from samba_edge.calibration.int8 import calibrate; "
            "calibrate(sys.argv[1], sys.argv[2], [sys.argv[3]], samples=48, chunk=128, progress=False); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))")
    src = export_onnx(CK, tmp_path / "fp32", max_chunk=128)
    out = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "int8"), str(texts["calib"])],
                         capture_output=True, text=True, check=True)
    peak_mb = int(out.stdout.split()[-1]) / 1024
    assert peak_mb < 900, f"calibration peaked at {peak_mb:.0f} MB"
