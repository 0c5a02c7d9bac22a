"""`samba-edge generate` on a PyTorch checkpoint: prefill the prompt, then decode token by token."""
from __future__ import annotations

from typing import Iterator, Optional

from samba_edge.runtime.errors import SambaEdgeError


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 120, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0, config: Optional[str] = None,
                  tokenizer: Optional[str] = None) -> Iterator[str]:
    """Loads eagerly (so bad input fails before any output), then returns an iterator of text pieces
    as they are produced; a piece never ends inside a UTF-8 sequence."""
    import torch

    from samba_edge.export.checkpoint import load_checkpoint
    from samba_edge.runtime.tokenizer import load_tokenizer

    if max_new_tokens < 0 or temperature < 0 or top_k < 0:
        raise SambaEdgeError("--max-new-tokens, --temperature and --top-k must be >= 0")
    ckpt = load_checkpoint(checkpoint, config)
    tok = load_tokenizer(ckpt.directory, tokenizer)
    model = ckpt.model()
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    ids = ([start] if start is not None else []) + tok.encode(prompt)
    if not ids:
        raise SambaEdgeError("the prompt is empty and the tokenizer has no start token; give a --prompt")
    return _stream(model, tok, ids, ckpt.config.vocab_size, max_new_tokens, temperature, top_k, seed)


def _stream(model, tok, ids: list[int], vocab: int, max_new_tokens: int, temperature: float, top_k: int,
            seed: int) -> Iterator[str]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = model.empty_state(1)
    pos, feed, out, emitted = 0, ids, [], ""
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, *state = model(torch.tensor([feed]), torch.tensor([pos]), *state, last_only=True)
            pos += len(feed)
            logits = logits[0, -1, :vocab]
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            feed = [nxt]
            text = tok.decode(out)
            if not text.endswith("\ufffd"):                   # hold back an incomplete UTF-8 sequence
                yield text[len(emitted):]
                emitted = text
