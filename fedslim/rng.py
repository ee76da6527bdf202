"""Independent random streams per (round, client, purpose), all derived from one seed.

A stream depends only on its key, never on what ran before it, so a run is reproducible whatever
the backend, the number of workers or the round it was resumed from.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

# Fixed ids keep streams stable when purposes are added; unknown purposes hash by name.
_PURPOSES = {"sample": 1, "train": 2, "partition": 3, "init": 4, "codec_up": 5, "codec_down": 6,
             "devices": 7, "submodel": 8, "eval": 9, "explore": 10, "search": 11}


def purpose_id(purpose: str) -> int:
    return _PURPOSES.get(purpose) or (zlib.crc32(purpose.encode()) | (1 << 31))


def stream_seed(seed: int, purpose: str, round_: int = 0, client: int = 0) -> int:
    """A 63-bit seed for one stream."""
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(purpose_id(purpose), round_ + 1, client + 1))
    return int(ss.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def torch_gen(seed: int, purpose: str, round_: int = 0, client: int = 0,
              device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, purpose, round_, client))
    return g


def np_gen(seed: int, purpose: str, round_: int = 0, client: int = 0) -> np.random.Generator:
    return np.random.default_rng(stream_seed(seed, purpose, round_, client))
