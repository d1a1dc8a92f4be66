"""This process's place in a launch of several (torchrun, ``accelerate launch``, an MPI launcher),
read from the environment the launcher sets. transformers and accelerate only learn it once
``TrainingArguments`` sets up the process group, and on a CPU-only machine ``PartialState`` reports a
single process before that: the plan needs it earlier (the global batch, who writes files)."""

from __future__ import annotations

import os

# torchrun and accelerate; Open MPI; MPICH and Intel MPI
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def _first(variables: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[name]) for name in variables if os.environ.get(name)), default)


def world_size() -> int:
    """How many processes train together (1 when not launched as several)."""
    return _first(WORLD_SIZE_VARIABLES, 1)


def rank() -> int:
    """This process's rank; 0 writes the files and evaluates."""
    return _first(RANK_VARIABLES, 0)


def is_main_process() -> bool:
    return rank() == 0
