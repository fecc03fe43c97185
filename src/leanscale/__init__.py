"""leanscale: grow models without growing the bill.

Five techniques (large batches, data pruning, compute-optimal scaling, sparse activation and
cascades) measured on one cost ledger. See ``leanscale ls`` for what is available.
"""

__version__ = "0.1.0"
