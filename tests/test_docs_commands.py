"""Every command the README and docs/*.md show is true: run as typed (through bash, in a scratch directory,
on the shipped model with small inputs) it exits 0, and where the doc states a figure or shows the output,
the output has it.

How a doc line is read (the rules the docs are written to):
  * Commands are the lines of code blocks (indented or fenced) that start with `samba-edge`,
    `python -m samba_edge...`, `python -m pytest`, `polygraphy` or `sudo`; in a `pip install ... && CMD`
    line (the README's setup) the part after `&&` is the command. Lines that start with `[` continue the
    command above them.
  * A command whose trailing comment (or the comment line above it) says "(needs a GPU" or "(on a Jetson"
    is not run here; its samba-edge flags are still checked against the CLI. `python -m pytest` lines are
    not run either: they are the test command itself (CI runs it).
  * `CHECKPOINT` stands for builtin:samba-tiny-py. Optional `[...]` groups are left out of the run and
    their flags checked against the CLI (`--opt a|b` alternatives must be the option's choices). A line
    that still has a placeholder (ARTIFACT, OUTDIR, TEXT, ...) is a synopsis: checked, not run.
  * Figures of four or more digits in a command's trailing comment must appear in its output; a fenced
    block right after a code block is the output of its last command and must match it line for line with
    the numbers masked.
  * Each doc runs in its own directory, commands reordered only so that whatever one writes (`-o`,
    `--state-out`, `--save`, `--polygraphy-dir`) exists before another reads it. Input files the docs name
    (some_file.py, corpus.txt, ids.npy, an official iter-020000-ckpt.pth, ...) are made here from real text.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

pytestmark = pytest.mark.slow            # ~20 exports, calibrations, validations, a bench, engine builds

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(samba-edge|python -m (samba_edge|pytest)|polygraphy|sudo)\b")
NOT_ON_CPU = re.compile(r"\((needs a GPU|on a Jetson)")
PLACEHOLDER = re.compile(r"(?<![\w./:-])(?!CHECKPOINT\b)[A-Z][A-Z_]{1,}(?:\.json|\.png)?(?![\w.-])")
WRITES = ("-o", "--state-out", "--save", "--polygraphy-dir", "--prepare")
TEXT_FILES = ("some_file.py", "p.py", "corpus.py", "held_out.py", "corpus.txt", "held_out.txt")
CK = "builtin:samba-tiny-py"


@dataclass
class DocCommand:
    doc: str
    line: int
    text: str                       # as written, continuation lines joined
    comment: str                    # trailing comment, and the comment line above it
    output: Optional[list] = None   # the fenced block that follows, if any

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def on_cpu(self) -> bool:
        return not NOT_ON_CPU.search(self.comment)

    @property
    def runs_here(self) -> bool:
        return self.on_cpu and not self.text.startswith("python -m pytest")

    def run_form(self) -> tuple[str, list[str], bool]:
        """(command to run, its optional groups, whether it is a synopsis only)."""
        groups = re.findall(r"\[([^\[\]]*)\]", self.text)
        cmd = re.sub(r"\s*\[[^\[\]]*\]", "", self.text)
        cmd = re.sub(r"\bCHECKPOINT\b", CK, cmd)
        synopsis = bool(PLACEHOLDER.search(re.sub(r"\"[^\"]*\"", "", cmd))) or "(" in cmd.split("#")[0] and "|" in cmd
        return cmd, groups, synopsis


def _split_comment(line: str) -> tuple[str, str]:
    """`cmd   # comment` -> (cmd, comment); a # inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def doc_commands(path: Path) -> list[DocCommand]:
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[DocCommand] = []
    fenced, block_end, prev_blank, in_block, above = False, None, True, False, ""
    for i, raw in enumerate(lines):
        if raw.startswith("```"):
            if not fenced:
                body = []
                for j in range(i + 1, len(lines)):
                    if lines[j].startswith("```"):
                        break
                    body.append(lines[j])
                if out and block_end is not None and all(not x.strip() for x in lines[block_end + 1:i]):
                    out[-1].output = body
            fenced = not fenced
            continue
        if fenced:
            continue
        code = raw.startswith("    ") and (in_block or prev_blank)
        in_block = code or (in_block and not raw.strip())
        prev_blank = not raw.strip()
        if not code:
            continue
        block_end = i
        text, comment = _split_comment(raw.strip())
        if text.startswith("pip install") and "&&" in text:
            text = text.split("&&", 1)[1].strip()
        if not text:
            above = comment
        elif text.startswith("[") and out and out[-1].line - 1 < i:
            out[-1].text += " " + text
            out[-1].comment += " " + comment
        elif COMMAND.match(text) or (out and out[-1].text.endswith("\\")):
            if out and out[-1].text.endswith("\\"):
                out[-1].text = out[-1].text[:-1].rstrip() + " " + text
            else:
                out.append(DocCommand(path.name, i + 1, text, f"{above} {comment}".strip()))
            above = ""
        else:
            above = ""
    return out


