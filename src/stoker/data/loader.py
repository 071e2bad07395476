"""A stateless-by-design, resumable, rescalable loader over packed token shards.

The data set is cut into windows of seq_len + 1 tokens (stride seq_len, never crossing a
shard). Each epoch visits every window once, in an order given by a permutation seeded
with (seed, epoch). Global sample g = step * batch_size + i is window perm[g % n] of epoch
g // n. A process takes its contiguous slice of the global batch, so the samples a step
sees depend on the step alone, not on how many processes share it: resuming on another
process count continues exactly the same sample stream. The only state is the step.
"""

from __future__ import annotations

import numpy as np
import torch


class TokenWindows:
    """Fixed-length windows over a list of 1-D token arrays (one per shard)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int):
        self.shards = shards
        self.seq_len = seq_len
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        if self.offsets[-1] == 0:
            total = sum(len(s) for s in shards)
            # Shards from load_split are memory maps: their names tell the user which split it is.
            names = ", ".join(str(s.filename) for s in shards if getattr(s, "filename", None))
            raise ValueError(f"{names or 'the data'} holds {total} tokens: too few for one window of seq_len "
                             f"{seq_len} + 1; use a shorter seq_len, or prepare more text")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        start = (idx - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)


class DataLoader:
    def __init__(
        self,
        windows: TokenWindows,
        batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        shuffle: bool = True,
    ):
        if batch_size % dp_world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the data-parallel size {dp_world}")
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.shuffle = shuffle
        self.step = 0
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            n = len(self.windows)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._cached = (epoch, perm)
        return self._cached[1]

    def global_indices(self, step: int) -> list[int]:
        """Window indices of the whole global batch of `step`."""
        n = len(self.windows)
        out = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._perm(g // n)[g % n]))
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of the global batch of `step`: inputs and targets, (B_local, T) each."""
        local = self.batch_size // self.dp_world
        idx = self.global_indices(step)[self.dp_rank * local : (self.dp_rank + 1) * local]
        data = torch.from_numpy(np.stack([self.windows[i] for i in idx]))  # (B_local, T + 1)
        if data.dim() == 3:  # (B_local, 2, T + 1): tokens, and targets with -100 where no loss (tuning records)
            return data[:, 0, :-1].contiguous(), data[:, 1, 1:].contiguous()
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def tasks(self, step: int) -> torch.Tensor | None:
        """This process's rows' tasks for `step`, aligned with batch(step), where windows have
        tasks (tuning records); else None."""
        if not hasattr(self.windows, "task"):
            return None
        local = self.batch_size // self.dp_world
        idx = self.global_indices(step)[self.dp_rank * local : (self.dp_rank + 1) * local]
        return torch.tensor([self.windows.task(i) for i in idx])

    def target_count(self, step: int) -> int | None:
        """Targets that count in the whole global batch of `step`, when windows mask some
        (tuning records: -100 where no loss); None when every target counts."""
        if not getattr(self.windows, "masked", False):
            return None
        return sum(int((self.windows[i][1, 1:] != -100).sum()) for i in self.global_indices(step))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.windows.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "seq_len"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(
                    f"cannot resume the data stream: checkpoint has {key}={state[key]}, this run has {mine}"
                )
        self.step = int(state["step"])
