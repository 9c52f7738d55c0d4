"""glm52_train: a Megatron-Core pretraining stack for GLM-5.2 (744B-A40B, MLA + DSA + MoE)."""

__version__ = "0.1.0"
