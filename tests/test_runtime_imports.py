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


CK = "builtin:samba-tiny-py"


@pytest.fixture(scope="module")
def artifacts(tiny_export):
    return {flavor: tiny_export(flavor) for flavor in ("portable", "plugin")}


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


def test_plugin_flavour_runs_without_onnxruntime_extensions_its_references_say_what_to_install(artifacts):
    """The runtime runs a plugin graph through the ops' standard-op bodies (no onnxruntime-extensions);
    only the numpy-reference path (validate, ops="reference") needs the package, and says so."""
    code = f"""
import importlib.util, json
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "onnxruntime_extensions" else real(name, *a)
from samba_edge.runtime import open_model
from samba_edge.runtime.backends import OrtBackend
rep = {{"logits": len(open_model({str(artifacts["plugin"])!r}).new_stream().feed([1, 2, 3]))}}
try:
    OrtBackend({str(artifacts["plugin"])!r}, ops="reference")
    rep["error"] = None
except Exception as e:
    rep["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(rep))
"""
    rep = _fresh(code)
    assert rep["logits"] > 0
    assert rep["error"] and rep["error"].startswith("SambaEdgeError") and "pip install onnxruntime-extensions" in \
        rep["error"], rep


def test_cached_builtin_generate_imports_no_torch(warm_cache):
    """`generate builtin:NAME` on a cache hit (the README's main command from its second run on) runs the
    cached export with ONNX Runtime: resolving the checkpoint and keying the cache import no PyTorch (which
    alone cost ~1.4 s of start-up and ~0.5 s of teardown)."""
    pytest.importorskip("torch")
    env = f"import json, os, sys; os.environ['SAMBA_EDGE_CACHE'] = {str(warm_cache)!r}\n"
    rep = _fresh(env + f"""
from samba_edge.tools.cli import main
main(["generate", {CK!r}, "-p", "def f(", "-n", "4"])
print()
print(json.dumps({{"torch": "torch" in sys.modules}}))
""")
    assert rep == {"torch": False}


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_console_script_flushes_and_keeps_exit_codes(backend):
    """The console script leaves at once after a torch command (no interpreter teardown): its output is
    flushed, and an error keeps its one line and exit status 2."""
    import shutil

    exe = shutil.which("samba-edge")
    if exe is None:
        pytest.skip("the samba-edge console script is not on PATH (pip install -e .)")
    if backend == "torch":
        pytest.importorskip("torch")
    r = subprocess.run([exe, "generate", CK, "--backend", backend, "-p", "def f(", "-n", "6"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("def f(") and len(r.stdout) > len("def f("), r.stderr
    bad = subprocess.run([exe, "generate", CK, "--backend", backend, "-p", "x", "--top-p", "0"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "top-p" in bad.stderr
