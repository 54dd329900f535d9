"""lmforge: pretrain, finetune, evaluate and serve Llama-family language models.

Importing the package is cheap: no torch, no transformers. Heavy modules load where they are used.
"""

__version__ = "0.1.0"

import os

# Transparent huge pages for torch's large CPU allocations (weights, KV cache): CPU decode reads every weight once
# a token, and with 4 KB pages the TLB misses cost a third of the read speed (the 0.5B shape's fp32 matrices,
# 2 threads: 34-45 GB/s without, 51-55 with). torch reads this once, at its first allocation, so it is set here,
# before lmforge imports torch; a value the user exported (0 turns it off) wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from lmforge.errors import LmforgeError  # noqa: E402

__all__ = ["LmforgeError", "__version__"]
