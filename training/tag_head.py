"""The short-tag classification head: one linear layer on the L2-normalised image embedding.

It sees exactly what the served image tower outputs, so the exported head (sigmoid in-graph) runs on the
gateway's embeddings unchanged. Biases start at each tag's log-odds in the training data, so the first
steps do not spend themselves learning the tag frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TagHead(nn.Module):
    def __init__(self, embed_dim: int, num_tags: int, frequencies: list[float] | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, num_tags)
        nn.init.normal_(self.linear.weight, std=embed_dim**-0.5)
        with torch.no_grad():
            if frequencies:
                self.linear.bias.copy_(torch.tensor([math.log(p / (1 - p)) for p in frequencies]))
            else:
                self.linear.bias.fill_(-math.log(max(num_tags, 2)))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_tags] (apply a sigmoid for probabilities)."""
        return self.linear(embeddings)
