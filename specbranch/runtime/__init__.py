"""Where the two models run: in one process, taking turns (the engines themselves), or as two
concurrent worker processes talking over ``torch.distributed`` (this package).

- :mod:`.messages`  what the coordinator and the draft worker say to each other, and how
- :mod:`.worker`    the draft worker process (rank 1)
- :mod:`.process`   that process as the coordinator sees it: start, health, stop
- :mod:`.parallel`  the coordinator's engine (rank 0: target + verification)
- :mod:`.placement` cores and threads per worker
"""

from .parallel import ParallelEngine
from .placement import Placement, worker_placements
from .process import DraftWorker

__all__ = ["DraftWorker", "ParallelEngine", "Placement", "worker_placements"]
