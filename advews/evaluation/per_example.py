"""Per-example correctness of an evaluation in HDF5, so later analyses can recombine attacks.

Layout: ``labels`` (int64), ``clean`` (bool), ``robust/<attack>`` (bool, correct clean and under
the attack), ``stages/<attack>/<stage>`` (bool, robust after each stage of a cascade such as
AutoAttack), ``worst_case`` (bool, the AND of ``robust/*``). Root attributes describe the run;
each ``robust/<attack>`` carries its parameters as a JSON attribute ``params``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from advews.evaluation.worst_case import worst_case


def save_per_example(
    path: str,
    *,
    labels: torch.Tensor,
    clean: torch.Tensor,
    robust: Mapping[str, torch.Tensor],
    params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    stages: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
    attrs: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write the flags atomically (a crash never leaves a half-written file at ``path``)."""
    import h5py

    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("labels", data=labels.cpu().numpy().astype(np.int64))
        f.create_dataset("clean", data=clean.cpu().numpy().astype(bool))
        for name, flags in robust.items():
            d = f.create_dataset(f"robust/{name}", data=flags.cpu().numpy().astype(bool))
            d.attrs["params"] = json.dumps((params or {}).get(name, {}))
        for name, cascade in (stages or {}).items():
            for stage, flags in cascade.items():
                f.create_dataset(f"stages/{name}/{stage}", data=flags.cpu().numpy().astype(bool))
        if robust:
            f.create_dataset("worst_case", data=worst_case(robust).cpu().numpy().astype(bool))
        for key, value in (attrs or {}).items():
            f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    os.replace(tmp, path)


def load_per_example(path: str) -> Dict[str, Any]:
    """The file as tensors: labels, clean, robust {attack: flags}, params {attack: dict}, stages
    {attack: {stage: flags}}, worst_case (when any attack ran), attrs."""
    import h5py

    with h5py.File(path, "r") as f:
        out: Dict[str, Any] = {
            "labels": torch.from_numpy(f["labels"][()]),
            "clean": torch.from_numpy(f["clean"][()]),
            "robust": {k: torch.from_numpy(v[()]) for k, v in f.get("robust", {}).items()},
            "params": {k: json.loads(v.attrs["params"]) for k, v in f.get("robust", {}).items()},
            "stages": {k: {s: torch.from_numpy(v[()]) for s, v in g.items()} for k, g in f.get("stages", {}).items()},
            "attrs": dict(f.attrs),
        }
        if "worst_case" in f:
            out["worst_case"] = torch.from_numpy(f["worst_case"][()])
    return out
