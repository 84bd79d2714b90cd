"""Geometry of the threat model: random starts in, steepest-ascent steps for, and projection onto the
eps-ball (Linf or L2, per example) intersected with the [0, 1] pixel box.

The operation order follows torchattacks' PGD / PGDL2 exactly so results agree to float rounding.
"""

from __future__ import annotations

import torch

_TINY = 1e-10  # keeps the L2 direction finite for a zero gradient (torchattacks' eps_for_division)


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A random point of the ball around ``x``, clipped to [0, 1].

    Linf: uniform in the cube. L2: a gaussian direction at radius eps * U(0, 1) (torchattacks' scheme);
    not volume-uniform, which in high dimension would put nearly every start on the sphere.
    """
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.randn_like(x)
        length = _per_example_norm(delta)
        delta = delta * (torch.rand_like(length) / length * eps)
    return torch.clamp(x + delta, min=0, max=1)


def normal_start(x: torch.Tensor, sigma: float = 0.001, clamp: bool = False) -> torch.Tensor:
    """``x + sigma * N(0, 1)``: the start of the TRADES and MART reference attacks.

    The references feed it to the model unclipped (``clamp=False``); the first step's projection
    then brings it back into the ball and [0, 1]. With ``clamp=True`` the start is first projected
    into [0, 1]: a different first gradient at the pixels the noise pushed out of the box, which
    saturated MNIST/CIFAR images have many of, so trajectories then part (see ``TradesKL``).
    """
    start = x + sigma * torch.randn_like(x)
    return start.clamp(0, 1) if clamp else start


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    """Move ``step_size`` along the steepest-ascent direction of the norm: sign(g) or g / ||g||_2."""
    if norm == "Linf":
        return x_adv + step_size * grad.sign()
    return x_adv + step_size * (grad / (_per_example_norm(grad) + _TINY))


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Nearest point of (eps-ball around ``x``) then clip to [0, 1]; clipping never leaves the ball."""
    delta = x_adv - x
    if norm == "Linf":
        delta = torch.clamp(delta, min=-eps, max=eps)
    else:
        delta = delta * torch.clamp(eps / _per_example_norm(delta).clamp_min(_TINY), max=1.0)
    return torch.clamp(x + delta, min=0, max=1)
