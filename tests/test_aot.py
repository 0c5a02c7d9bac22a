"""Ahead-of-time kernels (plugins/aot.py): PTX + cubin for sm_75/80/86/87/89/90/100/110/120 with no
GPU, the portable PTX (sm_75, non-"a", ISA 6.5) that newer GPUs' drivers JIT, launcher metadata
complete and consistent with the PTX and the host wrappers, ptxas accepts the PTX, the cache works,
the exporter ships them; tools/gpu_check.py fails cleanly without a GPU."""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow          # cold compiles of every kernel x arch (`pytest -m slow`; CI runs it)

pytest.importorskip("triton")

from samba_edge.export.config import get_config  # noqa: E402
from samba_edge.plugins import aot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCHS = [75, 80, 86, 87, 89, 90, 100, 110, 120]
PTX_VERSION = {75: "6.5", 80: "7.0", 86: "7.1", 87: "8.5", 89: "7.8", 90: "8.0", 100: "8.7", 110: "9.0", 120: "8.7"}
COMMON_X86 = [75, 80, 86, 89]            # T4 / RTX 20, A100 / A30, A10 / A40 / RTX 30, L4 / L40 / RTX 40
PORTABLE = "sm_75"
KERNELS = ["selective_scan", "selective_scan_qdp", "swa_attention", "swa_qdp", "swa_window_update"]
# newer GPUs than the portable PTX's sm_75, by the ptxas that assembles for them (Triton's bundled CUDA 12.9
# one knows up to sm_121, its CUDA 13 "ptxas-blackwell" sm_110 Thor): a driver JIT-compiling the PTX does the same
JIT_ONTO = {"ptxas": ["sm_87", "sm_90", "sm_100", "sm_120", "sm_121"], "ptxas-blackwell": ["sm_110"]}
CONTRACT = {"SelectiveScan": (["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state"],
                              ["y", "ssm_state_out"]),
            "SlidingWindowAttention": (["q", "k", "v", "k_window", "v_window", "start_pos"],
                                       ["y", "k_window_out", "v_window_out"])}
RECORD_KEYS = {"kernel", "op", "entry", "arch", "ptx_target", "ptx_version", "ptxas", "triton_version", "source",
               "source_sha256", "constexprs", "num_warps", "num_ctas", "block", "grid", "grid_vars",
               "shared_mem_bytes", "needs_shared_mem_opt_in", "global_scratch_bytes", "profile_scratch_bytes",
               "pointer_alignment_bytes", "args", "ptx_params", "files"}
