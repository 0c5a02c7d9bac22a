"""`samba-edge bench`: every system measured at every context, positive numbers, sizes parsed strictly."""
import json

import pytest

pytest.importorskip("onnxruntime")

from samba_edge.export.checkpoint import save_canonical  # noqa: E402
from samba_edge.export.onnx_export import export_onnx  # noqa: E402
from samba_edge.runtime.errors import SambaEdgeError  # noqa: E402
from samba_edge.tests.helpers import tiny_model  # noqa: E402
from samba_edge.tools.bench import SYSTEMS, parse_contexts, parse_size, render_text, run_bench  # noqa: E402


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    model = tiny_model("tiny_gqa2_w8")
    ck = save_canonical(d / "ck", model.config, model.state_dict())
    return export_onnx(str(ck), d / "art", flavor="portable", max_chunk=64)


def test_run_bench_structure(tiny_artifact, tmp_path):
    out = tmp_path / "bench.json"
    res = run_bench(str(tiny_artifact), baseline="torch", contexts=(64, 256), decode_tokens=4, json_out=str(out),
                    threads=1)                                                # steady on a busy machine
    assert set(res["systems"]) == set(SYSTEMS)
    assert res["contexts"] == [64, 256] and res["prefill_chunk"] == 64
    assert res["checkpoint"] and res["checkpoint"].endswith("ck")              # the artifact's source
    for name, sysres in res["systems"].items():
        assert [r["context"] for r in sysres["runs"]] == [64, 256], name
        for r in sysres["runs"]:
            for key in ("decode_tok_s", "latency_ms_p50", "latency_ms_p99", "peak_rss_mib"):
                assert r[key] > 0, (name, key)
            assert r["latency_ms_p99"] >= r["latency_ms_p50"]
            if name == "transformer":
                assert r["prefill_tok_s"] is None and r["kv_cache_bytes"] > 0
            else:
                assert r["prefill_tok_s"] > 0
    art = {r["context"]: r for r in res["systems"]["artifact"]["runs"]}
    assert art[64]["backend"] == "ort"
    assert res["systems"]["torch"]["runs"][0]["backend"] == "torch"
    assert res["systems"]["torch"]["runs"][0]["fingerprint"] == art[64]["fingerprint"]   # the same weights
    x = {r["context"]: r for r in res["systems"]["transformer"]["runs"]}
    assert x[256]["kv_cache_bytes"] == 4 * x[64]["kv_cache_bytes"]             # the cache grows with context
    rows = res["ratios"]["per_context"]
    assert [r["context"] for r in rows] == [64, 256]
    assert all(r["decode_tok_s_artifact_over_torch"] > 0 and r["latency_p50_transformer_over_artifact"] > 0
               for r in rows)
    assert set(res["ratios"]["largest_over_smallest_context"]) == set(SYSTEMS)
    assert any("random values" in n for n in res["notes"])                    # the transformer's cache fill is said
    assert json.loads(out.read_text())["systems"].keys() == res["systems"].keys()
    text = render_text(res)
    assert "artifact" in text and "transformer" in text and "ratios" in text


def test_sizes():
    assert parse_size("1k") == 1024 and parse_size("64K") == 65536 and parse_size("300") == 300
    assert parse_size("1m") == 1 << 20
    assert parse_contexts("4k,1k, 16k") == (1024, 4096, 16384)
    for bad in ("", "0", "1.5k", "x", "-1k", "1g"):
        with pytest.raises(SambaEdgeError, match="context"):
            parse_contexts(bad)


def test_plot_without_matplotlib_fails_before_any_run(capsys, monkeypatch, tmp_path):
    """`--plot` with no matplotlib is refused up front (exit 2, naming the install), not skipped after the run."""
    import sys

    import samba_edge.tools.bench as bench
    from samba_edge.tests.test_cli import run

    def no_work(*a, **k):
        raise AssertionError("the benchmark started")

    monkeypatch.setitem(sys.modules, "matplotlib", None)                # `import matplotlib` raises ImportError
    monkeypatch.setattr(bench, "_resolve_artifact", no_work)
    monkeypatch.setattr(bench, "_run_worker", no_work)
    code, out, err = run(capsys, "bench", "builtin:samba-tiny-py", "--plot", str(tmp_path / "b.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "pip install matplotlib" in err and "started" not in err
    assert list(tmp_path.iterdir()) == []
