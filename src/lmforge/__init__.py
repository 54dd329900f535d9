"""lmforge: pretrain, finetune, evaluate and serve Llama-family language models.

Importing the package is cheap: no torch, no transformers. Heavy modules load where they are used.
"""

__version__ = "0.1.0"

from lmforge.errors import LmforgeError

__all__ = ["LmforgeError", "__version__"]
