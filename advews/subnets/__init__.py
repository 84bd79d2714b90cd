"""Subnets of residual nets: discover their space, run a model as a subnet, search for weak ones."""

from advews.subnets.apply import Subnet, install_masks, set_bn_mode, space_of, subnet
from advews.subnets.controller import Controller, Samples
from advews.subnets.search import (
    ControllerSearch, L1Search, RandomSearch, SEARCHES, WeakSubnetSearch, build_search, path_gain, random_subnet,
)
from advews.subnets.space import (
    BlockSpace, LayerSpace, PathSpace, ResidualAdapter, SubnetSpace, discover, keep_count, register_adapter,
)
from advews.subnets import timm_adapters  # noqa: F401  (registers timm's ViT, Swin and ConvNeXt blocks)

__all__ = [
    "BlockSpace", "Controller", "ControllerSearch", "L1Search", "LayerSpace", "PathSpace", "RandomSearch",
    "ResidualAdapter", "SEARCHES", "install_masks", "set_bn_mode", "Samples", "Subnet", "SubnetSpace", "WeakSubnetSearch", "build_search",
    "discover", "keep_count", "path_gain", "random_subnet", "register_adapter", "space_of", "subnet",
]
