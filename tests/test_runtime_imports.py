"""The runtime never imports torch or transformers, whatever the artifact's flavour.

Run where transformers IS installed (the `test` extra): `import onnxruntime_extensions` imports its
`cvt` module, which imports transformers and torch when they are present, and that made opening a
plugin-flavour artifact seconds and ~220 MB heavier (plugins/ort_ops.py now imports only the
package's op-registration core). CLI start-up is covered by
tests/test_cli.py::test_cli_start_up_imports_no_torch (no torch, onnx or onnxruntime at all).
"""
import importlib.util
import json
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

from samba_edge.export.onnx_export import export_onnx  # noqa: E402

CK = "builtin:samba-tiny-py"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("imports")
    return {flavor: export_onnx(CK, root / flavor, flavor=flavor, max_chunk=16) for flavor in ("portable", "plugin")}


def _fresh(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


OPEN_AND_FEED = """
import json, sys
import numpy as np
from samba_edge.runtime import open_model
m = open_model({path!r})
s = m.new_stream()
logits = s.feed([1, 2, 3])
report = {{"loaded": [k for k in ("torch", "transformers") if k in sys.modules],
          "finite": bool(np.isfinite(np.asarray(logits)).all())}}
"""


@pytest.mark.parametrize("flavor", ["portable", "plugin"])
def test_open_and_feed_import_neither_torch_nor_transformers(artifacts, flavor):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: this test is only meaningful where it is (pip install .[test])")
    if flavor == "plugin":
        pytest.importorskip("onnxruntime_extensions")
    rep = _fresh(OPEN_AND_FEED.format(path=str(artifacts[flavor])) + "print(json.dumps(report))")
    assert rep["loaded"] == [], f"{flavor} artifact: open_model + feed imported {rep['loaded']}"
    assert rep["finite"]


def test_full_onnxruntime_extensions_import_later_still_works(artifacts):
    """The plugin path imports only onnxruntime_extensions' registration core; a later ordinary import
    of the package (by the user) must get the whole package, sharing that core, and leave the sessions
    made before it intact: the exit status is checked too, since an op registered by the package after
    a session exists leaves that session with dangling pointers (a segfault when it is destroyed)."""
    pytest.importorskip("onnxruntime_extensions")
    code = OPEN_AND_FEED.format(path=str(artifacts["plugin"])) + """
first = np.asarray(logits)
from samba_edge.plugins import ort_ops
import onnxruntime_extensions as ortx
from onnxruntime_extensions import _ocos
report["core_shared"] = ortx.onnx_op == _ocos.Opdef.declare and ortx.PyCustomOpDef is _ocos.PyCustomOpDef
report["full_api"] = callable(getattr(ortx, "gen_processing_models", None))
report["same_library"] = ortx.get_library_path() == ort_ops.register_reference_ops()
again = open_model({path!r}).new_stream().feed([1, 2, 3])     # a new session after the full import
report["same_logits"] = bool(np.array_equal(np.asarray(again), first))
print(json.dumps(report))
""".format(path=str(artifacts["plugin"]))
    rep = _fresh(code)
    assert rep["loaded"] == [] and rep["finite"], rep
    assert rep["core_shared"] and rep["full_api"] and rep["same_library"] and rep["same_logits"], rep


def test_plugin_flavour_without_onnxruntime_extensions_says_what_to_install(artifacts):
    code = f"""
import importlib.util, json
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "onnxruntime_extensions" else real(name, *a)
from samba_edge.runtime import open_model
try:
    open_model({str(artifacts["plugin"])!r})
    print(json.dumps({{"error": None}}))
except Exception as e:
    print(json.dumps({{"error": type(e).__name__ + ": " + str(e)}}))
"""
    rep = _fresh(code)
    assert rep["error"] and rep["error"].startswith("SambaEdgeError") and "pip install onnxruntime-extensions" in \
        rep["error"], rep
