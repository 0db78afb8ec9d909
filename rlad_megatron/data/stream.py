"""The training prompt stream: endless, seeded, shuffled once per epoch; `position` is its resume state."""

from __future__ import annotations

import random

from rlad_megatron.data.prompts import PromptSample


class PromptStream:
    """Prompt `i` of the stream is `samples[perm_e[i mod n]]` with `e = i // n` and `perm_e` a permutation that is a
    pure function of `(seed, e)`: the stream is the same whatever batch sizes it is read in, and `position` (prompts
    consumed) is all a resumed run needs."""

    def __init__(self, samples: list[PromptSample], seed: int, position: int = 0) -> None:
        if not samples:
            raise ValueError("the prompt set is empty")
        self.samples, self.seed, self.position = samples, seed, position
        self._epoch, self._cached_order = -1, []

    def _order(self, epoch: int) -> list[int]:
        """The epoch's permutation (computed once per epoch)."""
        if epoch != self._epoch:
            self._cached_order = list(range(len(self.samples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._cached_order)
            self._epoch = epoch
        return self._cached_order

    def next_batch(self, n: int) -> list[PromptSample]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.samples))
            out.append(self.samples[self._order(epoch)[i]])
            self.position += 1
        return out
