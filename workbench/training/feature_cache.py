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


class FeatureCache:
    def __init__(self, encoder, root: str | Path | None = None, dtype: torch.dtype = torch.float16):
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
                feats = self.encoder(pixels).to("cpu", self.dtype)
            for i, f in zip(chunk, feats):
                f = f.contiguous()
                self._store(keys[i], f)
                out[i] = f
        return torch.stack(out)  # type: ignore[arg-type]

    def _store(self, key: str, feats: torch.Tensor) -> None:
        self._memory[key] = feats
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file({"features": feats}, tmp)
        os.replace(tmp, path)
