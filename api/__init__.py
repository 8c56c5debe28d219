"""The FastAPI service over gcodefp_core.runtime (api.app:app)."""
import os

# numpy's BLAS (OpenBLAS) would start a thread per core for each small matrix product a request makes
# (operation-template matches, normalisation): on a server whose workers already use every core those
# threads only spin. With 2 threads, a /stream template match cost 4x the CPU of one thread
# (benchmarks/program_tracker_cost.py). Set before numpy is first imported; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
