"""Training tests run torch on one thread: the suite shares two CPU cores with others."""

import torch

torch.set_num_threads(1)
