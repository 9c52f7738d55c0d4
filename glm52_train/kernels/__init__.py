"""DeepSeek Sparse Attention kernels (Triton) and their float64-capable PyTorch references.

Public entry points live in `glm52_train.kernels.api`: `indexer_topk`, `sparse_mla`,
`indexer_kl_loss` and `mla_lse`. They run the Triton kernels on CUDA tensors and the
references in `reference.py` elsewhere (or Triton's interpreter when asked with
`impl="triton"`). Design notes and the cost model: docs/kernels.md.
"""
