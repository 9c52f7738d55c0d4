"""glm52_train: a Megatron-Core pretraining stack for GLM-5.2 (744B-A40B, MLA + DSA + MoE)."""

from glm52_train.compat import early as _early

__version__ = "0.1.0"

_early.install()  # before anything imports Megatron-Core (compatibility item 16)
