"""Device populations: which tier (budget, speed, bandwidth) each client is, per round."""

from __future__ import annotations

import numpy as np

from fedslim.config import DevicesConfig, DeviceTier
from fedslim.rng import np_gen


def split_counts(shares: list[float], n: int) -> list[int]:
    """Largest-remainder apportionment of ``n`` items to ``shares`` (sums exactly to n)."""
    w = np.asarray(shares, dtype=float)
    w = w / w.sum()
    raw = w * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


class DevicePopulation:
    def __init__(self, cfg: DevicesConfig, num_clients: int, seed: int):
        self.cfg = cfg
        self.tiers: list[DeviceTier] = list(cfg.tiers)
        self.num_clients = num_clients
        self.seed = seed
        counts = split_counts([t.share for t in self.tiers], num_clients)
        fixed = np.repeat(np.arange(len(self.tiers)), counts)
        if cfg.assignment == "random":
            fixed = fixed[np_gen(seed, "devices").permutation(num_clients)]
        self._fixed = fixed
        self._round_cache: dict[int, np.ndarray] = {}

    def tier_index(self, round_: int, client: int) -> int:
        return int(self.assignment(round_)[client])

    def tier(self, round_: int, client: int) -> DeviceTier:
        return self.tiers[self.tier_index(round_, client)]

    def assignment(self, round_: int) -> np.ndarray:
        if self.cfg.assignment != "dynamic":
            return self._fixed
        if round_ not in self._round_cache:
            p = np.asarray([t.share for t in self.tiers], dtype=float)
            self._round_cache = {round_: np_gen(self.seed, "devices", round_).choice(
                len(self.tiers), size=self.num_clients, p=p / p.sum())}
        return self._round_cache[round_]

    def client_time(self, tier: DeviceTier, bytes_down: int, bytes_up: int, train_macs: float) -> float:
        """Simulated seconds for one client: download + compute + upload."""
        return (bytes_down * 8 / (tier.down_mbps * 1e6) + train_macs / tier.macs_per_s
                + bytes_up * 8 / (tier.up_mbps * 1e6))
