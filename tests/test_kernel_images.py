"""Which kernel image the launcher loads (plugins/trt_launch.py KernelSet.image): the exact arch's cubin
-> that arch's PTX -> the portable PTX; and what doctor says about it. A synthetic kernels/ folder, so
no compiler is needed: the choice is about files and archs, not about the kernels' code."""
from __future__ import annotations

import json

import pytest

from samba_edge.plugins.trt_launch import KernelSet, Launcher
from samba_edge.runtime.errors import SambaEdgeError

KERNELS = ("selective_scan", "swa_attention", "swa_window_update")


def _kernels_dir(root, archs: dict, portable="sm_75"):
    """archs: sm -> files it has ("cubin", "ptx")."""
    kd = root / "kernels"
    index = {"ops": {"SelectiveScan": ["selective_scan"], "SlidingWindowAttention": ["swa_attention", "swa_window_update"]},
             "aot_impl": {}, "archs": {}, "errors": [], "portable_ptx": portable}
    for sm, kinds in archs.items():
        (kd / sm).mkdir(parents=True)
        entry = index["archs"][sm] = {"kernels": {}}
        for i, k in enumerate(KERNELS):
            files = {"meta": f"{sm}/{k}.json"}
            for kind in kinds:
                files[kind] = f"{sm}/{k}.{kind}"
                (kd / files[kind]).write_bytes((b"\x7fELF" if kind == "cubin" else b".version 8.0\n") + sm.encode())
            (kd / files["meta"]).write_text(json.dumps({"kernel": k, "entry": f"{k}_kernel", "arch": sm, "args": [],
                                                        "grid": ["1", "1", "1"], "block": [128, 1, 1],
                                                        "shared_mem_bytes": 0}))
            entry["kernels"][k] = {"files": files, "launch_order": i}
    (kd / "kernels.json").write_text(json.dumps(index))
    return root


@pytest.fixture
def kset(tmp_path):
    return KernelSet.open(_kernels_dir(tmp_path, {"sm_75": ("cubin", "ptx"), "sm_80": ("cubin", "ptx"),
                                                  "sm_90": ("ptx",)}))


@pytest.mark.parametrize("sm, kind, arch", [
    ("sm_80", "cubin", "sm_80"),            # the exact arch's cubin
    ("sm_75", "cubin", "sm_75"),
    ("sm_90", "ptx", "sm_90"),              # no cubin: that arch's PTX, JIT by the driver
    ("sm_86", "portable", "sm_75"),         # nothing for the arch: the portable PTX
    ("sm_121", "portable", "sm_75"),
])
def test_image_order(kset, sm, kind, arch):
    for k in KERNELS:
        rec, image = kset.image(k, sm)
        assert (image.kind, image.arch) == (kind, arch) and rec["arch"] == arch
        assert image.data.endswith(b"\0") == (kind != "cubin")           # PTX goes to the driver NUL-terminated


def test_forced_images_and_refusals(kset):
    assert kset.image("selective_scan", "sm_80", force="ptx")[1].kind == "ptx"
    assert kset.image("selective_scan", "sm_80", force="portable")[1].arch == "sm_75"
    with pytest.raises(SambaEdgeError, match="no usable image.*sm_90"):
        kset.image("selective_scan", "sm_90", force="cubin")
    with pytest.raises(SambaEdgeError, match="newer than the device"):
        kset.image("selective_scan", "sm_70")                            # older than the portable PTX
    with pytest.raises(ValueError):
        Launcher(kset, "SelectiveScan", image="sass")


def test_kernel_sets_are_content_addressed(tmp_path, kset):
    other = KernelSet.open(_kernels_dir(tmp_path / "other", {"sm_80": ("cubin",)}))
    assert other.key != kset.key and KernelSet.by_key(kset.key) is kset and KernelSet.by_key(other.key) is other
    same = KernelSet.open(_kernels_dir(tmp_path / "copy", {"sm_75": ("cubin", "ptx"), "sm_80": ("cubin", "ptx"),
                                                           "sm_90": ("ptx",)}))
    assert same is kset                                                  # same bytes, same set
    (tmp_path / "copy" / "kernels" / "sm_80" / "selective_scan.cubin").write_bytes(b"\x7fELFchanged")
    assert KernelSet(tmp_path / "copy").key != kset.key                  # any byte of an image changes the key


def test_doctor_says_which_image_this_gpu_loads(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from samba_edge.runtime.manifest import Manifest
    from samba_edge.tools.doctor import check_kernels

    art = _kernels_dir(tmp_path, {"sm_75": ("cubin", "ptx"), "sm_90": ("cubin", "ptx")})
    monkeypatch.setattr(Manifest, "load", staticmethod(lambda _: SimpleNamespace(flavor="plugin")))
    ok, jit, none = (check_kernels(str(art), sm) for sm in ("sm_90", "sm_89", "sm_70"))
    assert ok["status"] == "ok" and "cubin sm_90" in ok["detail"]
    assert jit["status"] == "ok" and "portable PTX sm_75" in jit["detail"]
    assert none["status"] == "error" and "sm_70" in none["detail"]