ALL = [c for d in DOCS for c in doc_commands(d)]


# ---- the CLI's own description of itself -----------------------------------------------------------
def _cli_params(subcommand: str) -> dict[str, tuple[Optional[set], str]]:
    """Flag -> (its choices or None, its help) for `samba-edge SUBCOMMAND`."""
    import click

    from samba_edge.tools.cli import cli

    cmd = cli.commands.get(subcommand)
    assert cmd is not None, f"samba-edge has no command {subcommand!r}"
    flags: dict[str, tuple[Optional[set], str]] = {"--help": (None, ""), "-h": (None, "")}
    for p in [*cmd.params, *cli.params]:
        choices = set(p.type.choices) if isinstance(p.type, click.Choice) else None
        for opt in [*p.opts, *p.secondary_opts]:
            flags[opt] = (choices, getattr(p, "help", None) or "")
    return flags


def check_flags(c: DocCommand) -> None:
    """Every --flag the line names exists for its subcommand; `--flag a|b|c` lists exactly the option's
    choices (or, for a free-form option, values its help names)."""
    words = shlex.split(c.run_form()[0].split(" #")[0].replace("(", " ").replace(")", " ").replace("|", " | "))
    if words[0] != "samba-edge":
        return
    sub = next(w for w in words[1:] if not w.startswith("-"))
    params = _cli_params(sub)
    tokens = re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)(?:\s+([\w.,-]+(?:\|[\w.,-]+)+))?", c.text)
    for flag, alts in tokens:
        assert flag in params, f"{c.id}: `samba-edge {sub}` has no option {flag}"
        choices, help_text = params[flag]
        if alts and choices is not None:
            assert set(alts.split("|")) == choices, \
                f"{c.id}: {flag} {alts} but the CLI offers {'|'.join(sorted(choices))}"
        elif alts:
            missing = [a for a in alts.split("|") if not re.search(rf"\b{re.escape(a)}\b", help_text)]
            assert not missing, f"{c.id}: {flag} {alts}, but its help names no {', '.join(missing)}"


# ---- running them ------------------------------------------------------------------------------------
def _writes(cmd: str) -> set[str]:
    words = shlex.split(cmd, comments=True)
    return {words[i + 1].split("/")[0] for i, w in enumerate(words[:-1]) if w in WRITES}


def _reads(cmd: str) -> set[str]:
    words = shlex.split(cmd, comments=True)
    return {w.split("/")[0] for w in words} - _writes(cmd)


def run_order(cmds: list[DocCommand]) -> list[DocCommand]:
    """Doc order, except that a command runs after the ones that write what it reads."""
    done: list[DocCommand] = []
    pending = list(cmds)
    while pending:
        made = {w for d in pending for w in _writes(d.run_form()[0])}
        nxt = next((c for c in pending if not (_reads(c.run_form()[0]) & (made - _writes(c.run_form()[0])))), pending[0])
        pending.remove(nxt)
        done.append(nxt)
    return done


