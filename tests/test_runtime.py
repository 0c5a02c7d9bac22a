"""The streaming runtime: exact across calls, snapshots across processes and backends, many streams."""
import json
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from samba_edge.runtime import SamplingParams, SambaEdgeError, open_model  # noqa: E402
from samba_edge.runtime.session import IncrementalDecoder  # noqa: E402
from samba_edge.tests.test_cli import run  # noqa: E402

CK = "builtin:samba-tiny-py"
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module")
def artifact(tiny_export):
    return tiny_export("portable")


@pytest.fixture(scope="module")
def ort_model(artifact):
    return open_model(str(artifact))


@pytest.fixture(scope="module")
def ring_model(tiny_export):
    """The plugin flavour on ONNX Runtime: its bodies keep the attention windows as rings, updated in place."""
    return open_model(str(tiny_export("plugin")))


@pytest.fixture(scope="module")
def torch_model():
    return open_model(CK, backend="torch")


def test_one_call_many_calls_token_by_token(ort_model):
    ids = [0] + ort_model.encode(PROMPT * 6)                                  # > max_chunk: split inside feed
    assert len(ids) > ort_model.max_chunk
    a = ort_model.new_stream()
    whole = a.feed(ids)
    b = ort_model.new_stream()
    for i in range(0, len(ids), 7):
        part = b.feed(ids[i:i + 7])
    c = ort_model.new_stream()
    for t in ids:
        step = c.feed([t])
    assert a.position == b.position == c.position == len(ids)
    assert np.abs(part - whole).max() < 1e-4 and np.abs(step - whole).max() < 1e-4
    for x, y in zip(a.state, c.state):
        assert np.abs(x - y).max() < 1e-4


def test_ort_and_torch_give_the_same_greedy_continuation(ort_model, torch_model):
    p = SamplingParams(max_new_tokens=40)
    outs = []
    for m in (ort_model, torch_model):
        s = m.new_stream()
        s.feed_text(PROMPT)
        outs.append(list(s.generate_ids(p)))
    assert outs[0] == outs[1] and len(outs[0]) == 40


