"""advews: robust training with Enhancing Weak Subnets (EWS) as a mixin on every defense."""

__version__ = "0.1.0"
