"""The store's checksums: of samples (schema 1: one a sample; schema 2: the sample's and one per
mask variant), captions, texts and indexes.

Private helper of `cogfun.common.store`. blake2b, 64 bits, never 0 (0 is "not written").
"""

from __future__ import annotations

import hashlib

import numpy as np


def checksum(parts: list[bytes]) -> int:
    """blake2b-64 over length-prefixed parts, never 0 (0 is the fill value: 'not written')."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return int.from_bytes(h.digest(), "little") or 1


def sample_checksum(
    bucket: str, slot: int, arrays: dict[str, np.ndarray], caption: int, provenance_hash: int
) -> int:
    """Schema 1's checksum of one sample: its stored arrays' exact bytes, caption index,
    provenance hash (schema 2: `sample_checksums`)."""
    parts = [bucket.encode(), int(slot).to_bytes(8, "little")]
    for name in ("latents", "masks", "masked_latents", "all_masked"):
        if name in arrays:
            a = arrays[name]
            parts.append(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    parts += [
        int(caption).to_bytes(8, "little", signed=True),
        int(provenance_hash).to_bytes(8, "little"),
    ]
    return checksum(parts)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def variant_checksum(bucket: str, slot: int, k: int, masks: np.ndarray, masked: np.ndarray) -> int:
    """Checksum of mask variant k of one sample: its mask bits and its stored masked-video bits."""
    head = [
        b"variant",
        bucket.encode(),
        int(slot).to_bytes(8, "little"),
        int(k).to_bytes(8, "little"),
    ]
    return checksum([*head, _bits(masks), _bits(masked)])


def sample_checksums(
    bucket: str,
    slot: int,
    arrays: dict[str, np.ndarray],
    caption: int,
    provenance_hash: int,
    variants: np.ndarray | None = None,
) -> np.ndarray:
    """Schema 2's checksum row of one sample, (1 + K,) uint64: [0] over its latents, all-masked
    flags, caption index, provenance hash and the K variant checksums; [1 + k] `variant_checksum`
    of variant k. `variants` gives the K variant checksums instead of computing them (a reader
    that read one variant checks [0] with the stored ones)."""
    k = arrays["all_masked"].shape[0] if "all_masked" in arrays else 0
    if variants is None:
        variants = np.asarray(
            [
                variant_checksum(bucket, slot, j, arrays["masks"][j], arrays["masked_latents"][j])
                for j in range(k)
            ],
            dtype=np.uint64,
        )
    parts = [bucket.encode(), int(slot).to_bytes(8, "little"), _bits(arrays["latents"])]
    if k:
        parts += [_bits(arrays["all_masked"]), _bits(np.asarray(variants, dtype=np.uint64))]
    parts += [
        int(caption).to_bytes(8, "little", signed=True),
        int(provenance_hash).to_bytes(8, "little"),
    ]
    return np.asarray([checksum(parts), *variants], dtype=np.uint64)


def text_checksum(text: str) -> int:
    return checksum([text.encode()])


def caption_checksum(index: int, embedding: np.ndarray) -> int:
    """Checksum of caption `index`'s embedding bits (L, D)."""
    bits = np.ascontiguousarray(embedding, dtype="<u2").tobytes()
    return checksum([int(index).to_bytes(8, "little"), bits])