RESTORE = """
import json, sys
from samba_edge.runtime import open_model, SamplingParams
m = open_model(sys.argv[1], backend=sys.argv[2])
s = m.restore(sys.argv[3])
print(json.dumps(list(s.generate_ids(SamplingParams(max_new_tokens=int(sys.argv[4]), temperature=float(sys.argv[5]),
                                                    top_k=20, top_p=0.9)))))
"""


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("flavor", ["portable", "plugin"])
def test_generate_n_equals_k_then_snapshot_restore_in_new_process(ort_model, ring_model, artifact, tmp_path,
                                                                   temperature, flavor):
    """A snapshot from either (the plugin's ring windows are stored in the manifest's layout) continues
    exactly in another process, on the portable artifact and on PyTorch."""
    N, k = 30, 11
    p = dict(temperature=temperature, top_k=20, top_p=0.9)
    ort_model = ring_model if flavor == "plugin" else ort_model
    full = ort_model.new_stream()
    full.feed_text(PROMPT)
    want = list(full.generate_ids(SamplingParams(max_new_tokens=N, seed=7, **p)))
    part = ort_model.new_stream()
    part.feed_text(PROMPT)
    got = list(part.generate_ids(SamplingParams(max_new_tokens=k, seed=7, **p)))
    part.snapshot(tmp_path / "snap.safetensors")
    for backend, where in (("ort", str(artifact)), ("ort", str(ring_model.backend.directory)), ("torch", CK)):
        r = subprocess.run([sys.executable, "-c", RESTORE, where, backend, str(tmp_path / "snap.safetensors"),
                            str(N - k), str(temperature)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert got + json.loads(r.stdout) == want, backend


@pytest.mark.parametrize("flavor", ["portable", "plugin"])
def test_batched_step_equals_solo_streams(ort_model, ring_model, flavor):
    ort_model = ring_model if flavor == "plugin" else ort_model
    prompts = [PROMPT, "import os\n", "class A:\n    pass\n"]
    solo, batch = [], []
    for text in prompts:
        s = ort_model.new_stream()
        s.feed_text(text)
        solo.append(s)
        b = ort_model.new_stream()
        b.feed_text(text)
        batch.append(b)
    greedy = SamplingParams(max_new_tokens=12)
    want = [list(s.generate_ids(greedy)) for s in solo]
    got = [[] for _ in prompts]
    for _ in range(12):
        toks = [[int(np.argmax(b.last_logits))] for b in batch]
        ort_model.step(batch, toks)                                            # rows at different positions
        for g, t in zip(got, toks):
            g.append(t[0])
    assert got == want


@pytest.mark.parametrize("flavor", ["portable", "plugin"])
def test_batched_steps_in_changing_groups_equal_solo_streams(ort_model, ring_model, flavor):
    """A batch stepped again feeds its last output state without stacking; a stream fed alone in between,
    a reordered group, a subset and a stream restored from a snapshot all still equal solo streams."""
    import tempfile

    model = ring_model if flavor == "plugin" else ort_model
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    solo = [model.new_stream() for _ in prompts]
    batch = [model.new_stream() for _ in prompts]
    for s, b, p in zip(solo, batch, prompts):
        s.feed(p)
        b.feed(p)
    plan = [(0, 1, 2), (0, 1, 2), "feed 1", (0, 1, 2), (2, 0, 1), (2, 0), (0, 2), "snapshot 0", (0, 1, 2), (0, 1, 2)]
    for k, step in enumerate(plan):
        if step == "feed 1":
            for x in (solo[1], batch[1]):
                x.feed([11, 12])
            continue
        if step == "snapshot 0":
            with tempfile.TemporaryDirectory() as d:
                batch[0].snapshot(f"{d}/s.safetensors")
                batch[0] = model.restore(f"{d}/s.safetensors")
            continue
        toks = [[int(np.argmax(solo[i].last_logits))] for i in step]
        for i, t in zip(step, toks):
            solo[i].feed(t)
        out = model.step([batch[i] for i in step], toks)
        for i, lg in zip(step, out):
            np.testing.assert_allclose(lg, solo[i].last_logits, rtol=1e-5, atol=1e-5, err_msg=f"step {k}")
    assert [b.position for b in batch] == [s.position for s in solo]


def test_threads_share_one_model(ort_model):
    prompts = ["import sys\n", "def g(x):\n", "for i in range(3):\n", "class B(A):\n"]

    def gen(text):
        s = ort_model.new_stream()
        s.feed_text(text)
        return list(s.generate_ids(SamplingParams(max_new_tokens=15)))

    want = [gen(t) for t in prompts]
    got = [None] * len(prompts)

    def worker(i):
        got[i] = gen(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_snapshot_refusals(ort_model, tmp_path):
    s = ort_model.new_stream()
    s.feed_text(PROMPT)
    path = s.snapshot(tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SambaEdgeError, match="unreadable|truncated"):
        ort_model.restore(tmp_path / "cut.safetensors")
    tampered = bytearray(data)
    tampered[-5] ^= 0xFF                                                      # flip bits inside a tensor
    (tmp_path / "bad.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(SambaEdgeError, match="checksum"):
        ort_model.restore(tmp_path / "bad.safetensors")
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "format_version": "9"})
    with pytest.raises(SambaEdgeError, match="format version"):
        ort_model.restore(tmp_path / "v9.safetensors")
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**meta, "fingerprint": "0" * 64})
    with pytest.raises(SambaEdgeError, match="another model"):
        ort_model.restore(tmp_path / "other.safetensors")


def test_incremental_decoder_never_breaks_utf8(ort_model):
    tok = ort_model.tokenizer
    text = "naïve café → 日本語 😀 done\n"
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_and_max_tokens(ort_model):
    s = ort_model.new_stream()
    text = "".join(s.generate_text("def f(x):\n", SamplingParams(max_new_tokens=60, stop=("\n",))))
    assert "\n" not in text
    with pytest.raises(SambaEdgeError):
        SamplingParams(max_new_tokens=10**9)


