# SPDX-License-Identifier: Apache-2.0
"""Seeded, resumable batching of packed blocks.

The whole loader state is one int, ``position`` (batches consumed so far,
across epochs), so it checkpoints with the rest of the training state and a
resumed run sees exactly the batches an uninterrupted run would have seen.
Epoch ``e`` visits the blocks in the order of a permutation seeded with
``(seed, e)``; batch ``position`` is a pure function of
``(blocks, batch_size, seed, position)``.

Exports: ``Batches``.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

from peftjax.data import _pack


@dataclasses.dataclass(frozen=True, eq=False)
class Batches:
    """Position-indexed batches over :class:`~peftjax.data.Blocks`.

    Attributes:
      blocks: the packed blocks.
      batch_size: blocks per batch (``<= N``); a last partial batch of an
        epoch is dropped, so every batch has the same shape.
      seed: the shuffling seed.
      shuffle: ``False`` keeps block order (for evaluation).

    Example:
      >>> import numpy as np
      >>> from peftjax.data import pack
      >>> b = Batches(pack([np.arange(1, 33)], 4), batch_size=2, seed=0)
      >>> b.steps_per_epoch
      4
      >>> b[5]["tokens"].shape
      (2, 4)
      >>> bool((b[5]["tokens"] == b[5]["tokens"]).all())
      True
    """

    blocks: _pack.Blocks
    batch_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        n = self.blocks.tokens.shape[0]
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= n:
            raise ValueError(f"Batches: batch_size must be an int in [1, {n}] for "
                             f"{n} blocks, got {self.batch_size!r}")

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch."""
        return self.blocks.tokens.shape[0] // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The block order of ``epoch`` (a seeded permutation, or ``arange``).

        Args:
          epoch: the epoch number (>= 0).

        Returns:
          int64 block indices ``(N,)``.
        """
        n = self.blocks.tokens.shape[0]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        """Returns batch number ``position`` (>= 0) as a dict of ``(B, T)`` arrays.

        Keys: ``tokens``, ``segment_ids``, ``positions``.
        """
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) \
                or position < 0:
            raise ValueError(f"Batches: position must be an int >= 0, got {position!r}")
        epoch, i = divmod(int(position), self.steps_per_epoch)
        idx = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return {k: getattr(self.blocks, k)[idx] for k in _pack.Blocks._fields}

    def iterate(self, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields ``(position, batch)`` from ``start`` up to ``stop`` (or forever).

        Args:
          start: the first position (e.g. the restored loader position).
          stop: one past the last position; ``None`` for an endless stream.

        Returns:
          An iterator of ``(position, batch)``.
        """
        p = start
        while stop is None or p < stop:
            yield p, self[p]
            p += 1
