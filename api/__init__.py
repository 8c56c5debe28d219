"""The FastAPI service over gcodefp_core.runtime (api.app:app)."""
import os

# numpy's BLAS (OpenBLAS) runs a thread per core for each small matrix product a request makes
# (operation-template matches, normalisation): on a server whose workers already use every core those
# threads only spin. With 2 threads, a /stream template match cost 4x the CPU of one thread
# (benchmarks/program_tracker_cost.py). The variable covers a process that has not loaded numpy yet
# (uvicorn's spawned workers); threadpoolctl one that has (`gcodefp serve --workers 1` runs in the
# CLI's process). An explicit OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy  # noqa: E402,F401  (loads the BLAS that the limit applies to)
from threadpoolctl import threadpool_limits  # noqa: E402

_threads = os.environ["OPENBLAS_NUM_THREADS"]
threadpool_limits(int(_threads) if _threads.isdigit() and int(_threads) > 0 else 1, user_api="blas")
