"""Test session settings: one intra-op thread, so tiny models are fast and timings do not depend on load."""

import torch

torch.set_num_threads(1)
