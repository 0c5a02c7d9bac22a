"""The checkpoints SAMBA users have, and the canonical samba-edge directory.

Accepted forms of CHECKPOINT (every command that takes one):
  * `builtin:NAME`                 a model shipped inside the package (export/builtin/NAME)
  * a canonical directory          config.json + model.safetensors (or a sharded
                                   model.safetensors.index.json), optional tokenizer.json / tokenizer.model
  * an official training pickle    `iter-XXXXXX-ckpt.pth` = {"model": state_dict, "hparams": ...}
                                   or a bare state dict; read with torch.load(weights_only=True) only
The state dict is checked against the config before any weight is used: missing, unexpected,
mis-shaped or non-float tensors are listed in one error, never partially loaded.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from samba_edge.export.config import SambaConfig, get_config
from samba_edge.export.locate import BUILTIN_DIR, builtin_names, resolve  # noqa: F401  (re-exported)
from samba_edge.runtime.atomic import atomic_dir
from samba_edge.export.model import Samba
from samba_edge.runtime.errors import SambaEdgeError

TIED = ("transformer.wte.weight", "lm_head.weight")
_WRAPPER_PREFIXES = ("_forward_module.", "module.", "_orig_mod.")   # Fabric / DDP / torch.compile
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_PARAMS = ("A_log", ".D", "dt_proj.bias")       # scan parameters stay fp32 in every precision


@dataclass
class Checkpoint:
    config: SambaConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    directory: Optional[Path] = None        # where tokenizer files may live

    def model(self, dtype: torch.dtype = torch.float32) -> Samba:
        """The model with these weights (built on meta, so no memory is spent on a throwaway init)."""
        with torch.device("meta"):
            m = Samba(self.config)
        sd = {k: v.float() if k.endswith(FP32_PARAMS) else v.to(dtype) for k, v in self.state_dict.items()}
        m.load_state_dict(sd, strict=True, assign=True)
        if self.config.tied:
            m.lm_head.weight = m.transformer.wte.weight                  # re-tie after assign
        return m.eval()


def expected_shapes(cfg: SambaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = Samba(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def check_state_dict(sd: dict, cfg: SambaConfig, source: str) -> dict[str, torch.Tensor]:
    """Validate against `cfg`; returns the state dict with wrapper prefixes removed and (for a tied head,
    `cfg.tied`) the tie filled: both names hold one tensor."""
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd):
        raise SambaEdgeError(f"{source} does not hold a state dict (a mapping of parameter names to tensors)")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    sd = dict(sd)
    present = [k for k in TIED if k in sd]
    both = len(present) == 2 and all(isinstance(sd[k], torch.Tensor) for k in TIED)
    same_shape = both and sd[TIED[0]].shape == sd[TIED[1]].shape
    if cfg.tied:
        if same_shape and not torch.equal(sd[TIED[0]], sd[TIED[1]]):
            raise SambaEdgeError(f"{source}: lm_head.weight differs from transformer.wte.weight, but config "
                                 f"{cfg.name!r} ties them (mamba_init true); if the checkpoint has its own head, "
                                 "pass a config with \"mamba_init\": false (--config FILE.json)")
        if len(present) == 1 or same_shape:                             # one tensor under both names
            sd[TIED[0]] = sd[TIED[1]] = sd[present[0]]
    elif present == [TIED[0]]:
        raise SambaEdgeError(f"{source} has no lm_head.weight, but config {cfg.name!r} gives the head its own "
                             "weight (mamba_init false); if the head is tied to the embedding, set "
                             "\"mamba_init\": true in the config")
    want = expected_shapes(cfg)
    problems = [f"missing {k}" for k in want if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in want]
    for k, v in sd.items():
        if k not in want:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif tuple(v.shape) != want[k]:
            problems.append(f"{k} has shape {tuple(v.shape)}, expected {want[k]}")
        elif v.dtype not in _FLOAT_DTYPES:
            problems.append(f"{k} has dtype {v.dtype}, expected a float type")

    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SambaEdgeError(f"{source} does not match config {cfg.name!r}: {'; '.join(problems[:5])}{more}; "
                             "pass the config the checkpoint was trained with (--config)")
    broken = [f"{k} ({int((~torch.isfinite(v)).sum())} values)" for k, v in sd.items()
              if k in want and not torch.isfinite(v).all()]
    if broken:
        raise SambaEdgeError(f"{source} holds NaN/Inf weights: {', '.join(broken[:3])}"
                             f"{f' and {len(broken) - 3} more tensors' if len(broken) > 3 else ''}; the checkpoint "
                             "is damaged or training diverged: use an earlier checkpoint")
    return sd


def _config_for(directory: Optional[Path], config: Optional[str], hparams: Optional[dict], source: str) -> SambaConfig:
    if config is not None:
        return get_config(config)
    if directory is not None and (directory / "config.json").is_file():
        return SambaConfig.from_json(directory / "config.json")
    if isinstance(hparams, dict) and isinstance(hparams.get("model_name"), str):
        return get_config(hparams["model_name"])           # official pretrain.py records it
    raise SambaEdgeError(f"{source} carries no config; pass --config NAME|FILE.json (e.g. --config Samba_421M)")


def _load_pickle(path: Path) -> dict:
    import zipfile

    try:                     # mmap needs the zip format; a legacy (pre-1.6) torch.save file loads without it
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise SambaEdgeError(f"{path} needs code execution to unpickle; refused (weights_only=True). "
                                 "Re-save the state dict with torch.save(model.state_dict()) or convert it") from None
        raise SambaEdgeError(f"{path} is not a readable torch checkpoint ({msg}); is it truncated?") from None
    if not isinstance(obj, dict):
        raise SambaEdgeError(f"{path} holds a {type(obj).__name__}, not a state dict or a training checkpoint")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a directory with model.safetensors or a sharded index."""
    from safetensors.torch import load_file

    directory = path if path.is_dir() else path.parent
    index = directory / "model.safetensors.index.json"
    if not path.is_dir():
        files = [path]
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SambaEdgeError(f"{index} is not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
            raise SambaEdgeError(f"{index}: weight_map must map tensor names to shard file names in {directory} "
                                 "(a non-empty JSON object of plain file names)")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SambaEdgeError(f"{index} names shard(s) that are not there: {', '.join(missing[:3])}")
    else:
        raise SambaEdgeError(f"{directory} has no model.safetensors or model.safetensors.index.json")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise SambaEdgeError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]}); is it truncated?") from None
    return sd


