"""Training aggregation gadgets (`models.gadget`) with the network frozen: only its outputs are seen.

One loop for any kind of tuple (`TupleDraw`): classifier tuples (members of one class, `lab.tuples`) and pair
tuples (a query and members of a graded cluster, `models.pair_gadget_training`). Build-time code: serving loads
the stored gadget through `models.gadget` and never imports this module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.gadget import Gadget, GadgetSpec, build_gadget

__all__ = ["GadgetTrainConfig", "TupleDraw", "train_gadget_on", "hidden_of"]


@torch.no_grad()
def hidden_of(model: nn.Module, x: Any, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and hidden representations of every row of x under the (frozen) network, in eval mode."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    parts = [model.forward_with_hidden(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass(frozen=True)
class GadgetTrainConfig:
    """n is drawn uniformly from 1..n_max for every training tuple, so one gadget serves every n."""

    n_max: int = 32
    steps: int = 1500
    batch_tuples: int = 128
    lr: float = 3e-3
    eval_every: int = 100
    val_tuples: int = 1000
    seed: int = 0


TupleDraw = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""`draw(counts, gen) -> (hidden, labels)`: one tuple per entry of `counts`, its members as a contiguous run of
hidden rows (sum(counts) x H) and its shared label; the one thing that differs between classifier tuples (members
of a class) and pair tuples (a query and members of a graded cluster)."""


def train_gadget_on(
    spec: GadgetSpec,
    draw_train: TupleDraw,
    draw_val: TupleDraw,
    standardisation: tuple[torch.Tensor, torch.Tensor],
    config: GadgetTrainConfig = GadgetTrainConfig(),
) -> Gadget:
    """The training loop for any kind of tuple: n ~ U{1..n_max} per tuple, members in random order, Adam with
    cosine decay, the checkpoint with the lowest cross-entropy on one fixed validation draw kept, then the
    standardisation (shift, scale) of the hidden representations folded into the first layer."""
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    gadget = build_gadget(spec)
    gadget.set_standardisation(*standardisation)
    opt = torch.optim.Adam(gadget.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(config.steps, 1))
    val_counts = torch.randint(1, config.n_max + 1, (config.val_tuples,), generator=gen)
    val_hidden, val_labels = draw_val(val_counts, gen)
    if val_hidden.shape[1] != spec.input_dim:
        raise ValueError(f"gadget expects {spec.input_dim}-dim hidden representations, got {val_hidden.shape[1]}")
    best_loss, best_state = math.inf, copy.deepcopy(gadget.state_dict())
    for step in range(1, config.steps + 1):
        gadget.train()
        counts = torch.randint(1, config.n_max + 1, (config.batch_tuples,), generator=gen)
        hidden, labels = draw_train(counts, gen)
        perm = _shuffle_within(counts, gen)  # members are exchangeable: random order
        loss = nn.functional.cross_entropy(gadget(hidden[perm].float(), counts), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(gadget.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % config.eval_every == 0 or step == config.steps:
            gadget.eval()
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(gadget(val_hidden.float(), val_counts), val_labels))
            if val < best_loss:
                best_loss, best_state = val, copy.deepcopy(gadget.state_dict())
    gadget.load_state_dict(best_state)
    gadget.fold_standardisation()
    return gadget.eval()


def _shuffle_within(counts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A permutation of member rows that shuffles rows inside each contiguous run only."""
    seg = torch.repeat_interleave(torch.arange(len(counts)), counts.long())
    keys = seg.double() + torch.rand(len(seg), generator=gen, dtype=torch.float64) * 0.5
    return torch.argsort(keys)
