"""Where the rollout engines live: engines laid out data-parallel over the training ranks.

With `--rollout-num-gpus-per-engine N` (slime's name; N is the engine's tensor-parallel size) a job of W ranks
runs `W / N` colocated engines; engine `e` spans ranks `[e N, (e + 1) N)` and is driven by its first rank, the
leader. On CPU every rank (N = 1) runs its own in-process engine. Remote engines (SGLang servers) are not laid
out on the ranks: every rank is then a client of them (`clients_per_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLayout:
    world: int
    gpus_per_engine: int = 1

    def __post_init__(self) -> None:
        if self.gpus_per_engine < 1 or self.world % self.gpus_per_engine:
            raise ValueError(f"--rollout-num-gpus-per-engine {self.gpus_per_engine} must divide the world size "
                             f"{self.world}")

    @property
    def engines(self) -> int:
        return self.world // self.gpus_per_engine

    def engine_of(self, rank: int) -> int:
        return rank // self.gpus_per_engine

    def leader(self, engine: int) -> int:
        return engine * self.gpus_per_engine

    def is_leader(self, rank: int) -> bool:
        return rank % self.gpus_per_engine == 0

    def ranks(self, engine: int) -> list[int]:
        return list(range(self.leader(engine), self.leader(engine) + self.gpus_per_engine))

    def describe(self) -> str:
        return (f"{self.engines} rollout engine(s) x {self.gpus_per_engine} GPU(s) each "
                f"(engine e on ranks [e*{self.gpus_per_engine}, (e+1)*{self.gpus_per_engine}))")