def load_checkpoint(spec: str, config: Optional[str] = None) -> Checkpoint:
    path = resolve(spec)
    if path.is_dir():
        cfg = _config_for(path, config, None, str(path))
        return Checkpoint(cfg, check_state_dict(_load_safetensors(path), cfg, str(path)), spec, path)
    if path.suffix == ".safetensors":
        cfg = _config_for(path.parent, config, None, str(path))
        return Checkpoint(cfg, check_state_dict(_load_safetensors(path), cfg, str(path)), spec, path.parent)
    obj = _load_pickle(path)
    hparams = obj.get("hparams")
    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    cfg = _config_for(None, config, hparams, str(path))
    return Checkpoint(cfg, check_state_dict(sd, cfg, str(path)), spec, path.parent)


# ---- writing ----------------------------------------------------------------------------------
def _looks_like_sentencepiece(head: bytes) -> bool:
    """A serialized sentencepiece ModelProto starts with its first `pieces` entry (field 1, a message),
    whose first field is the piece string (field 1): tag 0x0A, a varint length, tag 0x0A."""
    if head[:1] != b"\x0a":
        return False
    i = 1
    while i < len(head) and head[i] & 0x80 and i < 6:           # skip the varint length
        i += 1
    return i + 1 < len(head) and head[i + 1:i + 2] == b"\x0a"


def tokenizer_name(path: str | Path) -> str:
    """The canonical name a tokenizer file is stored under, decided by its content (not its name):
    `tokenizer.json` (Hugging Face tokenizers) or `tokenizer.model` (SentencePiece); anything else is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as e:
        raise SambaEdgeError(f"cannot read the tokenizer {path} ({e.strerror})") from None
    if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
        try:
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SambaEdgeError(f"{path} is not valid JSON ({e}), so not a tokenizer.json") from None
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            return "tokenizer.json"
        raise SambaEdgeError(f"{path} is JSON but not a Hugging Face tokenizers file (it has no \"model\" "
                             "section; tokenizer_config.json or vocab.json are not enough): pass the tokenizer.json")
    if _looks_like_sentencepiece(head):
        return "tokenizer.model"
    raise SambaEdgeError(f"{path} is neither a Hugging Face tokenizer.json nor a SentencePiece tokenizer.model; "
                         "pass one of those")


def save_canonical(out: Path, ckpt_or_cfg, state_dict: Optional[dict] = None, tokenizer_files=(),
                   extra_files: Optional[dict[str, str]] = None, force: bool = False) -> Path:
    """Write config.json + model.safetensors (+ tokenizer and extra text files) atomically. Tokenizer files are
    stored under their canonical names (tokenizer.json / tokenizer.model), which is where loaders look."""
    from safetensors.torch import save_file

    cfg = ckpt_or_cfg.config if isinstance(ckpt_or_cfg, Checkpoint) else ckpt_or_cfg
    sd = ckpt_or_cfg.state_dict if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous() for k, v in sd.items()
               if k != "lm_head.weight" or not cfg.tied}                # a tied head is stored once
    names = [tokenizer_name(f) for f in tokenizer_files]
    if len(set(names)) != len(names):
        raise SambaEdgeError(f"two tokenizer files would both be stored as "
                             f"{next(n for n in names if names.count(n) > 1)}; pass one")
    with atomic_dir(out, force) as tmp:
        cfg.save(tmp / "config.json")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "samba_config": cfg.name})
        for f, name in zip(tokenizer_files, names):
            shutil.copy2(f, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)
