"""Classifiers built from a `NetworkSpec`, split into a body (features -> h) and a linear head."""

from __future__ import annotations

import torch
from torch import nn

from models.spec import NetworkSpec

__all__ = ["Classifier", "build_network", "WEIGHT_LAYER_TYPES"]

WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class Classifier(nn.Module):
    """The aggregators need the penultimate representation h, so it is a first-class output."""

    scorer_kind = "classifier"

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        self.body = _build_body(spec)
        self.head = nn.Linear(spec.hidden_dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h

    # -- the scorer interface shared with pair models (`models.scorer`): a classifier's output for an item is
    # the same for every query, so the query is ignored
    def prepare(self, query: torch.Tensor | None) -> None:
        return None

    def score_prepared(self, prepared: None, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_with_hidden(items)

    def score(self, query: torch.Tensor | None, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_with_hidden(items)

    def weight_layers(self) -> list[nn.Module]:
        """Linear/Conv layers in order, head last: the units of all but the head are prunable."""
        return [m for m in self.body if isinstance(m, WEIGHT_LAYER_TYPES)] + [self.head]


def build_network(spec: NetworkSpec) -> Classifier:
    return Classifier(spec)


def _build_body(spec: NetworkSpec) -> nn.Sequential:
    layers: list[nn.Module] = []
    if spec.kind == "mlp":
        width = spec.input_dim
    else:
        conv, pool = (nn.Conv1d, nn.MaxPool1d) if spec.kind == "cnn1d" else (nn.Conv2d, nn.MaxPool2d)
        shape = (1, spec.input_dim) if spec.kind == "cnn1d" else (1, spec.image_side, spec.image_side)
        layers.append(nn.Unflatten(1, shape))
        in_ch = 1
        for out_ch in spec.channels:
            layers += [conv(in_ch, out_ch, spec.kernel_size, padding=spec.kernel_size // 2), nn.ReLU(), pool(2)]
            in_ch = out_ch
        layers.append(nn.Flatten())
        width = in_ch * spec.conv_output_size()
    for out in spec.hidden:
        layers += [nn.Linear(width, out), nn.ReLU()]
        width = out
    return nn.Sequential(*layers)
