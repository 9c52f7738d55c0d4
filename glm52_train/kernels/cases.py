"""DSA problem shapes for the GPU kernel checks and `bench/dsa.py`, written as one line of text.

    seq=4133                              one causal sequence, every query
    seq=5000,queries=1500                 the last 1500 queries against all 5000 keys
    seq=3000,docs=5                       five packed documents (attention stays in each)
    seq=8192,cp=1/4,docs=3                context-parallel rank 1 of 4: its two load-balanced
                                          chunks of queries against the all-gathered keys
    heads=64,index_heads=32,topk=2048     the other fields (defaults: GLM-5.2's)

Visibility follows `glm52_train.model.sequence.TokenLayout`: key j is visible to query i iff
j <= the query's index in the sample and both sit in the same document.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def cp_token_indices(total: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Indices in the sample of the tokens context-parallel rank `cp_rank` holds: chunks
    `cp_rank` and `2 * cp_size - 1 - cp_rank` of 2 x cp_size (Megatron-Core's causal balance)."""
    if cp_size == 1:
        return torch.arange(total, device=device)
    chunk = total // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    second = torch.arange(second_start, second_start + chunk, device=device)
    return torch.cat([first, second])


@dataclass(frozen=True)
class DSACase:
    seq: int  # keys: the whole sample (all-gathered under context parallelism)
    queries: int | None = None  # only the last `queries` tokens query (None: all, or the CP rank's)
    heads: int = 64  # main attention heads (per tensor-parallel rank)
    index_heads: int = 32
    topk: int = 2048
    docs: int = 1  # packed documents in the sample
    cp: tuple[int, int] | None = None  # (rank, size)

    @classmethod
    def parse(cls, text: str) -> "DSACase":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"bad DSA case item {item!r} in {text!r}; keys: {', '.join(sorted(fields))}")
            if key == "cp":
                rank, _, size = value.partition("/")
                kwargs[key] = (int(rank), int(size))
            else:
                kwargs[key] = int(value)
        if "seq" not in kwargs:
            raise ValueError(f"a DSA case needs seq=N: {text!r}")
        case = cls(**kwargs)
        case.check()
        return case

    def check(self) -> None:
        if self.cp is not None:
            rank, size = self.cp
            if not 0 <= rank < size or self.seq % (2 * size):
                raise ValueError(f"cp={rank}/{size} needs 0 <= rank < size and seq divisible by 2 x size")
            if self.queries is not None:
                raise ValueError("give either queries= or cp=, not both")
        if self.queries is not None and not 0 < self.queries <= self.seq:
            raise ValueError(f"queries={self.queries} must be in 1..seq")
        if not 1 <= self.docs <= self.seq:
            raise ValueError(f"docs={self.docs} must be in 1..seq")

    @property
    def name(self) -> str:
        parts = [f"seq={self.seq}"]
        if self.queries is not None:
            parts.append(f"queries={self.queries}")
        if self.cp is not None:
            parts.append(f"cp={self.cp[0]}/{self.cp[1]}")
        if self.docs > 1:
            parts.append(f"docs={self.docs}")
        parts.append(f"heads={self.heads},topk={self.topk}")
        return ",".join(parts)

    def query_indices(self, device=None) -> torch.Tensor:
        """Index in the sample of every query."""
        if self.cp is not None:
            return cp_token_indices(self.seq, self.cp[1], self.cp[0], device)
        n = self.seq if self.queries is None else self.queries
        return torch.arange(self.seq - n, self.seq, device=device)

    def visibility(self, gen: torch.Generator, device) -> dict:
        """Keyword arguments for the kernel API (`q_pos`, `k_pos`, and the documents when
        packed); an empty dict for the plain causal suffix, so the default path is tested."""
        q_idx = self.query_indices()
        if self.docs == 1 and self.cp is None:
            return {}
        k_idx = torch.arange(self.seq)
        out = dict(q_pos=q_idx.to(device), k_pos=k_idx.to(device))
        if self.docs > 1:
            cuts = (torch.randperm(self.seq - 1, generator=gen)[: self.docs - 1] + 1).sort().values
            k_doc = torch.zeros(self.seq, dtype=torch.long)
            k_doc[cuts] = 1
            k_doc = k_doc.cumsum(0)
            out.update(q_doc=k_doc[q_idx].to(device), k_doc=k_doc.to(device))
        return out

    @property
    def num_queries(self) -> int:
        return int(self.query_indices().numel())


__all__ = ["DSACase", "cp_token_indices"]
