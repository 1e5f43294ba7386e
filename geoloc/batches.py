"""Batch sources for the trainer that live in memory (tests, benchmarks, small experiments).

The trainer takes any iterable of ``(cond (B, D) float32, xyz (B, 3) float32)`` batches; if the source has
``state_dict()`` / ``load_state_dict()``, resuming continues its order exactly.
``pipeline.loader.FeatureLoader`` streams the same pairs from a feature store; :class:`InMemoryBatches` serves
tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["InMemoryBatches"]


class InMemoryBatches:
    """Endless seeded epochs over in-memory tensors (a new permutation per epoch, partial batches dropped)."""

    def __init__(self, cond: torch.Tensor, xyz: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        if cond.shape[0] != xyz.shape[0]:
            raise ValueError(f"{cond.shape[0]} conditions but {xyz.shape[0]} points")
        if batch_size > cond.shape[0]:
            raise ValueError(f"batch size {batch_size} exceeds the {cond.shape[0]} rows available")
        self.cond, self.xyz = cond.float(), xyz.float()
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self.dim = cond.shape[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.cond.shape[0]
        per_epoch = n // self.batch_size
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(n, generator=g)
            while self.position < per_epoch:
                idx = perm[self.position * self.batch_size : (self.position + 1) * self.batch_size]
                self.position += 1
                yield self.cond[idx], self.xyz[idx]
            self.epoch, self.position = self.epoch + 1, 0
