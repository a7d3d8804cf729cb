"""Which process of a data-parallel run this is, before any process group exists.

Data-parallel training runs one process per device: Lightning's own launcher adds them to a
`trimflow <stage>` command, torchrun or SLURM starts them all. Every process runs the stage up
to the end of training; rank 0 alone writes models, history and MLflow runs.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """False in the processes of rank > 0, known from their launcher's environment: torchrun
    sets RANK, SLURM SLURM_PROCID, Lightning's own launcher LOCAL_RANK (and NODE_RANK on other
    nodes) in the processes it adds."""
    for variable in ("RANK", "SLURM_PROCID"):
        if variable in os.environ:
            return os.environ[variable] == "0"
    return all(os.environ.get(variable, "0") == "0" for variable in ("LOCAL_RANK", "NODE_RANK"))
