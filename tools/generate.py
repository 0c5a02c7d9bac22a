"""`samba-edge generate` / `chat`: stream text from an artifact or a checkpoint through the runtime."""
from __future__ import annotations

import string
import sys
import time
from typing import Callable, Optional, Sequence

from samba_edge.runtime import SamplingParams, SambaEdgeError, open_model
from samba_edge.runtime.userio import check_output_file, check_text, read_text_file


# The escapes `--stop` understands (a shell passes "\n\n" as backslash-n twice): exactly these, nothing else.
SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}                # \xNN, \uNNNN, \UNNNNNNNN: a code point in hex
ESCAPES_HELP = "\\n \\t \\r \\\\ \\' \\\" \\xNN \\uNNNN \\UNNNNNNNN"


def decode_escapes(text: str, what: str = "--stop") -> str:
    """Decode backslash escapes in `text`; every other character (non-ASCII included) is kept as it is.

    Unlike codecs' "unicode_escape" (which reads its input as Latin-1 bytes), "é\\n" becomes "é" + newline.
    An unknown escape, a truncated \\x/\\u/\\U or a lone trailing backslash is an error, never guessed."""
    out, i = [], 0
    while i < len(text):
        j = text.find("\\", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        e = text[j + 1:j + 2]
        where = f"in {what} (character {j + 1})"
        if e and e in SIMPLE_ESCAPES:
            out.append(SIMPLE_ESCAPES[e])
            i = j + 2
        elif e and e in HEX_ESCAPES:
            n = HEX_ESCAPES[e]
            digits = text[j + 2:j + 2 + n]
            if len(digits) != n or any(d not in string.hexdigits for d in digits):
                raise SambaEdgeError(f"bad escape \\{e}{digits} {where}: \\{e} takes exactly {n} hex digits")
            cp = int(digits, 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise SambaEdgeError(f"bad escape \\{e}{digits} {where}: not a Unicode character")
            out.append(chr(cp))
            i = j + 2 + n
        elif not e:
            raise SambaEdgeError(f"{what} ends in a lone backslash (character {j + 1}); write \\\\ for a backslash")
        else:
            shown = f"\\{e}" if e.isprintable() else f"a backslash followed by {e!r}"
            raise SambaEdgeError(f"unknown escape {shown} {where}; the escapes are {ESCAPES_HELP} "
                                 "(write \\\\ for a backslash)")
    return "".join(out)


def no_tokenizer_message(artifact: str, backend: str, option: bool = True) -> str:
    """For commands that take text only: say how to get a tokenizer, not "pass token ids"."""
    add = "`samba-edge convert CHECKPOINT -o DIR --tokenizer FILE` adds one to a checkpoint"
    fix = f"re-export it from a checkpoint that has one ({add})" if backend in ("ort", "trt") else add
    return (f"{artifact} has no tokenizer (tokenizer.json or tokenizer.model), so text cannot be encoded; "
            + (f"pass --tokenizer FILE, or {fix}" if option else fix))


def read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> Optional[str]:
    if prompt is not None and prompt_file is not None:
        raise SambaEdgeError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return prompt                                       # checked by generate(), for API callers too
    return read_text_file(prompt_file, "prompt file")


def generate(artifact: str, prompt: Optional[str], params: SamplingParams, backend: str = "auto",
             state_in: Optional[str] = None, state_out: Optional[str] = None, tokenizer: Optional[str] = None,
             write: Callable[[str], None] = sys.stdout.write, server: Optional[str] = None,
             model_name: str = "samba") -> dict:
    """Echo the prompt and stream its continuation through `write`; returns counts and timings. Loads (and validates) eagerly:
    nothing is written for bad input, and --state-out is only replaced by a complete snapshot."""
    if not prompt and state_in is None:
        raise SambaEdgeError("the prompt is empty; give --prompt TEXT, --prompt-file F or --state-in F")
    if prompt:
        check_text(prompt, "the prompt")
    if state_out:
        check_output_file(state_out, "--state-out")
    if server:                      # a sequence on a Triton server (runtime/remote.py); text is tokenized here
        from samba_edge.runtime.remote import connect

        model, backend_name = connect(server, model_name, tokenizer or artifact), f"triton {server}/{model_name}"
    else:
        model = open_model(artifact, backend, tokenizer=tokenizer)
        backend_name = model.backend.name
    if model.tokenizer is None:                             # generate reads and writes text: it needs one
        raise SambaEdgeError(no_tokenizer_message(artifact, backend_name))
    stream = model.restore(state_in) if state_in else model.new_stream()
    if server:
        stream.params = params                              # the prompt's request draws the first token
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
    if server:
        stream.close()
    new = stream.position - n0
    return {"prompt_tokens": n0 if not state_in else None, "new_tokens": new, "position": stream.position,
            "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tok_s": new / (t2 - t1) if new else 0.0,
            "backend": backend_name}


def _lines(lines: Optional[Sequence[str]]):
    """The given lines, or stdin's with invalid UTF-8 kept as surrogate escapes (refused per line, by
    number, instead of a decode error from deep inside the loop)."""
    if lines is not None:
        yield from lines
        return
    stdin = sys.stdin
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    yield from stdin


def chat(artifact: str, params: SamplingParams, backend: str = "auto", state_in: Optional[str] = None,
         state_out: Optional[str] = None, lines: Optional[Sequence[str]] = None,
         write: Callable[[str], None] = sys.stdout.write, interactive: Optional[bool] = None) -> int:
    """One stream kept alive across turns: each input line is fed, then a reply streams back. On a terminal
    (or interactive=True) a banner and a `> ` prompt go to stderr, so stdout holds only the replies."""
    if state_out:
        check_output_file(state_out, "--state-out")
    model = open_model(artifact, backend)
    if model.tokenizer is None:
        raise SambaEdgeError(no_tokenizer_message(artifact, model.backend.name, option=False))
    stream = model.restore(state_in) if state_in else model.new_stream()
    if interactive is None:
        interactive = lines is None and sys.stdin.isatty()

    def prompt() -> None:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)

    if interactive:
        print(f"samba-edge chat: {artifact} ({model.backend.name} backend, position {stream.position}); one line per "
              f"turn, Ctrl-D to end{'; snapshot after each turn: ' + state_out if state_out else ''}", file=sys.stderr)
    turns = 0
    prompt()
    for n, line in enumerate(_lines(lines), 1):
        check_text(line, f"chat input line {n}")
        if not line.strip():
            prompt()
            continue
        stream.feed_text(line if line.endswith("\n") else line + "\n")
        for piece in stream.generate_text(None, params):
            write(piece)
        write("\n")
        turns += 1
        if state_out:
            stream.snapshot(state_out)                      # after every turn: a crash loses at most one
        prompt()
    return turns