PTX_PARAM = {"*": "u64", "i32": "u32", "fp32": "f32"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh kernel cache, so this module really compiles (and leaves the user's cache alone)."""
    d = tmp_path_factory.mktemp("kcache")
    old = os.environ.get("SAMBA_EDGE_CACHE")
    os.environ["SAMBA_EDGE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SAMBA_EDGE_CACHE", None)
    else:
        os.environ["SAMBA_EDGE_CACHE"] = old


@pytest.fixture(scope="module")
def built(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    t0 = time.perf_counter()
    index = aot.write_kernels(out, get_config("Samba_421M"), strict=True)
    return out / "kernels", index, time.perf_counter() - t0


def _records(kdir: Path, index: dict):
    for sm, entry in index["archs"].items():
        for name, k in entry["kernels"].items():
            yield sm, name, json.loads((kdir / k["files"]["meta"]).read_text())


def test_all_archs_compile(built):
    kdir, index, seconds = built
    assert not index["errors"], index["errors"]
    assert sorted(index["archs"]) == sorted(f"sm_{a}" for a in ARCHS)
    assert json.loads((kdir / "kernels.json").read_text()) == index
    assert index["ops"] == {"SelectiveScan": ["selective_scan"],
                            "SlidingWindowAttention": ["swa_attention", "swa_window_update"]}
    assert index["aot_impl"] == {"SelectiveScan": "selective_scan_qdp", "SlidingWindowAttention": "swa_qdp"}
    for a in ARCHS:
        kernels = index["archs"][f"sm_{a}"]["kernels"]
        assert sorted(kernels) == ["selective_scan", "selective_scan_qdp", "swa_attention", "swa_qdp",
                                   "swa_window_update"]
        for k in kernels.values():
            assert (kdir / k["files"]["ptx"]).is_file() and (kdir / k["files"]["meta"]).is_file()
            cubin = (kdir / k["files"]["cubin"]).read_bytes()
            assert cubin[:4] == b"\x7fELF"
    print(f"\ncompiled 5 kernels x {len(ARCHS)} archs in {seconds:.1f}s")


def test_ptx_targets_versions_and_entries(built):
    kdir, index, _ = built
    for sm, name, rec in _records(kdir, index):
        a = int(sm[3:])
        ptx = (kdir / rec["files"]["ptx"]).read_text()
        target = f"sm_{a}" + ("a" if a >= 90 else "")
        assert re.search(rf"^\.target {target}\s*$", ptx, re.M), (sm, name)
        assert re.search(rf"^\.version {re.escape(PTX_VERSION[a])}\s*$", ptx, re.M), (sm, name)
        assert re.search(rf"\.visible \.entry {rec['entry']}\(", ptx), (sm, name)
        assert "/work/" not in ptx and str(REPO) not in ptx        # no local paths (no line info)


def test_launcher_metadata_is_complete(built):
    from samba_edge.plugins import triton_scan, triton_swa

    kdir, index, _ = built
    mods = {"selective_scan": (triton_scan, "selective_scan_fwd_kernel"),
            "swa_attention": (triton_swa, "swa_fwd_kernel"),
            "swa_window_update": (triton_swa, "swa_window_update_kernel"),
            "selective_scan_qdp": (triton_scan, "selective_scan_qdp_kernel"),
            "swa_qdp": (triton_swa, "swa_qdp_kernel")}
    for sm, name, rec in _records(kdir, index):
        assert RECORD_KEYS <= set(rec), (sm, name, RECORD_KEYS - set(rec))
        mod, fn = mods[name]
        assert rec["entry"] == fn and rec["arch"] == sm
        assert rec["block"] == [32 * rec["num_warps"], 1, 1] and rec["num_ctas"] == 1
        assert isinstance(rec["shared_mem_bytes"], int) and rec["shared_mem_bytes"] >= 0
        assert rec["needs_shared_mem_opt_in"] == (rec["shared_mem_bytes"] > 49152)
        assert rec["global_scratch_bytes"] == 0 and rec["profile_scratch_bytes"] == 0
        # argument order = the kernel's non-constexpr parameters, then the two null scratch pointers
        kern = getattr(mod, fn)
        params = [p for p in kern.arg_names if p not in rec["constexprs"]]
        args = rec["args"]
        assert [a["name"] for a in args] == params + ["global_scratch", "profile_scratch"]
        assert [a["index"] for a in args] == list(range(len(args)))
        assert [a["value"]["kind"] for a in args[-2:]] == ["null", "null"]
        # ... and matches the PTX entry's parameter list, type by type
        ptx = (kdir / rec["files"]["ptx"]).read_text()
        m = re.search(r"\.entry\s+" + rec["entry"] + r"\s*\(([^)]*)\)", ptx)
        ptx_types = re.findall(r"\.param\s+\.(\w+)", m.group(1))
        assert ptx_types == rec["ptx_params"]
        assert ptx_types == [PTX_PARAM["*" if a["type"].startswith("*") else a["type"]] for a in args], (sm, name)
        assert all(a["bytes"] == (8 if a["type"].startswith("*") else 4) for a in args)
    # every tensor of each op's contract is passed to one of its kernels
    for sm, entry in index["archs"].items():
        for op, (ins, outs) in CONTRACT.items():
            used = {(a["value"]["kind"], a["value"]["name"]) for _, n, rec in _records(kdir, index)
                    if rec["op"] == op and rec["arch"] == sm for a in rec["args"] if "name" in a["value"]}
            assert {("input", n) for n in ins} | {("output", n) for n in outs} <= used, (sm, op)
    # aot_impl kernels: ONE kernel per op takes the whole contract, as inputs, int32 scalars, outputs
    for sm, name, rec in _records(kdir, index):
        if name not in index["aot_impl"].values():
            continue
        ins, outs = CONTRACT[rec["op"]]
        kinds = [a["value"]["kind"] for a in rec["args"][:-2]]
        n_in, n_out = kinds.count("input"), kinds.count("output")
        assert kinds[:n_in] == ["input"] * n_in and kinds[len(kinds) - n_out:] == ["output"] * n_out, (sm, name)
        assert all(a["type"] == "i32" for a in rec["args"][n_in:len(kinds) - n_out]), (sm, name)   # no fp32 scalars
        assert [a["value"]["name"] for a in rec["args"][:n_in]] == list(ins), (sm, name)
        assert [a["value"]["name"] for a in rec["args"][len(kinds) - n_out:len(kinds)]] == list(outs), (sm, name)


def test_grid_formulas_match_the_host_wrappers(built):
    from samba_edge.plugins import triton_scan, triton_swa

    kdir, index, _ = built
    recs = {name: rec for sm, name, rec in _records(kdir, index) if sm == "sm_90"}
    for b, E, T in [(1, 3072, 1), (2, 70, 37), (3, 31, 256)]:
        shapes = {"u": (b, E, T)}
        assert aot.eval_grid(recs["selective_scan"], shapes) == triton_scan.grid(E, b)
        assert aot.eval_grid(recs["selective_scan_qdp"], shapes) == triton_scan.grid(E, b)
    for b, H, G, T, C in [(1, 12, 12, 1, 2047), (2, 4, 2, 37, 7), (3, 4, 1, 256, 63)]:
        shapes = {"q": (b, H, T, 128), "k": (b, G, T, 128), "k_window": (b, G, C, 128)}
        assert aot.eval_grid(recs["swa_attention"], shapes) == triton_swa.fwd_grid(T, b, H)
        assert aot.eval_grid(recs["swa_window_update"], shapes) == triton_swa.update_grid(C, b, G)
        assert aot.eval_grid(recs["swa_qdp"], shapes) == triton_swa.qdp_grid(T, C, b, H)


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="no ptxas on PATH")
def test_ptxas_assembles_the_ptx(built):
    kdir, index, _ = built
    for sm, name, rec in _records(kdir, index):
        ptx = kdir / rec["files"]["ptx"]
        p = subprocess.run(["ptxas", f"-arch={rec['ptx_target']}", str(ptx), "-o", os.devnull],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (sm, name, p.stderr[-2000:])


def _cubin_sm(data: bytes) -> int:
    """The SM a cubin was assembled for, from its ELF header: EM_CUDA (190); e_flags holds the SM in
    bits 0-7 up to ELF ABI version 7 and in bits 8-15 from version 8 on (CUDA's sm_100+ cubins)."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and struct.unpack_from("<H", data, 18)[0] == 190
    flags = struct.unpack_from("<I", data, 48)[0]
    return (flags >> 8) & 0xFF if data[8] >= 8 else flags & 0xFF


def test_every_arch_has_its_cubins(built):
    """The common x86 GPUs (T4, A100, A10 / RTX 30, L4 / RTX 40) get exact cubins for every kernel, like
    the others; each cubin is for its arch; "a" (arch-specific) PTX targets only from sm_90 on."""
    kdir, index, _ = built
    assert set(f"sm_{a}" for a in COMMON_X86) <= set(index["archs"])
    for sm, entry in index["archs"].items():
        a = int(sm[3:])
        assert entry["arch"] == a and entry["arch_specific"] is (a >= 90), sm
        assert entry["ptx_target"] == sm + ("a" if a >= 90 else "") and entry["ptx_version"] == PTX_VERSION[a]
        assert sorted(entry["kernels"]) == KERNELS, sm
        for name, k in entry["kernels"].items():
            assert _cubin_sm((kdir / k["files"]["cubin"]).read_bytes()) == a, (sm, name)


def test_portable_ptx_is_generic_and_old_enough(built, tmp_path):
    """index["portable_ptx"] names the lowest arch, whose PTX has a non-"a" target and an ISA <= 8.5, so
    that any newer GPU's driver, JetPack 6's CUDA 12.6 one included (ISA <= 8.5), can JIT it."""
    kdir, index, _ = built
    assert index["portable_ptx"] == PORTABLE == aot.ARCHS[aot.PORTABLE_PTX_ARCH].sm
    assert int(PORTABLE[3:]) == min(int(sm[3:]) for sm in index["archs"])
    entry = index["archs"][index["portable_ptx"]]
    assert entry["arch_specific"] is False and sorted(entry["kernels"]) == KERNELS
    for name in KERNELS:                                  # the launcher's lookup, verbatim
        ptx = (kdir / index["archs"][index["portable_ptx"]]["kernels"][name]["files"]["ptx"]).read_text()
        targets = re.findall(r"^\.target\s+(\S+)\s*$", ptx, re.M)
        assert targets == [PORTABLE] and not targets[0].endswith("a"), (name, targets)
        versions = re.findall(r"^\.version\s+(\d+)\.(\d+)\s*$", ptx, re.M)
        assert len(versions) == 1 and tuple(map(int, versions[0])) <= (8, 5), (name, versions)
    # an index without the portable arch says so (the launcher then has no last resort)
    assert aot.write_kernels(tmp_path, get_config("Samba_421M"), archs=[90])["portable_ptx"] is None


def test_ptxas_assembles_the_portable_ptx_for_newer_archs(built, tmp_path):
    """CPU-side proof that a newer GPU's driver can JIT the portable PTX: ptxas (Triton's bundled ones)
    assembles the sm_75 PTX for sm_87 (Orin), sm_90, sm_100, sm_110 (Thor), sm_120 and sm_121 (GB10)."""
    kdir, index, _ = built
    entry = index["archs"][index["portable_ptx"]]
    for kind, targets in JIT_ONTO.items():
        tool = aot._ptxas(kind)
        for name, k in entry["kernels"].items():
            for target in targets:
                out = tmp_path / f"{name}-{target}.cubin"
                p = subprocess.run([tool.path, f"-arch={target}", str(kdir / k["files"]["ptx"]), "-o", str(out)],
                                   capture_output=True, text=True, timeout=300)
                assert p.returncode == 0, (kind, name, target, p.stderr[-2000:])
                assert _cubin_sm(out.read_bytes()) == int(target[3:]), (kind, name, target)


@pytest.mark.parametrize("cfg", [{"d_state": 16, "head_size": 128}, {"d_state": 8, "head_size": 8}],
                         ids=["421M", "head8"])
def test_fp16_attention_compiles_for_the_portable_arch(cache, tmp_path, cfg):
    """fp16 exports compile the attention kernels for fp16 q/k/v/y: the portable PTX exists for them too,
    at small head sizes as well (where Triton selects ldmatrix: ISA 6.3 made LLVM abort the process)."""
    index = aot.write_kernels(tmp_path, cfg, archs=[aot.PORTABLE_PTX_ARCH], strict=True, dtype="fp16")
    assert not index["errors"] and index["attention_dtype"] == "fp16" and index["portable_ptx"] == PORTABLE
    kdir = tmp_path / "kernels"
    for name, k in index["archs"][PORTABLE]["kernels"].items():
        ptx = (kdir / k["files"]["ptx"]).read_text()
        assert re.search(rf"^\.target {PORTABLE}\s*$", ptx, re.M) and re.search(r"^\.version 6\.5\s*$", ptx, re.M)
        assert _cubin_sm((kdir / k["files"]["cubin"]).read_bytes()) == aot.PORTABLE_PTX_ARCH, name
    meta = json.loads((kdir / index["archs"][PORTABLE]["kernels"]["swa_attention"]["files"]["meta"]).read_text())
    assert meta["args"][0]["type"] == "*fp16"


def test_fp16_attention_needs_no_shared_memory_opt_in(cache, tmp_path):
    """One pipeline stage for fp16 q/k/v keeps every arch under 48 KB of shared memory (the aot_impl route
    cannot opt in) and free of register spills (two stages: 72 KB, 255 registers, 328 B of stack on sm_80+)."""
    index = aot.write_kernels(tmp_path, get_config("Samba_421M"), archs=[80, 90], strict=True, dtype="fp16")
    for sm, name, rec in _records(tmp_path / "kernels", index):
        assert not rec["needs_shared_mem_opt_in"], (sm, name, rec["shared_mem_bytes"])
        if rec.get("resources"):
            assert rec["resources"]["stack_bytes"] <= 64, (sm, name, rec["resources"])      # 2 stages: 328


def test_ptx_versions_are_the_lowest_the_targets_allow(cache):
    """Each arch's ISA is at least what Triton's LLVM accepts for its target (one below would abort the
    process: compile_kernel refuses it with an error instead); the new archs use that minimum (sm_75: the
    minimum ldmatrix needs)."""
    for a in ARCHS:
        spec = aot.ARCHS[a]
        assert spec.ptx_version >= aot.MIN_PTX_VERSION[a] and f"{spec.ptx_version / 10:.1f}" == PTX_VERSION[a]
    for a in COMMON_X86:                           # sm_75: 6.5 for ldmatrix (test_fp16_attention_compiles_...)
        assert aot.ARCHS[a].ptx_version == (65 if a == 75 else aot.MIN_PTX_VERSION[a])
    scan = aot.kernel_specs({"d_state": 16, "head_size": 128})[0]
    with pytest.raises(RuntimeError, match="does not know sm_80"):
        aot.compile_kernel(scan, aot.ArchSpec(80, 63, "ptxas", "", ""))


def test_cache_hits_and_keys(built, cache, tmp_path):
    _, index, _ = built
    root = aot.cache_root()
    assert root == cache / "kernels"

    def entries():
        return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))

    before = entries()
    assert {f"{k}-sm_{a}" for k in ("selective_scan", "swa_attention", "swa_window_update") for a in ARCHS} \
        <= {e.rsplit("-", 1)[0] for e in before}
    t0 = time.perf_counter()
    again = aot.write_kernels(tmp_path / "again", get_config("Samba_421M"))
    assert time.perf_counter() - t0 < 5.0                                  # nothing recompiled
    assert again == index
    assert entries() == before
    # a different head size (a compile-time constant) is a different key; shapes are not
    spec = {s.name: s for s in aot.kernel_specs({"d_state": 16, "head_size": 64})}["swa_attention"]
    spec128 = {s.name: s for s in aot.kernel_specs({"d_state": 16, "head_size": 128})}["swa_attention"]
    arch = aot.ARCHS[90]
    assert aot._cache_key(spec, arch, "12.9") != aot._cache_key(spec128, arch, "12.9")
    assert aot._cache_key(spec128, arch, "12.9") != aot._cache_key(spec128, aot.ARCHS[87], "12.9")


class _FakeDriver:
    """Just enough of cuda.bindings.driver to run plugins/trt_launch.py on CPU and capture the launches."""

    class CUdevice_attribute:
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = "major"
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = "minor"

    class CUfunction_attribute:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    def __init__(self):
        self.launches, self.images = [], []

    def cuCtxGetCurrent(self):
        return 0, 1234

    def cuCtxGetDevice(self):
        return 0, 0

    def cuDeviceGetAttribute(self, attr, dev):
        return 0, {"major": 9, "minor": 0}[attr]                 # an H100/H200: sm_90

    def cuModuleLoadData(self, data):
        self.images.append(data)
        return 0, "module"

    def cuModuleGetFunction(self, mod, name):
        return 0, name

    def cuFuncSetAttribute(self, *a):
        return (0,)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        values, types = params                                   # cuda-python's (values, ctypes) form
        self.launches.append({"f": f, "grid": (gx, gy, gz), "block": (bx, by, bz), "shared": shared,
                              "values": list(values), "types": list(types), "stream": stream, "extra": extra})
        return (0,)


@pytest.mark.parametrize("route", ["python", "aot_impl"])
def test_launcher_passes_the_plugin_parameters(built, monkeypatch, route):
    """plugins/trt_launch.py (what the TensorRT plugins' enqueue and tools/gpu_check.py call) launches
    each kernel of the op with the grid, block, shared memory and parameters its metadata prescribes."""
    from samba_edge.plugins import trt_launch

    kdir, index, _ = built
    fake = _FakeDriver()
    monkeypatch.setattr(trt_launch, "_driver", lambda: fake)
    kernels = trt_launch.KernelSet.open(kdir)
    swa = trt_launch.Launcher(kernels, "SlidingWindowAttention", route)
    scan = trt_launch.Launcher(kernels, "SelectiveScan", route)
    b, H, G, T, hs, W = 2, 12, 4, 37, 128, 2048
    ins, outs = [1024 * (i + 1) for i in range(6)], [1024 * (i + 10) for i in range(3)]
    trt_launch.launch_sliding_window_attention(swa, ins, outs, batch=b, num_heads=H, num_kv_heads=G, seq=T,
                                               head_size=hs, window_rows=W - 1, window=W, scale=0.125,
                                               half=False, stream=7)
    trt_launch.launch_selective_scan(scan, ins[:1] * 9, outs[:2], batch=b, d_inner=3072, d_state=16, seq=T,
                                     delta_softplus=1, stream=7)
    assert all(x.endswith("cubin sm_90") for x in swa.loaded + scan.loaded)
    assert fake.images and all(im[:4] == b"\x7fELF" for im in fake.images)     # sm_90's cubins, not PTX
    if route == "python":
        attn, upd, scan = fake.launches
        assert attn["f"] == b"swa_fwd_kernel" and attn["grid"] == (3, b * H, 1)
        assert attn["values"] == ins + outs[:1] + [H, G, T, W, W - 1, 0.125, 0, 0]
        assert upd["f"] == b"swa_window_update_kernel" and upd["grid"] == (-(-(W - 1) // 32), b * G, 1)
        assert upd["values"] == ins[1:5] + outs[1:] + [T, W - 1, 0, 0]
    else:
        attn, scan = fake.launches
        assert attn["f"] == b"swa_qdp_kernel" and attn["grid"] == (3 + -(-(W - 1) // 32), b * H, 1)
        assert attn["values"] == ins + [H, G, T, W, W - 1, b * G] + outs + [0, 0]
    assert scan["f"] == (b"selective_scan_fwd_kernel" if route == "python" else b"selective_scan_qdp_kernel")
    assert scan["grid"] == (3072 // 32, b, 1)
    io = (ins[:1] * 9, outs[:2])
    assert scan["values"] == (io[0] + io[1] + [3072, T, 0, 0] if route == "python" else io[0] + [3072, T] + io[1] + [0, 0])
    for launch in fake.launches:
        rec_name = {v["entry"]: k for k, v in index["archs"]["sm_90"]["kernels"].items()}[launch["f"].decode()]
        rec = json.loads((kdir / index["archs"]["sm_90"]["kernels"][rec_name]["files"]["meta"]).read_text())
        assert launch["block"] == (rec["num_warps"] * 32, 1, 1) and launch["shared"] == rec["shared_mem_bytes"]
        assert launch["stream"] == 7 and launch["extra"] == 0
        assert len(launch["types"]) == len(rec["args"])


def test_export_ships_kernels(cache, tmp_path, monkeypatch):
    """The plugin flavour's manifest points at kernels/kernels.json with every arch by default (the test
    suite's conftest restricts exports elsewhere); --kernel-archs picks some, and bad lists are refused."""
    pytest.importorskip("onnx")
    monkeypatch.delenv("SAMBA_EDGE_KERNEL_ARCHS", raising=False)
    from samba_edge.export.onnx_export import export_onnx
    from samba_edge.runtime.manifest import Manifest

    art = export_onnx("builtin:samba-tiny-py", tmp_path / "plugin", flavor="plugin", max_chunk=8)
    m = Manifest.load(art)
    assert m.kernels == "kernels/kernels.json"
    index = json.loads((art / m.kernels).read_text())
    cfg = json.loads((REPO / "export" / "builtin" / "samba-tiny-py" / "config.json").read_text())
    assert index["model"] == {"d_state": cfg["d_state"], "head_size": cfg["head_size"]}
    assert not index["errors"] and sorted(index["archs"]) == sorted(f"sm_{a}" for a in ARCHS)
    # older manifests (no "kernels" field) still load
    d = json.loads((art / "manifest.json").read_text())
    del d["kernels"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(d))
    assert Manifest.load(tmp_path / "old").kernels is None
    some = export_onnx("builtin:samba-tiny-py", tmp_path / "orin", flavor="plugin", max_chunk=8, kernel_archs="sm_87")
    assert sorted(json.loads((some / m.kernels).read_text())["archs"]) == ["sm_87"]
    from samba_edge.plugins.errors import SambaEdgeError

    for bad in ("86,91", "ampere", ","):
        with pytest.raises(SambaEdgeError, match="comma-separated list of 75, 80"):
            export_onnx("builtin:samba-tiny-py", tmp_path / "bad", flavor="plugin", kernel_archs=bad)
    with pytest.raises(SambaEdgeError, match="plugin flavour"):
        export_onnx("builtin:samba-tiny-py", tmp_path / "bad", flavor="portable", kernel_archs="87")
    assert not (tmp_path / "bad").exists()


def test_gpu_check_without_gpu_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", os.devnull],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, (p.stdout, p.stderr)        # tools/gpu_check.py: an alias of gpu_first_run
    assert p.stderr.startswith("error: no CUDA GPU here (") and len(p.stderr.splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_aot_impl_launch_mapping(built):
    """plugins/trt_qdp.py turns a record into TensorRT's launch description. With integer 'shape
    expressions' it must give the grid the wrappers use and the kernel's int32 arguments in order."""
    from types import SimpleNamespace

    from samba_edge.plugins import triton_scan, triton_swa
    from samba_edge.plugins.trt_qdp import _launch

    fake = SimpleNamespace(cdiv=lambda a, b: -(-a // b), KernelLaunchParams=SimpleNamespace, SymInt32=int,
                           SymIntExprs=SimpleNamespace(from_tuple=tuple))
    kdir, index, _ = built
    recs = {name: rec for sm, name, rec in _records(kdir, index) if sm == "sm_87"}
    b, E, T, N = 2, 3072, 37, 16
    desc = {"u": SimpleNamespace(shape_expr=(b, E, T)), "ssm_state": SimpleNamespace(shape_expr=(b, E, N))}
    name, ptx, lp, extra = _launch(fake, recs["selective_scan_qdp"], b"ptx", desc, {})
    assert name == "selective_scan_qdp_kernel" and extra == (E, T)
    assert (lp.grid_x, lp.grid_y, lp.grid_z) == triton_scan.grid(E, b) and lp.block_x == 32 * triton_scan.NUM_WARPS
    H, G, hs, C, W = 12, 2, 128, 2047, 2048
    desc = {"q": SimpleNamespace(shape_expr=(b, H, T, hs)), "k": SimpleNamespace(shape_expr=(b, G, T, hs)),
            "k_window": SimpleNamespace(shape_expr=(b, G, C, hs))}
    name, ptx, lp, extra = _launch(fake, recs["swa_qdp"], b"ptx", desc, {"window": W})
    assert extra == (H, G, T, W, C, b * G)                          # H, G, T, W, C, BG: the kernel's order
    assert (lp.grid_x, lp.grid_y, lp.grid_z) == triton_swa.qdp_grid(T, C, b, H)
    assert lp.shared_mem == recs["swa_qdp"]["shared_mem_bytes"]


def test_aot_impl_kernels_are_chosen_per_node_and_arch(built, tmp_path):
    """The aot_impl route embeds the PTX of the kernel set its node names (by key), for the building GPU:
    the arch's own PTX, else the portable one; a kernel needing a shared-memory opt-in is refused with
    the fix (build checks this before TensorRT runs)."""
    from samba_edge.plugins.trt_launch import KernelSet
    from samba_edge.plugins.trt_qdp import aot_kernel
    from samba_edge.runtime.errors import SambaEdgeError

    kdir, index, _ = built
    ks = KernelSet.open(kdir.parent)
    for sm, want in (("sm_90", "sm_90"), ("sm_86", "sm_86"), ("sm_121", PORTABLE)):
        rec, ptx = aot_kernel(ks.key, "SelectiveScan", sm)
        assert rec["arch"] == want and rec["entry"] == "selective_scan_qdp_kernel"
        assert ptx == (kdir / rec["files"]["ptx"]).read_bytes()          # the PTX itself, no NUL appended
    fat = json.loads((kdir / rec["files"]["meta"]).read_text())
    (tmp_path / "kernels").mkdir()
    for f in kdir.rglob("*"):                                          # a copy whose attention kernel is too big
        dst = tmp_path / "kernels" / f.relative_to(kdir)
        if f.is_dir():
            dst.mkdir(exist_ok=True)
        else:
            rec_ = json.loads(f.read_text()) if f.suffix == ".json" and f.name != "kernels.json" else None
            if rec_ and rec_.get("kernel") == "swa_qdp":
                rec_.update(needs_shared_mem_opt_in=True, shared_mem_bytes=73728)
                dst.write_text(json.dumps(rec_))
            else:
                dst.write_bytes(f.read_bytes())
    big = KernelSet.open(tmp_path)
    assert big.key != ks.key and fat["kernel"] == "selective_scan_qdp"
    with pytest.raises(SambaEdgeError, match="plugin-route python"):
        aot_kernel(big.key, "SlidingWindowAttention", "sm_90")