def test_runtime_and_generate_import_no_torch(artifact):
    code = ("import sys; import samba_edge.runtime; from samba_edge.tools.cli import main\n"
            f"try:\n    main(['generate', {str(artifact)!r}, '-p', 'import os', '-n', '5'])\nexcept SystemExit: pass\n"
            "bad = [m for m in ('torch',) if m in sys.modules]\nprint('TORCH' if bad else 'CLEAN')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip().endswith("CLEAN"), r.stdout + r.stderr


def test_cli_bad_input_exit_2_and_state_out_kept(capsys, artifact, tmp_path):
    keep = tmp_path / "keep.safetensors"
    keep.write_bytes(b"old snapshot")
    other = tmp_path / "other.safetensors"
    m = open_model(str(artifact))
    s = m.new_stream()
    s.feed([1, 2, 3])
    s.snapshot(other)
    raw = tmp_path / "latin1.txt"
    raw.write_bytes("café".encode("latin-1"))
    cases = [
        (["generate", str(artifact), "-p", ""], "prompt is empty"),
        (["generate", str(artifact), "-p", "x", "-n", "-1"], "--max-new-tokens"),
        (["generate", str(artifact), "-p", "x", "-n", "99999999999"], "--max-new-tokens"),
        (["generate", str(artifact), "--prompt-file", str(raw)], "not UTF-8"),
        (["generate", str(tmp_path), "-p", "x", "--backend", "ort"], "carries no config|not found"),
        (["generate", str(artifact), "-p", "x", "--stop-id", "999999", "--state-out", str(keep),
          "--state-in", str(tmp_path / "missing.safetensors")], "not found"),
    ]
    for args, match in cases:
        code, _, err = run(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert re.search(match, err), (match, err)
    assert keep.read_bytes() == b"old snapshot"
    s.feed([m.vocab_size - 1])
    with pytest.raises(SambaEdgeError, match="outside the vocabulary"):
        s.feed([m.vocab_size])
    (tmp_path / "model.onnx").write_bytes(b"")
    code, _, err = run(capsys, "generate", str(tmp_path), "-p", "x")
    assert code == 2 and "no manifest.json" in err
    (tmp_path / "manifest.json").write_text("{}")
    code, _, err = run(capsys, "generate", str(tmp_path), "-p", "x")
    assert code == 2 and "format_version" in err


def test_chat_keeps_one_stream_across_turns(artifact, tmp_path):
    from samba_edge.tools.generate import chat

    out = []
    turns = chat(str(artifact), SamplingParams(max_new_tokens=8, stop=("\n\n",)), lines=["import os\n", "def f():\n"],
                 state_out=str(tmp_path / "chat.safetensors"), write=out.append)
    assert turns == 2 and "".join(out).strip()
    m = open_model(str(artifact))
    s = m.restore(tmp_path / "chat.safetensors")
    assert s.position > len(m.encode("import os\ndef f():\n"))             # both turns and both replies


def test_chat_on_a_terminal_has_a_banner_and_prompts(artifact, capsys):
    from samba_edge.tools.generate import chat

    out = []
    chat(str(artifact), SamplingParams(max_new_tokens=4), lines=["import os\n", "\n", "x = 1\n"], write=out.append,
         interactive=True)
    err = capsys.readouterr().err
    assert err.startswith(f"samba-edge chat: {artifact} (ort backend, position 0); one line per turn, Ctrl-D")
    assert err.count("> ") == 4 and "> " not in "".join(out)           # prompts on stderr: once per line + first
    chat(str(artifact), SamplingParams(max_new_tokens=4), lines=["import os\n"], write=out.append)
    assert capsys.readouterr().err == ""                                 # piped: replies only


class _Opaque:
    """A state the session cannot index or concatenate (as TensorRT's device buffers)."""

    def __init__(self, arrays):
        self._arrays = arrays


class OpaqueStateBackend:
    """ONNX Runtime behind the state protocol with an opaque state: proves that streams, batched steps
    and snapshots go through new_state/stack_states/split_state/state_to_host/state_from_host only,
    the seam the TensorRT backend's device-resident state plugs into."""

    name = "opaque"

    def __init__(self, inner) -> None:
        self.inner, self.manifest, self.directory = inner, inner.manifest, inner.directory
        self.calls = {"stack": 0, "split": 0, "to_host": 0, "from_host": 0}

    def new_state(self, batch):
        return _Opaque(self.inner.new_state(batch))

    def stack_states(self, states):
        self.calls["stack"] += 1
        return _Opaque(self.inner.stack_states([s._arrays for s in states]))

    def split_state(self, state, batch):
        self.calls["split"] += 1
        return [_Opaque(x) for x in self.inner.split_state(state._arrays, batch)]

    def state_to_host(self, state, position=None):
        self.calls["to_host"] += 1
        return self.inner.state_to_host(state._arrays, position)

    def state_from_host(self, arrays, position=None):
        self.calls["from_host"] += 1
        return _Opaque(self.inner.state_from_host(arrays, position))

    def run(self, ids, pos, state):
        assert isinstance(state, _Opaque)
        logits, new = self.inner.run(ids, pos, state._arrays)
        return logits, _Opaque(new)


def test_streams_use_only_the_state_protocol(ort_model, tmp_path):
    from samba_edge.runtime.session import Model

    be = OpaqueStateBackend(ort_model.backend)
    m = Model(be, ort_model.tokenizer)
    greedy = SamplingParams(max_new_tokens=10)
    a, ref = m.new_stream(), ort_model.new_stream()
    a.feed_text(PROMPT)
    ref.feed_text(PROMPT)
    assert list(a.generate_ids(greedy)) == list(ref.generate_ids(greedy))
    a.snapshot(tmp_path / "s.safetensors")
    b = m.restore(tmp_path / "s.safetensors")
    c = ort_model.restore(tmp_path / "s.safetensors")           # opaque -> plain numpy backend
    m.step([a, b], [[5], [5]])
    c.feed([5])
    np.testing.assert_allclose(b.last_logits, c.last_logits, atol=1e-5)
    np.testing.assert_allclose(a.last_logits, c.last_logits, atol=1e-5)
    assert be.calls == {"stack": 1, "split": 1, "to_host": 1, "from_host": 1}


@pytest.mark.slow                      # a cold export (~15 s)
def test_first_export_says_what_it_does_on_a_terminal(tmp_path, monkeypatch, capsys):
    """`generate builtin:... --backend ort` exports once (~30 s on 2 cores): on a terminal it says so first."""
    import sys

    from samba_edge.runtime.session import cached_export

    monkeypatch.setenv("SAMBA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    out = cached_export(CK)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"exporting {CK} to ONNX once (cached in {out}) ..." and err[-1].startswith("exported in ")
    assert any(line.startswith("tracing ") for line in err[1:-1])               # the export's own stages
    assert cached_export(CK) == out and capsys.readouterr().err == ""           # cached: silent


def test_auto_runs_a_checkpoint_with_onnx_runtime_when_installed(monkeypatch, warm_cache):
    """The fast path is the default: auto takes the cached ONNX export of a checkpoint where onnxruntime
    is installed (PyTorch eager only when asked, or without onnxruntime)."""
    import importlib.util

    monkeypatch.setenv("SAMBA_EDGE_CACHE", str(warm_cache))
    assert open_model(CK).backend.name == "ort"
    assert open_model(CK, "torch").backend.name == "torch"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert open_model(CK).backend.name == "torch"


def test_progress_shows_only_on_a_terminal_and_not_with_quiet(monkeypatch, capsys):
    import sys

    from samba_edge.runtime.progress import progress, stage

    assert list(progress(range(3), "x")) == [0, 1, 2] and capsys.readouterr().err == ""      # not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with stage("tracing"):
        pass
    assert list(progress(range(3), "scoring", unit="doc")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.startswith("tracing ...\ntracing: done in ") and "scoring" in err
    monkeypatch.setenv("SAMBA_EDGE_QUIET", "1")                                              # samba-edge --quiet
    with stage("tracing"):
        list(progress(range(3), "scoring"))
    assert capsys.readouterr().err == ""
