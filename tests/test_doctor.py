"""`samba-edge doctor` runs on any machine (CPU-only included) and reports every check."""
from __future__ import annotations

import json

from samba_edge.tools.doctor import STATUSES, render_text, run_doctor


def test_doctor_reports_without_crashing(tmp_path):
    report = run_doctor(str(tmp_path))                       # not an artifact: reported, not raised
    names = [c["name"] for c in report["checks"]]
    for n in ("tensorrt", "cuda_driver", "gpu", "plugins", "triton", "kernels"):
        assert n in names
    assert all(c["status"] in STATUSES for c in report["checks"])
    kernels = next(c for c in report["checks"] if c["name"] == "kernels")
    assert kernels["status"] == "error" and "manifest.json" in kernels["detail"]
    trt = next(c for c in report["checks"] if c["name"] == "tensorrt")
    assert report["can_build_engine"] == (trt["status"] == "ok")
    assert "build engines:" in render_text(report)


def test_doctor_cli_json(capsys):
    from samba_edge.tools.cli import main

    main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["checks"] and "can_run_engine" in report


def test_no_tensorrt_is_a_clear_error(monkeypatch):
    import importlib.util

    import pytest

    from samba_edge.plugins import trt_import
    from samba_edge.runtime.errors import SambaEdgeError

    monkeypatch.setattr(trt_import, "_cached", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SambaEdgeError, match="tensorrt-rtx-cu12-libs tensorrt-rtx-cu12-bindings"):
        trt_import.import_trt()
    assert not trt_import.trt_available()
