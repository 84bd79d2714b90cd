"""A model to share: ``model.safetensors`` (the weights) and ``config.json`` (how to rebuild and
evaluate it), loadable with no pickle involved.

safetensors is the format the model hubs use: a JSON header plus raw tensor bytes, which cannot run
code when loaded, unlike a torch checkpoint that is opened without ``weights_only``. The config
holds what ``advews-eval`` reads from a checkpoint (architecture and options, normalisation,
dataset, classes, training threat model, defense) plus the advews version that wrote it, so
``advews-eval --checkpoint DIR`` evaluates an export exactly as it evaluates the checkpoint. The
weights are the ones the checkpoint is evaluated with by default: its EMA's when it was trained with
one (unless ``train.select_on = 'live'``), else the live model's; ``weights`` in the config says which.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch

from advews import __version__
from advews.engine.checkpoint import load_checkpoint, write_text_atomic
from advews.engine.ema import select_weights
from advews.errors import AdvewsError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = 1
_CARRIED = ("model_spec", "data_spec", "threat_model", "defense", "epoch")


def is_export(path: str) -> bool:
    """Whether ``path`` is a directory written by ``export_model``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def export_model(checkpoint: str, out_dir: str, force: bool = False) -> Dict[str, Any]:
    """Write ``checkpoint``'s model to ``out_dir``; returns the config. Refuses to overwrite an
    export unless ``force``; checks the directory before reading the checkpoint."""
    targets = [os.path.join(out_dir, f) for f in (WEIGHTS, CONFIG)]
    if not force and any(os.path.exists(t) for t in targets):
        raise AdvewsError(f"{out_dir} already holds an export ({WEIGHTS}, {CONFIG}); pass --force or choose another DIR")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise AdvewsError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    state = load_checkpoint(checkpoint)
    if not isinstance(state.get("model_spec"), dict) or not isinstance(state.get("model"), dict):
        raise AdvewsError(f"{checkpoint} is not an advews checkpoint (no model_spec or model)")
    from safetensors.torch import save_file

    weights, which = select_weights(state, None, checkpoint)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    config = {"format": FORMAT, "advews_version": __version__, "source": os.path.basename(checkpoint), "weights": which,
              **{k: state.get(k) for k in _CARRIED}}
    tmp = os.path.join(out_dir, f".{WEIGHTS}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, targets[0])
    write_text_atomic(targets[1], json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def load_export(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """An export as the dict a checkpoint loads to (``model_spec``, ``model``, ``data_spec``, ...)."""
    try:
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdvewsError(f"cannot read {os.path.join(path, CONFIG)}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model_spec"), dict):
        raise AdvewsError(f"{path} is not an advews export (config.json without format {FORMAT} and model_spec)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(os.path.join(path, WEIGHTS), device=str(torch.device(map_location)))
    except (OSError, SafetensorError) as e:
        raise AdvewsError(f"cannot read {os.path.join(path, WEIGHTS)}: {' '.join(str(e).split())}") from None
    return {**{k: config.get(k) for k in _CARRIED}, "model": weights, "export": config}
