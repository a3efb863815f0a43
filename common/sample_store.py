"""Validation prompts kept in a latent store, so training never loads T5 for them.

    cogfun precompute --data D --out latents.zarr --validation-prompts prompts.txt
    cogfun train --latents latents.zarr --validation-prompts store --validation-steps 500

`cogfun precompute --validation-prompts FILE` (a text file, one prompt per line) encodes the prompts
and training's validation negative prompt ("bad detailed") with the same T5 load that encodes the
captions, and writes them beside the store's arrays as `STORE/validation_prompts.safetensors`, in the
`cogfun encode-prompts` format (`cogfun.common.sample_inputs`), written whole like the store's
`probes.json` (`Location.write`: a local store or an object store alike). `cogfun train
--validation-prompts store` reads it from the first `--latents` store that holds one.

The file is not part of the store's fingerprint or plan digest: validation prompts change no training
sample, so adding, changing or leaving them out never makes an otherwise identical store mismatch
(a store built without them is the same store, byte for byte, and a rerun with other prompts only
rewrites this file). A rerun with the same prompts, negative prompt, T5 files and token length keeps
the file as it is and does not load T5 for it.
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from cogfun.common import sample_inputs as si
from cogfun.common.store import Location, location
from torch import Tensor

STORE_FILE = "validation_prompts.safetensors"
NEGATIVE_PROMPT = "bad detailed"  # the original trainer's validation negative prompt
HEADER_LIMIT = 100 << 20  # safetensors' own bound on a header's size
FROM_STORE = "store"  # `cogfun train --validation-prompts store`

log = logging.getLogger("cogfun.precompute")


def read_prompt_lines(path: Path, flag: str = "--validation-prompts") -> list[str]:
    """The non-empty lines of a prompt text file; a missing or empty file is refused by name."""
    if not path.is_file():
        raise ValueError(f"{flag} {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{flag} {path}: not a UTF-8 text file (one prompt per line)") from err
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{flag} {path}: no prompts in the file (one prompt per line)")
    return texts


def store_prompts_path(store: str | Path | Location) -> Location:
    return location(store) / STORE_FILE


def _metadata(path: Location) -> dict[str, str] | None:
    """The file's safetensors metadata, read from its header alone (two small reads: on an object
    store, two range requests); None when there is no file, {} when it is damaged."""
    head = path.read(0, 8)
    if head is None:
        return None
    try:
        (size,) = struct.unpack("<Q", head)
        if size > HEADER_LIMIT:  # a damaged length: never a read of that many bytes
            return {}
        header = json.loads(path.read(8, size) or b"")
        meta = header.get("__metadata__") or {}
        return {str(k): str(v) for k, v in meta.items()}
    except (struct.error, ValueError, AttributeError):  # damaged: rewritten, never trusted
        return {}


def is_current(
    store: str | Path | Location, texts: list[str], text_encoder_sha256: str, max_length: int
) -> bool:
    """Whether the store already holds these prompts, encoded by these T5 files at this length."""
    meta = _metadata(store_prompts_path(store))
    if meta is None:
        return False
    return (
        meta.get("format") == si.EMBEDS_FORMAT
        and meta.get("prompts") == json.dumps(texts)
        and meta.get("negative_prompt") == NEGATIVE_PROMPT
        and meta.get("text_encoder_sha256") == text_encoder_sha256
        and meta.get("max_length") == str(max_length)
    )


def write_store_prompts(
    store: str | Path | Location,
    texts: list[str],
    embeds: Tensor,
    negative: Tensor,
    text_encoder_sha256: str,
) -> Location:
    """Write the prompts' (N, L, D) and the negative prompt's (1, L, D) embeddings into the store,
    whole (`Location.write`), so a kill never leaves half a file. The bytes are those of
    `cogfun encode-prompts` (made in a local scratch folder, then stored)."""
    target = store_prompts_path(store)
    with tempfile.TemporaryDirectory(prefix="cogfun-prompts-") as scratch:
        made = Path(scratch) / STORE_FILE
        si.save_prompt_embeds(made, texts, embeds, NEGATIVE_PROMPT, negative, text_encoder_sha256)
        target.write(made.read_bytes())
    return target


def store_prompts_todo(
    prompt_file: Path, store: str | Path | Location, text_encoder_sha256: str, max_length: int
) -> list[str]:
    """The prompts of `prompt_file` still to encode into `store` (none when it holds them)."""
    texts = read_prompt_lines(prompt_file)
    if is_current(store, texts, text_encoder_sha256, max_length):
        log.info("the store already holds these %d validation prompt(s)", len(texts))
        return []
    return texts


def encode_store_prompts(
    store: str | Path | Location,
    texts: list[str],
    encode: Callable[[list[str]], Tensor],
    batch: int,
    text_encoder_sha256: str,
) -> Location:
    """Encode the prompts (`batch` at a time) and the negative prompt; write them into `store`."""
    parts = [encode(texts[i : i + batch]) for i in range(0, len(texts), batch)]
    embeds = torch.cat([*parts, encode([NEGATIVE_PROMPT])])
    path = write_store_prompts(store, texts, embeds[:-1], embeds[-1:], text_encoder_sha256)
    log.info("encoded %d validation prompt(s) into %s", len(texts), path)
    return path


def find_store_prompts(stores: list[str | Path | Location]) -> Location:
    """The prompts file of the first store that has one; the error says how to make one."""
    for store in stores:
        path = store_prompts_path(store)
        if path.is_file():
            return path
    named = " ".join(map(str, stores))
    raise FileNotFoundError(
        f"--validation-prompts {FROM_STORE}: no store at --latents ({named}) holds validation "
        f"prompts ({STORE_FILE}); encode them into it with `cogfun precompute "
        "--validation-prompts FILE` (same other options: the store is kept), or give the prompts "
        "to `cogfun train --validation-prompts` directly"
    )
