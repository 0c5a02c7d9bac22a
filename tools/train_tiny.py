"""Train the shipped tiny SAMBA (`builtin:samba-tiny-py`) from scratch on CPU.

Corpus: the running interpreter's own standard library `.py` sources (present on every machine).
Split by a hash of each file's relative path (deterministic); the held-out list is saved.
Tokenizer: byte-level BPE (HF tokenizers), so any text round-trips. Model: a few million
parameters, window 64 with training sequences of 256 tokens (4 windows: the model learns to live
with eviction), official initialisation. Usage:

    python -m samba_edge.tools.train_tiny -o export/builtin/samba-tiny-py [--steps N] [--force]
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import click
import numpy as np

HELDOUT_PERCENT = 7          # files whose path hash mod 100 < 7 are held out (>= 5% required)
EOT = "<|endoftext|>"        # document separator; also the tokenizer's document-start token

TINY_CONFIG = dict(name="samba-tiny-py", block_size=256, vocab_size=4096, padding_multiple=64, n_layer=4,
                   n_embd=256, n_head=4, n_query_groups=2, head_size=64, intermediate_size=768,
                   local_window=64, d_state=16, d_conv=4, expand=2, mb_per_layer=2)


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    return root, files


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def read_text(p: Path):
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None                                                  # a few test fixtures are latin-1


def split_corpus():
    root, files = stdlib_files()
    train, held = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        text = read_text(p)
        if text:
            (held if is_heldout(rel) else train).append((rel, text))
    return root, train, held


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, docs: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    out: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        out.append(eot)
        out.extend(enc.ids)
    return np.asarray(out, dtype=np.int32)


@click.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True)
@click.option("--steps", default=1000, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--seq", default=256, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--seed", default=1234, show_default=True)
@click.option("--max-minutes", default=55.0, show_default=True, help="stop early (and say so) past this")
@click.option("--force", is_flag=True)
def main(out: Path, steps: int, batch: int, seq: int, lr: float, seed: int, max_minutes: float, force: bool) -> None:
    import torch
    from tqdm import tqdm

    from samba_edge.export.checkpoint import save_canonical
    from samba_edge.export.config import SambaConfig
    from samba_edge.export.model import Samba, init_official
    from samba_edge.export.torch_backend import TorchBackend
    from samba_edge.tools.evaluate import score_documents

    t0 = time.time()
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    root, train, held = split_corpus()
    n_files = len(train) + len(held)
    assert len(held) / n_files >= 0.05, "held-out split below 5%"
    print(f"corpus {root}: {len(train)} train / {len(held)} held-out files", flush=True)
    tok = train_tokenizer([t for _, t in train], TINY_CONFIG["vocab_size"])
    data = encode_docs(tok, [t for _, t in train])
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train stream {len(data):,} tokens "
          f"({sum(len(t.encode()) for _, t in train) / len(data):.2f} bytes/token)", flush=True)

    cfg = SambaConfig(**TINY_CONFIG)
    model = init_official(Samba(cfg), seed=seed).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    rng = np.random.default_rng(seed)
    zeros = torch.zeros(batch, dtype=torch.long)
    log_lines = ["step,train_loss,lr,elapsed_s"]
    bar = tqdm(range(steps), desc="train samba-tiny-py", mininterval=5, file=sys.stdout)
    done = 0
    for step in bar:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        xy = torch.from_numpy(np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64))
        logits = model(xy[:, :-1], zeros, *model.empty_state(batch))[0]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 25 == 0 or step == steps - 1:
            log_lines.append(f"{step},{loss.item():.4f},{sched.get_last_lr()[0]:.3e},{time.time() - t0:.0f}")
            print(f"step {step} loss {loss.item():.4f}", flush=True)
        if (time.time() - t0) / 60 > max_minutes:
            print(f"stopping early at step {done}: past --max-minutes {max_minutes}", flush=True)
            break
    train_s = time.time() - t0

    model.eval()
    tok_path = Path(click.get_app_dir("samba-edge-train")) / "tokenizer.json"
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_path))
    from samba_edge.runtime.tokenizer import Tokenizer
    stats = score_documents(TorchBackend(model), Tokenizer(tok_path), [t for _, t in held], chunk=1024)
    print(f"held-out: {stats}", flush=True)
    card = {
        "name": "samba-tiny-py", "corpus": f"CPython {platform.python_version()} standard library .py sources "
        "(sysconfig stdlib, site-packages excluded)",
        "split": f"sha256(relative path) % 100 < {HELDOUT_PERCENT} -> held out; {len(train)} train / {len(held)} "
                 "held-out files (list in heldout_files.txt)",
        "tokenizer": f"byte-level BPE, {tok.get_vocab_size()} tokens, {EOT} separates files",
        "parameters": n_params, "config": cfg.to_dict(), "steps": done, "batch": batch, "seq_len": seq,
        "train_tokens": done * batch * seq, "lr": lr, "seed": seed, "wall_time_s": round(train_s, 1),
        "torch": torch.__version__, "heldout": stats,
    }
    save_canonical(out, cfg, model.state_dict(), tokenizer_files=[tok_path], force=force, extra_files={
        "model_card.json": json.dumps(card, indent=2) + "\n",
        "heldout_files.txt": "\n".join(r for r, _ in held) + "\n",
        "train_log.csv": "\n".join(log_lines) + "\n",
    })
    print(f"wrote {out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
