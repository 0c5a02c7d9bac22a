"""Test-session settings.

Plugin-flavour exports compile their Triton kernels for every GPU arch by default (9 archs x 5 kernels per
model shape, ~30 s on 2 cores for each new shape). The tests' exports compile one: sm_75, whose PTX is
the portable one (tests/test_trt_enqueue_sim.py adds sm_90, its simulated device). Every arch is compiled
and checked by tests/test_aot.py (`-m slow`), which clears this setting where it exports.
"""
import os

os.environ.setdefault("SAMBA_EDGE_KERNEL_ARCHS", "75")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """`tiny_export(flavor)`: the shipped model exported once per test session per flavour (max chunk 64),
    for the many tests that only read an artifact (each export costs ~16 s; copy one before changing it)."""
    made = {}

    def get(flavor: str):
        if flavor not in made:
            pytest.importorskip("torch")
            pytest.importorskip("onnx")
            from samba_edge.export.onnx_export import export_onnx

            made[flavor] = export_onnx("builtin:samba-tiny-py", tmp_path_factory.mktemp(f"tiny-{flavor}") / flavor,
                                       flavor=flavor, max_chunk=64)
        return made[flavor]

    return get


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory):
    """An export cache ($SAMBA_EDGE_CACHE) that already holds the shipped model's cached export, as a
    user's has from the second run on (tests that need a cold one make their own)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from samba_edge.runtime.session import cached_export

    root = tmp_path_factory.mktemp("warm-cache")
    old = os.environ.get("SAMBA_EDGE_CACHE")
    os.environ["SAMBA_EDGE_CACHE"] = str(root)
    try:
        cached_export("builtin:samba-tiny-py")
    finally:
        if old is None:
            os.environ.pop("SAMBA_EDGE_CACHE")
        else:
            os.environ["SAMBA_EDGE_CACHE"] = old
    return root
