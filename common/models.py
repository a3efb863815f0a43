"""Loading the parts of a CogVideoX-Fun model folder, offline and one part at a time.

A model folder has the diffusers layout real checkpoints ship (and `cogfun tiny-model` writes):

    model/
      model_index.json
      transformer/   config.json + diffusion_pytorch_model*.safetensors
      vae/           config.json + diffusion_pytorch_model*.safetensors
      text_encoder/  config.json + model*.safetensors
      tokenizer/     spiece.model (real T5) or tokenizer.json (tiny) + tokenizer_config.json
      scheduler/     scheduler_config.json (a CogVideoXDDIMScheduler JSON)

Each loader reads only its own subfolder, so precompute never touches transformer weights and
training never loads the VAE or T5. Everything loads with `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKLCogVideoX, DDPMScheduler
    from transformers import PreTrainedTokenizerBase, T5EncoderModel

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

# A caption-like probe: checked against sentencepiece itself when the folder ships spiece.model.
_PROBE_TEXT = "a man is walking his dog in the park on a sunny day"


class ModelFolderError(Exception):
    """A model folder is missing, is not a model folder, or lacks a part that was asked for."""


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))


def _missing_shards(folder: Path) -> list[str]:
    """Shard files named by a `*.index.json` that are not on disk."""
    missing: set[str] = set()
    for index in folder.glob("*.index.json"):
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing.update(f for f in weight_map.values() if not (folder / f).is_file())
    return sorted(missing)


def _part_problem(root: Path, part: str) -> str | None:
    """Why `root/part` is not a usable part, or None when it is."""
    folder = root / part
    if not folder.is_dir():
        return "folder missing"
    if part == "scheduler":
        return None if (folder / "scheduler_config.json").is_file() else "no scheduler_config.json"
    if part == "tokenizer":
        if (folder / "spiece.model").is_file() or (folder / "tokenizer.json").is_file():
            return None
        return "no spiece.model or tokenizer.json"
    if not (folder / "config.json").is_file():
        return "no config.json"
    if not _weight_files(folder):
        return "no weights (*.safetensors or *.bin)"
    if shards := _missing_shards(folder):
        return f"missing weight shards {', '.join(shards)}"
    return None


def check_model_folder(path: str | Path, parts: Iterable[str]) -> Path:
    """Returns `path` as a Path if it is a model folder holding every part in `parts`.

    Raises ModelFolderError naming the folder and each missing part (with what is missing).
    """
    root = Path(path)
    wanted = list(parts)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown model part(s) {unknown}; parts are {', '.join(PARTS)}")
    if not root.exists():
        raise ModelFolderError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise ModelFolderError(f"{root} is not a model folder: it is a file, not a folder")
    layout = "the diffusers layout " + " ".join(f"{p}/" for p in PARTS) + " + model_index.json"
    if not (root / "model_index.json").is_file() and not any((root / p).is_dir() for p in PARTS):
        hint = ""
        if (root / "config.json").is_file() or (root / "scheduler_config.json").is_file():
            hint = " (it looks like a single part's folder: pass the folder above it)"
        raise ModelFolderError(
            f"{root} is not a model folder: no model_index.json and none of the part folders; "
            f"expected {layout}{hint}"
        )
    problems = [(p, why) for p in wanted if (why := _part_problem(root, p)) is not None]
    if problems:
        listed = "; ".join(f"{p}/ ({why})" for p, why in problems)
        raise ModelFolderError(f"model folder {root} is missing {listed}")
    return root


def _frozen(model: Any) -> Any:
    model.eval()
    model.requires_grad_(False)
    return model


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKLCogVideoX:
    """The VAE from `path/vae`, in eval mode with gradients off."""
    from diffusers import AutoencoderKLCogVideoX

    root = check_model_folder(path, ["vae"])
    vae = AutoencoderKLCogVideoX.from_pretrained(
        root, subfolder="vae", torch_dtype=dtype, local_files_only=True
    )
    return _frozen(vae)


def load_text_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> T5EncoderModel:
    """The T5 encoder from `path/text_encoder`, in eval mode with gradients off."""
    from transformers import T5EncoderModel

    root = check_model_folder(path, ["text_encoder"])
    encoder = T5EncoderModel.from_pretrained(
        root, subfolder="text_encoder", dtype=dtype, local_files_only=True
    )
    return _frozen(encoder)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer from `path/tokenizer`: a real `spiece.model` folder or the tiny `tokenizer.json`.

    transformers 5 has traps here (tests/test_tokenizer.py): `T5Tokenizer(vocab_file=...)` ignores
    the file and maps every word to unk, and a spiece.model folder needs sentencepiece + protobuf
    to convert. So it loads with AutoTokenizer and then proves the ids are real: equal to
    sentencepiece's own ids when spiece.model is present, and never all unk.
    """
    from transformers import AutoTokenizer

    folder = check_model_folder(path, ["tokenizer"]) / "tokenizer"
    spiece = folder / "spiece.model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        needs = " (a spiece.model folder needs the sentencepiece and protobuf packages)"
        raise ModelFolderError(
            f"cannot load the tokenizer in {folder}: {err}{needs if spiece.is_file() else ''}"
        ) from err
    _check_tokenizer(tokenizer, folder)
    return tokenizer


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    # A vocabulary that failed to load still knows the word-start marker "▁", so ignore it too.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if all(i == tokenizer.unk_token_id or p == "▁" for i, p in zip(ids, pieces, strict=True)):
        raise ModelFolderError(
            f"the tokenizer in {folder} maps ordinary text to unk only: its vocabulary did not load"
        )
    spiece = folder / "spiece.model"
    if not spiece.is_file():
        return
    import sentencepiece

    expected = sentencepiece.SentencePieceProcessor(model_file=str(spiece)).encode(_PROBE_TEXT)
    if list(ids) != list(expected):
        raise ModelFolderError(
            f"the tokenizer loaded from {folder} gives ids {list(ids)[:8]}... for a probe text, "
            f"but its spiece.model gives {expected[:8]}...: the sentencepiece model was not used"
        )


