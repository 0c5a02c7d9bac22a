"""`samba-edge eval`: next-token NLL, perplexity and bits per byte through the streaming path.

Tokens are fed in chunks of N with the recurrent state carried between calls, exactly as a
deployment runs the model, so eval also checks the chunked path on real text.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError


def stream_scores(backend, ids: np.ndarray, chunk: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """NLL (nats) of ids[1:] given their prefixes, and the model's top-1 prediction at each of those
    positions; chunks of `chunk` tokens (default: all), the backend's state carried between calls."""
    ids = np.asarray(ids, dtype=np.int64)
    L = len(ids)
    chunk = chunk or L
    state = backend.manifest.empty_state(1)
    out, top1 = [], []
    for p in range(0, L - 1, chunk):
        piece = ids[p:min(p + chunk, L - 1)]                                   # the last token is only a target
        logits, state = backend.run(piece[None], np.array([p]), state)
        z = logits[0].astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        tgt = ids[p + 1:p + 1 + len(piece)]
        out.append(-logp[np.arange(len(piece)), tgt])
        top1.append(logp.argmax(axis=-1))
    if not out:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(out), np.concatenate(top1)


def _summary(nll_sum: float, n: int, n_bytes: Optional[int], top1: Optional[np.ndarray] = None) -> dict:
    res = {"tokens": n, "nll": nll_sum / n, "ppl": math.exp(nll_sum / n)}
    if n_bytes:
        res["bits_per_byte"] = nll_sum / math.log(2) / n_bytes
    if top1 is not None:
        res["top1"] = top1                  # per-position predictions, for agreement; popped before printing
    return res


def document_ids(tokenizer, docs: Sequence[str]) -> tuple[list[np.ndarray], int]:
    """Token ids of each document, preceded by the document-start token so every byte is scored;
    returns them and the number of scored bytes."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    out, n_bytes = [], 0
    for text in docs:
        ids = tokenizer.encode(text)
        if start is not None:
            ids = [start] + ids
            n_bytes += len(text.encode("utf-8"))
        else:                                                                # first token is context only
            n_bytes += len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
        if len(ids) >= 2:
            out.append(np.asarray(ids, dtype=np.int64))
    return out, n_bytes


def score_ids(backend, docs: Sequence[np.ndarray], chunk: Optional[int], n_bytes: Optional[int]) -> dict:
    """Each id sequence from an empty state; summary incl. the per-position top-1 predictions."""
    from samba_edge.runtime.progress import progress

    scored = [stream_scores(backend, ids, chunk) for ids in progress(docs, "scoring", unit="doc")]
    nll, top1 = zip(*scored) if scored else ((), ())
    n = sum(len(x) for x in nll)
    if n == 0:
        raise SambaEdgeError("nothing to score: the text is empty or a single token; give a longer text")
    return _summary(float(sum(x.sum() for x in nll)), n, n_bytes, np.concatenate(top1))


def score_documents(backend, tokenizer, docs: Sequence[str], chunk: Optional[int] = None) -> dict:
    ids, n_bytes = document_ids(tokenizer, docs)
    res = score_ids(backend, ids, chunk, n_bytes)
    res.pop("top1")
    return res


def evaluate(checkpoint: str, text: Optional[str] = None, token_ids: Optional[str] = None,
             config: Optional[str] = None, chunk: Optional[int] = None, tokenizer: Optional[str] = None,
             backend: str = "auto", agree_with: Optional[str] = None, max_tokens: Optional[int] = None) -> dict:
    """Public entry of `samba-edge eval`: a checkpoint (torch) or an exported artifact (ort); `--backend ort`
    on a checkpoint scores its cached export. `agree_with` (a checkpoint or artifact, e.g. the fp32 export
    of a quantised one) adds `top1_agreement`: how often both predict the same next token.
    `max_tokens` scores only the first N tokens of the text."""
    from samba_edge.runtime.tokenizer import load_tokenizer
    from samba_edge.runtime.userio import load_token_ids, read_text_file

    if (text is None) == (token_ids is None):
        raise SambaEdgeError("give exactly one of --text FILE or --token-ids FILE.npy")
    if max_tokens is not None and max_tokens < 2:
        raise SambaEdgeError(f"--max-tokens must be >= 2, got {max_tokens}")
    if chunk is not None and chunk < 1:
        raise SambaEdgeError(f"--chunk must be a positive number of tokens, got {chunk}")
    if text is not None:
        body = read_text_file(text, "text file")
        if not body:
            raise SambaEdgeError(f"text file {text} is empty; nothing to evaluate")
    from samba_edge.runtime import open_model

    model = open_model(checkpoint, backend, tokenizer=tokenizer, config=config)
    ref = open_model(agree_with, tokenizer=tokenizer, config=config) if agree_with else None
    if ref is not None and ref.backend.manifest.vocab_size != model.backend.manifest.vocab_size:
        raise SambaEdgeError(f"--agree-with {agree_with} has another vocabulary "
                             f"({ref.backend.manifest.vocab_size} vs {model.backend.manifest.vocab_size})")
    chunk = _chunk_for(model.backend, chunk)
    if token_ids is not None:
        docs, n_bytes = [load_token_ids(token_ids, model.backend.manifest.vocab_size)], None
        if docs[0].size < 2:
            raise SambaEdgeError(f"{token_ids}: need at least 2 token ids to score a next-token prediction")
    else:
        tok = model.tokenizer or load_tokenizer(model.backend.directory, tokenizer)   # explains what is missing
        docs, n_bytes = document_ids(tok, [body])
    if max_tokens is not None and docs:
        if n_bytes is not None:                    # bytes of the scored prefix only
            n_bytes = len(tok.decode(docs[0][1:max_tokens].tolist()).encode("utf-8"))
        docs = [docs[0][:max_tokens]]
    res = score_ids(model.backend, docs, chunk, n_bytes)
    top1 = res.pop("top1")
    if ref is not None:
        ref_top1 = score_ids(ref.backend, docs, _chunk_for(ref.backend, chunk), n_bytes)["top1"]
        res["top1_agreement"] = float(np.mean(top1 == ref_top1))
    return res


def _chunk_for(be, chunk: Optional[int]) -> Optional[int]:
    if be.name == "torch":
        return chunk
    limit = be.manifest.max_chunk
    if chunk is not None and chunk > limit:
        raise SambaEdgeError(f"--chunk {chunk} exceeds the artifact's max chunk {limit}; use --chunk <= {limit}")
    return chunk or limit
