"""`samba-edge generate` / `chat`: stream text from an artifact or a checkpoint through the runtime."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from samba_edge.runtime import SamplingParams, SambaEdgeError, open_model


def read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> Optional[str]:
    if prompt is not None and prompt_file is not None:
        raise SambaEdgeError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return prompt
    try:
        return Path(prompt_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SambaEdgeError(f"prompt file {prompt_file} not found") from None
    except UnicodeDecodeError:
        raise SambaEdgeError(f"prompt file {prompt_file} is not UTF-8 text") from None


def generate(artifact: str, prompt: Optional[str], params: SamplingParams, backend: str = "auto",
             state_in: Optional[str] = None, state_out: Optional[str] = None, tokenizer: Optional[str] = None,
             write: Callable[[str], None] = sys.stdout.write) -> dict:
    """Echo the prompt and stream its continuation through `write`; returns counts and timings. Loads (and validates) eagerly:
    nothing is written for bad input, and --state-out is only replaced by a complete snapshot."""
    if not prompt and state_in is None:
        raise SambaEdgeError("the prompt is empty; give --prompt TEXT, --prompt-file F or --state-in F")
    model = open_model(artifact, backend, tokenizer=tokenizer)
    stream = model.restore(state_in) if state_in else model.new_stream()
    t0 = time.perf_counter()
    if prompt:
        stream.feed_text(prompt)
        write(prompt)                                       # echoed only once the prompt was accepted
    t1 = time.perf_counter()
    n0 = stream.position
    for piece in stream.generate_text(None, params):
        write(piece)
        if hasattr(sys.stdout, "flush"):
            sys.stdout.flush()
    t2 = time.perf_counter()
    if state_out:
        stream.snapshot(state_out)
    new = stream.position - n0
    return {"prompt_tokens": n0 if not state_in else None, "new_tokens": new, "position": stream.position,
            "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tok_s": new / (t2 - t1) if new else 0.0,
            "backend": model.backend.name}


def chat(artifact: str, params: SamplingParams, backend: str = "auto", state_in: Optional[str] = None,
         state_out: Optional[str] = None, lines: Optional[Sequence[str]] = None,
         write: Callable[[str], None] = sys.stdout.write) -> int:
    """One stream kept alive across turns: each input line is fed, then a reply streams back."""
    model = open_model(artifact, backend)
    stream = model.restore(state_in) if state_in else model.new_stream()
    turns = 0
    for line in (lines if lines is not None else sys.stdin):
        if not line.strip():
            continue
        stream.feed_text(line if line.endswith("\n") else line + "\n")
        for piece in stream.generate_text(None, params):
            write(piece)
        write("\n")
        turns += 1
        if state_out:
            stream.snapshot(state_out)                      # after every turn: a crash loses at most one
    return turns
