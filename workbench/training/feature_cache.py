"""Frozen-encoder features computed once, kept on disk, reused across epochs, stages and runs.

Key = encoder fingerprint (weights, layer, preprocessing) + a hash of the image's pixels, so a
changed encoder or preprocessing can never return stale features. Entries are written atomically
(one safetensors file per image) so concurrent runs can share a cache directory.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..assets import home


def image_key(image: Image.Image) -> str:
    h = hashlib.sha1()
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


_FP16_MAX = torch.finfo(torch.float16).max


def storage_dtype(feats: torch.Tensor, wanted: torch.dtype | None = None) -> torch.dtype:
    """The dtype to keep `feats` in: `wanted`, or by default their own 16-bit dtype, and fp32 features as
    fp16 (half the memory, more precision than bf16). Never fp16 for values beyond its range (65504): a
    bf16 encoder's activations can exceed it, and they would be stored as inf."""
    if wanted is None:
        wanted = feats.dtype if feats.dtype in (torch.bfloat16, torch.float16) else torch.float16
    if wanted == torch.float16 and feats.dtype != torch.float16 and feats.numel() \
            and feats.detach().abs().max().item() > _FP16_MAX:
        return feats.dtype if feats.dtype == torch.bfloat16 else torch.float32
    return wanted


class FeatureCache:
    def __init__(self, encoder, root: str | Path | None = None, dtype: torch.dtype | None = None):
        """`dtype`: how entries are kept (None: chosen per entry by `storage_dtype`, never overflowing)."""
        self.encoder = encoder
        self.dtype = dtype
        self.dir = Path(root or home() / "feature-cache") / encoder.fingerprint()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """(M, N, D) features for the images, computing and storing only the ones not cached yet."""
        keys = [image_key(im) for im in images]
        out: list[torch.Tensor | None] = []
        todo: list[int] = []
        for i, key in enumerate(keys):
            feats = self._memory.get(key)
            if feats is None:
                path = self._path(key)
                if path.is_file():
                    try:
                        feats = load_file(str(path))["features"]
                        if not torch.isfinite(feats).all():  # written by a version that overflowed fp16
                            raise ValueError("non-finite cached features")
                        self._memory[key] = feats
                    except Exception:  # a torn or foreign file: recompute it
                        feats = None
            out.append(feats)
            if feats is None:
                todo.append(i)
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels = self.encoder.preprocess([images[i] for i in chunk])
            with torch.no_grad():
                feats = self.encoder(pixels).to("cpu")
            for i, f in zip(chunk, feats):
                f = f.to(storage_dtype(f, self.dtype)).contiguous()
                self._store(keys[i], f)
                out[i] = f
        common = out[0].dtype  # type: ignore[union-attr]
        for f in out[1:]:
            common = torch.promote_types(common, f.dtype)  # type: ignore[union-attr]
        return torch.stack([f.to(common) for f in out])  # type: ignore[union-attr]

    def _store(self, key: str, feats: torch.Tensor) -> None:
        self._memory[key] = feats
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"features": feats}, tmp)
        os.replace(tmp, path)
