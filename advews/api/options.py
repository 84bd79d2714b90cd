"""advews-eval's options as one dataclass (field = flag, default = the flag's default), and the names
its flags accept. Torch-free, so ``advews-eval --help`` and argument parsing start at once.

The name tables copy ones defined next to torch code (``advews.attacks.autoattack``,
``advews.models.external``, ``advews.evaluation.corruption_scoring``,
``advews.data.perturbation_sets``); tests/test_api.py checks that the copies agree."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("standard", "plus", "rand", "custom", "fast")
AMP = ("bf16", "fp16")
PERTURBATION_SPECS = "cifar10-p:DIR, cifar100-p:DIR or imagenet-p:DIR"
NORMALIZATION_NAMES = ("cifar10", "cifar100", "imagenet", "cifar10_dm", "cifar100_dm", "none")
CORRUPTION_SPECS = "cifar10-c:DIR, cifar100-c:DIR, imagenet-c:DIR or generated[:CORRUPTION,...]"
NORMS = ("Linf", "L2")
SEARCH_BN = ("eval", "train")
WEIGHTS_FROM = ("ema", "live")


@dataclass
class EvalOptions:
    """Every advews-eval flag (``--n-examples`` is ``n_examples``), defaulted as the CLI defaults it."""

    checkpoint: Optional[str] = None
    weights_from: Optional[str] = None
    arch: Optional[str] = None
    weights: Optional[str] = None
    normalization: Optional[str] = None
    num_classes: Optional[int] = None
    model: Optional[str] = None
    attack: Optional[str] = None
    eps: Optional[float] = None
    steps: Optional[int] = None
    step_size: Optional[float] = None
    norm: Optional[str] = None
    restarts: int = 1
    n_examples: Optional[int] = None
    batch_size: int = 256
    data: Optional[str] = None
    corruptions: Optional[str] = None
    cache_dir: Optional[str] = None
    seed: int = 0
    version: str = "standard"
    aa_attacks: Optional[str] = None
    state: Optional[str] = None
    hdf5: Optional[str] = None
    device: str = "auto"
    analysis: Optional[str] = None
    rho: float = 0.7
    n_subnets: int = 50
    search: str = "random,controller,l1"
    search_updates: int = 300
    search_lr: float = 3e-3
    search_bn: str = "eval"
    bn_modes: str = "eval,train"
    eval_batch_size: Optional[int] = None
    output: Optional[str] = None
    force: bool = False
    amp: Optional[str] = None
    shards: Optional[int] = None
    shard: Optional[int] = None
    fixed_batches: bool = False
    merge: Optional[List[str]] = None
    perturbations: Optional[str] = None
    perturbation_baseline: Optional[str] = None
    audit: bool = False
    audit_indicators: Optional[str] = None
    audit_sweep: str = "0,0.25,0.5,1,2"
    best_of: int = 10
    eot: int = 20
    square_queries: int = 5000
    surrogate: Optional[str] = None
    bpda: Optional[str] = None


DEFAULTS: Dict[str, Any] = {f.name: f.default for f in dataclasses.fields(EvalOptions)}


def comma_list(value: Union[str, Sequence[str], None]) -> Optional[str]:
    """A list flag as the CLI spells it: Python callers may pass ``("pgd", "fgsm")`` for ``"pgd,fgsm"``."""
    if value is None or isinstance(value, str):
        return value
    return ",".join(value)
