"""Ranks of a tensor-parallel replica as Ray actors (rank 0 is the engine's own process)."""
from executor.ray_ranks import start_followers

__all__ = ["start_followers"]
