"""A subnet as a value, and ``with subnet(model, alpha): ...`` to run the model as that subnet.

Masked channels are zeroed and dropped paths are multiplied by 0, rather than slicing the weights
into a smaller net. A plain conv (``nn.Conv1d/2d/3d`` with groups 1) or ``nn.Linear`` consuming the
channels runs with its weight's input channels masked, ``conv(x, W * m)``, which equals
``conv(x * m, W)`` (the products of masked channels are zero either way) but saves no masked copy of
the activation for the backward: the subnet's graph is the full net's. Any other consuming module
gets its input multiplied by the mask (a forward pre-hook). Zeroing keeps every tensor shape, so
one compiled graph serves the full net and every subnet, BN parameters need no slicing and
gradients reach the full net's weights directly; the price is that a subnet forward costs a full
forward. Measured with input masks (1 CPU thread, forward + backward, median of 12): PreAct
ResNet-18 at batch 32x3x32x32 1.25 s full, 1.35 s as a rho-0.7 subnet, 1.20 s with all-ones masks; the small MNIST net
at batch 64 93, 92 and 100 ms, within the run-to-run noise (~10% on a shared machine). Peak memory
of an AT_EWS step over AT (``benchmarks/peak_memory.py``, CPU RSS, median of 5): 1.17x with input
masks, 1.06x with weight masks.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from advews.subnets.space import LayerSpace, SubnetSpace, discover

Indices = Tuple[int, ...]


def _ints(seq: Sequence[int]) -> Indices:
    return tuple(int(i) for i in seq)


@dataclass(frozen=True, order=True)
class Subnet:
    """Which paths and channels a subnet keeps.

    ``paths[b]``: indices of the kept paths of block b. ``channels[b][j]``: for the j-th kept path of
    block b (the path ``paths[b][j]``), one tuple of kept channel indices per layer of that path.
    Indices keep the order they were given in: the controller gives them in draw order, so the value
    also records its ordered draw (needed for an exact log-prob); ``canonical()`` sorts them, for set
    semantics when hashing or counting distinct subnets. Masks ignore the order.
    """

    paths: Tuple[Indices, ...]
    channels: Tuple[Tuple[Tuple[Indices, ...], ...], ...]

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON) to tuples of ints, so the value stays hashable.
        object.__setattr__(self, "paths", tuple(_ints(p) for p in self.paths))
        object.__setattr__(
            self, "channels", tuple(tuple(tuple(_ints(l) for l in path) for path in b) for b in self.channels)
        )

    def canonical(self) -> "Subnet":
        """The same subnet with indices sorted (paths, and channels following their path)."""
        paths, channels = [], []
        for kept, chans in zip(self.paths, self.channels):
            order = sorted(range(len(kept)), key=lambda j: kept[j])
            paths.append(tuple(kept[j] for j in order))
            channels.append(tuple(tuple(tuple(sorted(l)) for l in chans[j]) for j in order))
        return Subnet(tuple(paths), tuple(channels))

    def check(self, space: SubnetSpace, rho: Optional[float] = None) -> None:
        """Raise ValueError unless this subnet fits ``space`` (indices in range, no repeats, layers
        match). With ``rho``, also unless it is a width-``rho`` subnet, as every search draws them:
        ``keep_count(n, rho)`` of the n paths of every block and of the n channels of every layer of
        each kept path."""
        from advews.subnets.space import keep_count

        def count(got: int, n: int, what: str) -> None:
            if rho is not None and got != keep_count(n, rho):
                raise ValueError(f"{what}: keeps {got} of {n}, but a width-{rho:g} subnet keeps "
                                 f"keep_count({n}, {rho:g}) = {keep_count(n, rho)}")

        shape = space.shape()
        if len(self.paths) != len(shape) or len(self.channels) != len(shape):
            raise ValueError(f"subnet has {len(self.paths)} blocks, space has {len(shape)}")
        for b, (kept, chans, block) in enumerate(zip(self.paths, self.channels, shape)):
            _check_draw(kept, len(block), f"block {b} paths")
            count(len(kept), len(block), f"block {b} paths")
            if len(chans) != len(kept):
                raise ValueError(f"block {b}: {len(kept)} kept paths but channels for {len(chans)}")
            for p, layers in zip(kept, chans):
                if len(layers) != len(block[p]):
                    raise ValueError(f"block {b} path {p}: {len(block[p])} layers, subnet gives {len(layers)}")
                for l, (idx, c) in enumerate(zip(layers, block[p])):
                    _check_draw(idx, c, f"block {b} path {p} layer {l}")
                    count(len(idx), c, f"block {b} path {p} layer {l} channels")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (nested lists of ints)."""
        return {"paths": [list(p) for p in self.paths],
                "channels": [[[list(l) for l in path] for path in b] for b in self.channels]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Subnet":
        return cls(d["paths"], d["channels"])

    def to_tensor(self, space: SubnetSpace) -> torch.Tensor:
        """Fixed-length int64 form for a broadcast: every item's draw rank (1 = first drawn), 0 = dropped.

        Items are the paths of each block followed by the channels of each layer of each of its paths
        (all zero for a dropped path), so the length is ``space.num_items()`` whatever is kept.
        """
        self.check(space)
        out = []
        for kept, chans, block in zip(self.paths, self.channels, space.shape()):
            out.append(_ranks(kept, len(block)))
            for p, layers in enumerate(block):
                given = chans[kept.index(p)] if p in kept else [()] * len(layers)
                out.extend(_ranks(idx, c) for idx, c in zip(given, layers))
        return torch.tensor([r for ranks in out for r in ranks], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, space: SubnetSpace) -> "Subnet":
        """Inverse of ``to_tensor``."""
        values = t.detach().to("cpu", torch.int64).flatten().tolist()
        if len(values) != space.num_items():
            raise ValueError(f"subnet tensor has {len(values)} entries, space needs {space.num_items()}")
        pos, paths, channels = 0, [], []

        def take(n: int) -> Indices:
            nonlocal pos
            ranks, pos = values[pos:pos + n], pos + n
            return tuple(sorted((i for i in range(n) if ranks[i] > 0), key=lambda i: ranks[i]))

        for block in space.shape():
            kept = take(len(block))
            per_path = [[take(c) for c in layers] for layers in block]
            paths.append(kept)
            channels.append(tuple(tuple(per_path[p]) for p in kept))
        sub = cls(tuple(paths), tuple(channels))
        sub.check(space)
        return sub


def _check_draw(idx: Indices, n: int, what: str) -> None:
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= n:
        raise ValueError(f"{what}: {idx} is not a non-empty set of distinct indices below {n}")


def _ranks(idx: Indices, n: int) -> list:
    ranks = [0] * n
    for r, i in enumerate(idx, 1):
        ranks[i] = r
    return ranks


_SPACES: "weakref.WeakKeyDictionary[nn.Module, SubnetSpace]" = weakref.WeakKeyDictionary()
_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def space_of(model: nn.Module) -> SubnetSpace:
    """``discover(model)``, cached per model object."""
    if model not in _SPACES:
        _SPACES[model] = discover(model)
    return _SPACES[model]


def _drop_path(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    # Multiply rather than replace by zeros: the path's weights stay in the graph (zero gradient),
    # which DistributedDataParallel needs to see every parameter used.
    return output * 0


_MASK, _GATE = "ews_channel_mask", "ews_path_gate"


def _masked_weight(module: nn.Module) -> torch.Tensor:
    w = module.weight
    return w * getattr(module, _MASK).to(dtype=w.dtype)


class _MaskedConv:
    """The forward of a conv whose weight carries the mask (mixed into Conv1d/2d/3d below)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _masked_weight(self), self.bias)


class _MaskedConv1d(_MaskedConv, nn.Conv1d):
    pass


class _MaskedConv2d(_MaskedConv, nn.Conv2d):
    pass


class _MaskedConv3d(_MaskedConv, nn.Conv3d):
    pass


class _MaskedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, _masked_weight(self), self.bias)


# Exact types only: a subclass may have its own forward, which the swap would bypass.
_WEIGHT_MASKED = {nn.Conv1d: _MaskedConv1d, nn.Conv2d: _MaskedConv2d, nn.Conv3d: _MaskedConv3d,
                  nn.Linear: _MaskedLinear}


def _masks_weight(module: nn.Module) -> bool:
    """Whether masking ``module``'s weight along its input channels equals masking its input."""
    return type(module) in _WEIGHT_MASKED and getattr(module, "groups", 1) == 1


def _persistent_mask(module: nn.Module, args: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    x = args[0]
    return x * getattr(module, _MASK).to(dtype=x.dtype)


def _attach_mask(module: nn.Module, mask: torch.Tensor, buffer: bool) -> Callable[[], None]:
    """Mask ``module``'s input channels with ``mask`` (shape 1 x C x 1...): swap in the masked class
    where the weight can carry the mask, else a pre-hook. Returns the undo."""
    if buffer:
        module.register_buffer(_MASK, mask, persistent=False)
    else:
        setattr(module, _MASK, mask)
    if _masks_weight(module):
        cls = type(module)
        module.__class__ = _WEIGHT_MASKED[cls]

        def undo() -> None:
            module.__class__ = cls
            delattr(module, _MASK)

        return undo
    handle = module.register_forward_pre_hook(_persistent_mask)

    def undo_hook() -> None:
        handle.remove()
        delattr(module, _MASK)

    return undo_hook


def _persistent_gate(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * getattr(module, _GATE).to(dtype=output.dtype)


def install_masks(model: nn.Module, space: Optional[SubnetSpace] = None) -> None:
    """Install permanent masks (masked classes or hooks) whose masks are (non-persistent) buffers,
    all ones by default.

    Needed under ``torch.compile``: dynamo does not guard on hooks, so the temporary masks of a
    plain ``subnet`` context would be baked into the compiled graph with the first subnet's masks.
    With installed masks a subnet only rewrites buffer values, which compiled graphs read as inputs:
    every subnet runs correctly without recompiling. The price is one multiply per masked layer (of
    its weight) in full-net forwards too.
    """
    space = space if space is not None else space_of(model)
    if _is_installed(space):
        return
    for block in space.blocks:
        for path in block.paths:
            out = path.output_module
            if not hasattr(out, _GATE):
                ref = next(iter(model.parameters()))
                out.register_buffer(_GATE, torch.ones((), device=ref.device), persistent=False)
                out.register_forward_hook(_persistent_gate)
            for layer in path.layers:
                _attach_mask(layer.module, _ones_mask(layer), buffer=True)


def _ones_mask(layer: LayerSpace) -> torch.Tensor:
    w = layer.module.weight
    return torch.ones(1, layer.channels * layer.group, *[1] * (w.dim() - 2), device=w.device, dtype=w.dtype)


def _columns(layer: LayerSpace, idx: Sequence[int]) -> list:
    """The input columns of ``layer.module`` that the kept channels ``idx`` cover (``group`` each)."""
    g = layer.group
    return [i * g + j for i in idx for j in range(g)]


def _is_installed(space: SubnetSpace) -> bool:
    return any(hasattr(p.output_module, _GATE) for b in space.blocks for p in b.paths)


def _set_installed(space: SubnetSpace, alpha: Optional[Subnet]) -> None:
    """Point the installed buffers at ``alpha``'s masks (None: the full net, all ones).

    Buffers get NEW tensors rather than in-place writes: a subnet forward saved its masks for the
    backward that runs after the context has closed, so they must never change afterwards.
    """
    for b, block in enumerate(space.blocks):
        kept = tuple(range(len(block.paths))) if alpha is None else alpha.paths[b]
        for p, path in enumerate(block.paths):
            gate = getattr(path.output_module, _GATE)
            setattr(path.output_module, _GATE, torch.full_like(gate, 1.0 if p in kept else 0.0))
            for l, layer in enumerate(path.layers):
                mask = getattr(layer.module, _MASK)
                if alpha is None:
                    new = torch.ones_like(mask)
                else:
                    new = torch.zeros_like(mask)
                    if p in kept:
                        new.view(-1)[_columns(layer, alpha.channels[b][kept.index(p)][l])] = 1.0
                setattr(layer.module, _MASK, new)


@contextmanager
def subnet(
    model: nn.Module, alpha: Subnet, space: Optional[SubnetSpace] = None, dropout: bool = True
) -> Iterator[None]:
    """Run ``model`` as the subnet ``alpha`` inside the block; leave it exactly as it was afterwards.

    Inside, every BatchNorm has ``track_running_stats = False``: in train mode it normalises with
    batch statistics and updates neither running statistics nor ``num_batches_tracked``; in eval mode
    it still uses the running statistics. A subnet forward therefore never spoils the statistics the
    full net is evaluated with. ``dropout=False`` puts every dropout module in eval mode inside (the
    authors' switch_to_subnet sets p = 0); ``True`` leaves dropout as the model has it. Hooks, BN and
    dropout flags are restored even when the block raises. Contexts do not nest (masks would
    silently intersect).
    """
    space = space if space is not None else space_of(model)
    alpha.check(space)
    if model in _ACTIVE:
        raise RuntimeError("subnet contexts do not nest: this model is already running as a subnet")
    _ACTIVE.add(model)
    handles, undos, bns, drops, installed = [], [], [], [], False
    try:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                bns.append((m, m.track_running_stats))
                m.track_running_stats = False
            elif not dropout and isinstance(m, _DropoutNd):
                drops.append((m, m.training))
                m.training = False
        installed = _is_installed(space)
        if installed:
            _set_installed(space, alpha)
        else:
            for block, kept, chans in zip(space.blocks, alpha.paths, alpha.channels):
                for p, path in enumerate(block.paths):
                    if p not in kept:
                        handles.append(path.output_module.register_forward_hook(_drop_path))
                for p, layers in zip(kept, chans):
                    for layer, idx in zip(block.paths[p].layers, layers):
                        mask = torch.zeros_like(_ones_mask(layer))
                        mask.view(-1)[_columns(layer, idx)] = 1
                        undos.append(_attach_mask(layer.module, mask, buffer=False))
        yield
    finally:
        if installed:
            _set_installed(space, None)
        for h in handles:
            h.remove()
        for undo in reversed(undos):
            undo()
        for m, track in bns:
            m.track_running_stats = track
        for m, training in drops:
            m.training = training
        _ACTIVE.discard(model)


def set_bn_mode(model: nn.Module, bn: str) -> None:
    """Eval mode everywhere (no dropout), with BatchNorm in ``bn`` mode: 'eval' uses running
    statistics, 'train' batch statistics. Inside a ``subnet`` context neither updates the statistics."""
    model.eval()
    if bn == "train":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.train()