def _mask(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[-+]?\d[\d.,]*(e[-+]?\d+)?", "#", line)).strip()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the docs name, made from real text (the package's own Python, as the model was trained on),
    and an official-layout training checkpoint (a tiny preset, random weights)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from samba_edge.export.config import get_config
    from samba_edge.export.model import Samba
    from samba_edge.runtime.tokenizer import load_tokenizer
    from samba_edge.export.locate import resolve

    root = tmp_path_factory.mktemp("doc-inputs")
    src = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "runtime").glob("*.py")))
    held = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "tools").glob("*.py")))
    for name in TEXT_FILES:
        (root / name).write_text(held[:6000] if "held" in name or name in ("p.py", "some_file.py") else src)
    ids = load_tokenizer(resolve(CK)).encode(held[:3000])
    import numpy as np

    np.save(root / "ids.npy", np.asarray(ids, dtype=np.int64))
    torch.manual_seed(0)
    model = Samba(get_config("tiny_mha_w16"))
    torch.save({"model": model.state_dict(), "hparams": {"model_name": "tiny_mha_w16"}},
               root / "iter-020000-ckpt.pth")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    exe = shutil.which("samba-edge")
    if exe is None:
        pytest.skip("the samba-edge console script is not on PATH (pip install -e .)")
    cache = tmp_path_factory.mktemp("doc-cache")
    return {**os.environ, "SAMBA_EDGE_CACHE": str(cache), "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHON": sys.executable}


STDIN = {"chat": "def add(a, b):\n"}


@pytest.mark.parametrize("doc", [d.name for d in DOCS if doc_commands(d)])
def test_doc_commands_are_true(doc, inputs, env, tmp_path):
    cmds = [c for c in ALL if c.doc == doc]
    for c in cmds:
        check_flags(c)
    for name in os.listdir(inputs):
        (tmp_path / name).symlink_to(inputs / name)
    ran = []
    for c in run_order([c for c in cmds if c.runs_here]):
        cmd, groups, synopsis = c.run_form()
        if synopsis:
            continue
        sub = shlex.split(cmd, comments=True)
        stdin = STDIN.get(sub[1], "") if sub[0] == "samba-edge" and len(sub) > 1 else ""
        cmd = re.sub(r"^python\b", shlex.quote(sys.executable), cmd)
        r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"{c.id}: `{cmd}` exited {r.returncode}:\n{r.stderr[-3000:]}"
        for figure in re.findall(r"\d{1,3}(?:,\d{3})+|\d{4,}", _split_comment(cmd)[1] or c.comment):
            assert figure in r.stdout, f"{c.id}: the doc says {figure}, the output does not:\n{r.stdout[:2000]}"
        if c.output is not None:
            want = [_mask(x) for x in c.output if x.strip()]
            got = [_mask(x) for x in (r.stdout + r.stderr).splitlines() if x.strip() and _mask(x) in want]
            assert got == want, f"{c.id}: the output shown in the doc is not what the command prints:\n{r.stdout}"
        after = sub[sub.index("--json") + 1:] if "--json" in sub else None
        if after is not None and (not after or after[0].startswith("-")):
            json.loads(r.stdout)                    # --json as a flag (not --json FILE): one JSON object
        ran.append(c.id)
    assert ran or all(c.run_form()[2] or not c.runs_here for c in cmds), f"{doc}: no command ran"


def test_every_doc_command_is_run_or_marked():
    """The parser sees the commands (a change to the docs' layout would otherwise skip them silently)."""
    by_doc = {d: [c for c in ALL if c.doc == d] for d in {c.doc for c in ALL}}
    assert len(by_doc["README.md"]) >= 20 and {"export.md", "jetson.md", "precision.md", "validate.md"} <= set(by_doc)
    main = by_doc["README.md"][0]
    assert main.text.startswith("samba-edge generate builtin:samba-tiny-py") and main.on_cpu
    for c in ALL:
        check_flags(c)
    for wrong in ("samba-edge export CHECKPOINT -o y [--flavour plugin]", "samba-edge export CHECKPOINT -o y "
                  "[--flavor plugin|portable|gguf]", "samba-edge exprt CHECKPOINT -o y"):
        with pytest.raises(AssertionError):
            check_flags(DocCommand("made-up.md", 1, wrong, ""))
