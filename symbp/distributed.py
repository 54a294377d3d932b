"""Data-parallel training over MPI: the machinery lives in ``symbp.runtime.mpi``; this name
stays for scripts that import it (``from symbp import distributed``)."""

from .runtime.mpi import Ranks, Step, choose, shard, summer, world

__all__ = ["Ranks", "Step", "choose", "shard", "summer", "world"]