def load_scheduler(path: str | Path) -> DDPMScheduler:
    """The model folder's training schedule (`schedulers.load_noise_scheduler`), after checking that
    `path` is a model folder with a `scheduler/` part (ModelFolderError naming what is missing)."""
    from cogfun.common.schedulers import load_noise_scheduler

    return load_noise_scheduler(check_model_folder(path, ["scheduler"]))


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """Re-export of `cogfun.common.transformer.load_transformer` (imported lazily: it pulls in the
    Fun positional code, which the VAE/T5 side never needs)."""
    from cogfun.common.transformer import load_transformer as _load_transformer

    return _load_transformer(path, dtype=dtype, **kwargs)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: T5EncoderModel,
    texts: list[str],
    max_length: int = 226,
) -> torch.Tensor:
    """T5 hidden states for `texts`, exactly as the original's scripts/train.py computes them.

    Padded to `max_length`, truncated, EOS appended; T5 gets input_ids only: no attention mask, so
    the padding positions' outputs are kept as they come out. Returns (B, max_length, D) in the
    encoder's dtype.
    """
    input_ids = tokenizer(
        list(texts),
        max_length=max_length,
        padding="max_length",
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids  # (B, L)
    with torch.no_grad():
        return text_encoder(input_ids.to(text_encoder.device))[0]  # (B, L, D)


# Identity hashes are cached per (file, size, mtime) so a process hashes each file at most once.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(file: Path) -> str:
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        with file.open("rb") as f:
            _HASH_CACHE[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _HASH_CACHE[key]


def _part_class(folder: Path) -> str | None:
    for name in ("config.json", "scheduler_config.json", "tokenizer_config.json"):
        cfg = folder / name
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            return (
                data.get("_class_name")
                or (data.get("architectures") or [None])[0]
                or data.get("tokenizer_class")
            )
    return None


def model_identity(path: str | Path, part: str) -> dict:
    """What identifies a part's contents, for store fingerprints: its class and a sha256.

    The hash covers the full bytes of every file in the part folder (configs, weights, tokenizer
    files). A cheaper key (sizes, mtimes, the safetensors header) would call two fine-tuned
    checkpoints with the same shapes equal and let a store silently mix their latents. Full hashing
    runs at disk speed (about 1-2 GB/s: seconds for the 9 GB T5), once per process thanks to the
    cache, which is small next to encoding a dataset.
    """
    root = check_model_folder(path, [part])
    folder = root / part
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    per_file = {p.relative_to(folder).as_posix(): _file_sha256(p) for p in files}
    total = hashlib.sha256()
    for name, digest in per_file.items():
        total.update(f"{name}\0{digest}\n".encode())
    return {
        "part": part,
        "class": _part_class(folder),
        "sha256": total.hexdigest(),
        "files": per_file,
    }
