"""lmforge: pretrain, finetune, evaluate and serve Llama-family language models.

Importing the package is cheap: no torch, no transformers. Heavy modules load where they are used.
"""

__version__ = "0.1.0"

import os


def huge_pages(on: bool) -> None:
    """Whether torch's allocator asks for transparent huge pages for its large CPU blocks (THP_MEM_ALLOC_ENABLE),
    unless the user exported that variable (0 turns it off). torch reads it once, at its first allocation, so the
    `lmforge` command decides it per verb before any tensor exists.

    On for inference: CPU decode reads every weight once a token, and with 4 KB pages the TLB misses cost a third of
    the read speed (the 0.5B shape's fp32 matrices, 2 threads: 34-45 GB/s without, 51-55 with). Off for training:
    a step frees and allocates many large activation and gradient buffers, and each new huge page is faulted and
    zeroed again (a [512, 8192] bf16 -> fp32 copy 0.25 ms without, 10 ms with; the 27M pretrain step ~10% slower)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1" if on else "0")


from lmforge.errors import LmforgeError  # noqa: E402

__all__ = ["LmforgeError", "__version__", "huge_pages"]
