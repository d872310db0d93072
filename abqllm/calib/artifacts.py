"""Per-block calibration results on disk: inspect them, re-apply them, resume an interrupted run.

A folder holds `manifest.json` (what produced the results: model, scheme, method and its settings,
data, seed) and one `block_NNN.safetensors` per finished block, each written atomically, so a
block file exists only when its block finished. Running the same command again skips the blocks
that have a file and re-applies them; a folder made with other settings is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from abqllm.errors import AbqError


class ArtifactStore:
    def __init__(self, folder: str | Path, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())
            if found != self.fingerprint:
                diff = sorted(k for k in set(found) | set(self.fingerprint) if found.get(k) != self.fingerprint.get(k))
                raise AbqError(f"calibration artifacts in {self.folder} were made with other settings ({', '.join(diff)});"
                               " delete that folder or choose another --artifacts folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(manifest, json.dumps(self.fingerprint, indent=2, sort_keys=True))

    def path(self, index: int) -> Path:
        return self.folder / f"block_{index:03d}.safetensors"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def done(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.folder.glob("block_*.safetensors"))

    def load(self, index: int) -> dict[str, torch.Tensor]:
        try:
            return load_file(self.path(index))
        except Exception as e:  # damaged file: say which and how to recover
            raise AbqError(f"{self.path(index)} cannot be read ({e}); delete it to recalibrate that block") from None

    def save(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.path(index).with_suffix(f".tmp-{os.getpid()}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.path(index))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
