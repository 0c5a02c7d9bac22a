"""`samba-edge eval`: next-token NLL, perplexity and bits per byte through the streaming path.

Tokens are fed in chunks of N with the recurrent state carried between calls, exactly as a
deployment runs the model, so eval also checks the chunked path on real text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError


def stream_nll(backend, ids: np.ndarray, chunk: Optional[int] = None) -> np.ndarray:
    """NLL (nats) of ids[1:] given their prefixes, feeding chunks of `chunk` tokens (default: all),
    with the backend's state carried between calls."""
    ids = np.asarray(ids, dtype=np.int64)
    L = len(ids)
    chunk = chunk or L
    state = backend.manifest.empty_state(1)
    out = []
    for p in range(0, L - 1, chunk):
        piece = ids[p:min(p + chunk, L - 1)]                                   # the last token is only a target
        logits, state = backend.run(piece[None], np.array([p]), state)
        z = logits[0].astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        tgt = ids[p + 1:p + 1 + len(piece)]
        out.append(-logp[np.arange(len(piece)), tgt])
    return np.concatenate(out) if out else np.zeros(0)


def _summary(nll_sum: float, n: int, n_bytes: Optional[int]) -> dict:
    res = {"tokens": n, "nll": nll_sum / n, "ppl": math.exp(nll_sum / n)}
    if n_bytes:
        res["bits_per_byte"] = nll_sum / math.log(2) / n_bytes
    return res


def score_documents(backend, tokenizer, docs: Sequence[str], chunk: Optional[int] = None) -> dict:
    """Each document from an empty state, preceded by the document-start token, so every byte is scored."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    nll_sum, n, n_bytes = 0.0, 0, 0
    for text in docs:
        ids = tokenizer.encode(text)
        if start is not None:
            ids = [start] + ids
            n_bytes += len(text.encode("utf-8"))
        else:                                                                # first token is context only
            n_bytes += len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
        if len(ids) < 2:
            continue
        nll = stream_nll(backend, np.asarray(ids), chunk)
        nll_sum += float(nll.sum())
        n += len(nll)
    if n == 0:
        raise SambaEdgeError("nothing to score: the text is empty or a single token; give a longer text")
    return _summary(nll_sum, n, n_bytes)


def check_token_ids(ids: np.ndarray, vocab: int, source: str) -> np.ndarray:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SambaEdgeError(f"{source}: expected a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
    if ids.size < 2:
        raise SambaEdgeError(f"{source}: need at least 2 token ids to score a next-token prediction")
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise SambaEdgeError(f"{source}: token id {int(bad[0])} is outside the vocabulary [0, {vocab}); "
                             "were these ids made with another tokenizer?")
    return ids.astype(np.int64)


def load_token_ids(path: str | Path, vocab: int) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)                               # never unpickle
    except FileNotFoundError:
        raise SambaEdgeError(f"token-id file {path} not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise SambaEdgeError(f"{path} is not a readable .npy array of token ids ({e})") from None
    return check_token_ids(ids, vocab, str(path))


def evaluate(checkpoint: str, text: Optional[str] = None, token_ids: Optional[str] = None,
             config: Optional[str] = None, chunk: Optional[int] = None, tokenizer: Optional[str] = None,
             backend: str = "auto") -> dict:
    """Public entry of `samba-edge eval`: a checkpoint (torch) or an exported artifact (ort); `--backend ort`
    on a checkpoint scores its cached export."""
    from samba_edge.runtime.tokenizer import load_tokenizer

    if (text is None) == (token_ids is None):
        raise SambaEdgeError("give exactly one of --text FILE or --token-ids FILE.npy")
    if chunk is not None and chunk < 1:
        raise SambaEdgeError(f"--chunk must be a positive number of tokens, got {chunk}")
    if text is not None:
        try:
            body = Path(text).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SambaEdgeError(f"text file {text} not found") from None
        except UnicodeDecodeError:
            raise SambaEdgeError(f"text file {text} is not UTF-8 text") from None
        if not body:
            raise SambaEdgeError(f"text file {text} is empty; nothing to evaluate")
    from samba_edge.runtime import open_model

    model = open_model(checkpoint, backend, tokenizer=tokenizer, config=config)
    be = model.backend
    if be.name != "torch":
        limit = be.manifest.max_chunk
        if chunk is not None and chunk > limit:
            raise SambaEdgeError(f"--chunk {chunk} exceeds the artifact's max chunk {limit}; use --chunk <= {limit}")
        chunk = chunk or limit
    if token_ids is not None:
        nll = stream_nll(be, load_token_ids(token_ids, be.manifest.vocab_size), chunk)
        return _summary(float(nll.sum()), len(nll), None)
    tok = model.tokenizer or load_tokenizer(be.directory, tokenizer)      # the latter explains what is missing
    return score_documents(be, tok, [body], chunk)
