"""The LSTM policy over subnets (EWS's controller, in the style of ENAS).

An ``nn.LSTMCell`` walks the blocks in forward order. At each block it draws which paths to keep,
then, for each kept path in index order and each of its layers, which channels to keep. Every
decision has its own linear head on the hidden state (its logits) and its own embedding table; the
next step's input is the mean embedding of the items just chosen, the first input a learned vector.

A decision that keeps all its items (e.g. both paths of a 2-path block at rho > 0.5) is certain: it
takes the items in index order with probability 1 and adds nothing to log-prob or entropy, rather
than drawing an order that cannot change the subnet and would only add variance to REINFORCE.

``objective='authors'`` is the reference position of the EWS authors' code: per decision, their
per-item log-softmax sum and per-item entropy term (``authors_log_prob_and_entropy``), certain
decisions included (their code draws and scores those too), so every decision gets a head. What
stays different is the parametrisation: the authors share one path head and one channel head
(``w_path``, ``w_channel``, cut to each decision's first n outputs) and one embedding table per
block; here every decision has its own head and table (README's differences table).

Samples are walked as a batch: every sample takes the same sequence of steps, and a step of a path
that a sample dropped leaves that sample's state, log-prob and entropy untouched, so the batch is
exactly C independent walks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from advews.subnets.apply import Subnet
from advews.errors import AdvewsError
from advews.subnets.plackett_luce import authors_log_prob_and_entropy, log_prob_and_entropy, sample_ordered
from advews.subnets.space import BlockShape, keep_count


class Samples(NamedTuple):
    """C sampled subnets (indices in draw order) and their log-probabilities and entropy estimates."""

    subnets: List[Subnet]
    log_prob: torch.Tensor
    entropy: torch.Tensor


@dataclass(frozen=True)
class _Decision:
    index: int
    n: int
    k: int


@dataclass(frozen=True)
class _BlockPlan:
    paths: _Decision
    layers: Tuple[Tuple[_Decision, ...], ...]  # per path, one decision per layer


OBJECTIVES = ("exact", "authors")


class Controller(nn.Module):
    """pi_theta over the subnets of width ``rho`` of a space of shape ``space_shape``; ``objective``:
    the exact Plackett-Luce log-prob and entropy, or the authors' per-item terms (module docstring)."""

    def __init__(self, space_shape: Sequence[BlockShape], rho: float, hidden: int = 100, objective: str = "exact"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise AdvewsError(f"ControllerSearch.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.objective = objective
        decisions: List[_Decision] = []

        def new(n: int) -> _Decision:
            decisions.append(_Decision(len(decisions), n, keep_count(n, rho)))
            return decisions[-1]

        self.plan = tuple(
            _BlockPlan(new(len(block)), tuple(tuple(new(c) for c in path) for path in block))
            for block in space_shape
        )
        self.hidden = hidden
        self.start = nn.Parameter(torch.empty(hidden))
        self.cell = nn.LSTMCell(hidden, hidden)
        self.embeds = nn.ModuleList(nn.Embedding(d.n, hidden) for d in decisions)
        scored = [d for d in decisions if d.k < d.n or objective == "authors"]
        self.heads = nn.ModuleDict({str(d.index): nn.Linear(hidden, d.n) for d in scored})
        for p in self.parameters():  # ENAS init: small weights, a near-uniform initial policy
            nn.init.uniform_(p, -0.1, 0.1)

    def sample(self, n: int = 1, generator: Optional[torch.Generator] = None) -> Samples:
        """Draw ``n`` subnets; log_prob and entropy carry gradients (wrap in no_grad when not needed)."""
        draws, log_prob, entropy = self._walk(n, None, generator)
        return Samples(self._subnets(n, draws), log_prob, entropy)

    def evaluate(self, subnets: Sequence[Subnet]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact log-probability of each subnet's ordered draw, and the matching entropy estimate."""
        _, log_prob, entropy = self._walk(len(subnets), self._draws(subnets), None)
        return log_prob, entropy

    def log_prob(self, subnets: Sequence[Subnet]) -> torch.Tensor:
        """Exact log-probability of each subnet read as an ordered draw (see ``Subnet``)."""
        return self.evaluate(subnets)[0]

    def _walk(
        self, n: int, given: Optional[Dict[int, torch.Tensor]], generator: Optional[torch.Generator]
    ) -> Tuple[Dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        device = self.start.device
        h = torch.zeros(n, self.hidden, device=device)
        state = (h, torch.zeros_like(h))
        x = self.start.expand(n, -1)
        log_prob = torch.zeros(n, device=device)
        entropy = torch.zeros(n, device=device)
        draws: Dict[int, torch.Tensor] = {}
        for block in self.plan:
            d = block.paths
            x, state, draws[d.index], lp, ent = self._decide(d, x, state, given, generator)
            log_prob, entropy = log_prob + lp, entropy + ent
            kept = torch.zeros(n, d.n, dtype=torch.bool, device=device).scatter_(1, draws[d.index], True)
            for p, layers in enumerate(block.layers):
                active = kept[:, p]
                if not layers or not active.any():
                    continue
                a = active[:, None]
                for d in layers:
                    x2, (h2, c2), draws[d.index], lp, ent = self._decide(d, x, state, given, generator)
                    x, state = torch.where(a, x2, x), (torch.where(a, h2, state[0]), torch.where(a, c2, state[1]))
                    log_prob = log_prob + torch.where(active, lp, 0.0)
                    entropy = entropy + torch.where(active, ent, 0.0)
        return draws, log_prob, entropy

    def _decide(self, d: _Decision, x, state, given, generator):
        h, c = self.cell(x, state)
        n = x.shape[0]
        certain = torch.arange(d.n, device=x.device).expand(n, -1)
        if str(d.index) not in self.heads:
            zero = torch.zeros(n, device=x.device)
            return self.embeds[d.index](certain).mean(1), (h, c), certain, zero, zero
        logits = self.heads[str(d.index)](h)
        if d.k == d.n:
            draw = certain
        else:
            draw = given[d.index] if given is not None else sample_ordered(logits, d.k, generator)
        if self.objective == "authors":
            lp, ent = authors_log_prob_and_entropy(logits, draw)
        else:
            lp, ent = log_prob_and_entropy(logits, draw)
        return self.embeds[d.index](draw).mean(1), (h, c), draw, lp, ent

    def _subnets(self, n: int, draws: Dict[int, torch.Tensor]) -> List[Subnet]:
        rows = {i: t.tolist() for i, t in draws.items()}
        out = []
        for s in range(n):
            paths, channels = [], []
            for block in self.plan:
                kept = tuple(rows[block.paths.index][s])
                paths.append(kept)
                channels.append(tuple(tuple(tuple(rows[d.index][s]) for d in block.layers[p]) for p in kept))
            out.append(Subnet(tuple(paths), tuple(channels)))
        return out

    def _draws(self, subnets: Sequence[Subnet]) -> Dict[int, torch.Tensor]:
        """Per decision, the (C, k) draws of the given subnets (a placeholder where a path is dropped)."""
        rows: Dict[int, List[List[int]]] = {}
        for sub in subnets:
            if len(sub.paths) != len(self.plan):
                raise ValueError(f"subnet has {len(sub.paths)} blocks, controller has {len(self.plan)}")
            for block, kept, chans in zip(self.plan, sub.paths, sub.channels):
                rows.setdefault(block.paths.index, []).append(_checked(kept, block.paths))
                for p, layers in enumerate(block.layers):
                    for l, d in enumerate(layers):
                        row = _checked(chans[kept.index(p)][l], d) if p in kept else list(range(d.k))
                        rows.setdefault(d.index, []).append(row)
        device = self.start.device
        return {i: torch.tensor(r, dtype=torch.long, device=device) for i, r in rows.items()}


def _checked(idx: Sequence[int], d: _Decision) -> List[int]:
    if len(idx) != d.k or len(set(idx)) != d.k or not all(0 <= i < d.n for i in idx):
        raise ValueError(f"expected {d.k} distinct indices below {d.n}, got {tuple(idx)}")
    return list(idx)
