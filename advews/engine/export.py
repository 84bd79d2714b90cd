"""A model to share: ``model.safetensors`` (the weights) and ``config.json`` (how to rebuild and
evaluate it), loadable with no pickle involved.

safetensors is the format the model hubs use: a JSON header plus raw tensor bytes, which cannot run
code when loaded, unlike a torch checkpoint that is opened without ``weights_only``. The config
holds what ``advews-eval`` reads from a checkpoint (architecture and options, normalisation,
dataset, classes, training threat model, defense) plus the advews version that wrote it, so
``advews-eval --checkpoint DIR`` evaluates an export exactly as it evaluates the checkpoint. The
weights are the ones the checkpoint is evaluated with by default: its EMA's when it was trained with
one (unless ``train.select_on = 'live'``), else the live model's; ``weights`` in the config says which.

Beside them, what makes the directory a model repository as the hubs lay it out (one ``hf upload``
shares it): ``README.md``, the model card with the results of the evaluation JSONs next to the
checkpoint (``engine.model_card``), those JSONs under ``evaluations/``, ``config.gin`` (the training
recipe), and with ``robustbench`` a RobustBench ``model_info.json`` (``engine.robustbench_info``).
Loading reads only config.json and model.safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from advews import __version__
from advews.engine.checkpoint import load_checkpoint
from advews.engine.ema import WEIGHTS_FROM, select_weights
from advews.engine.model_check import check_state_types, check_weights, warn_once
from advews.errors import AdvewsError, disk_full, is_disk_full, remove_quietly
from advews.locks import tmp_name
from advews.outputs import check_output_dir, make_dirs, remove_dirs

WEIGHTS, CONFIG = "model.safetensors", "config.json"
README, GIN, INFO, EVALUATIONS = "README.md", "config.gin", "model_info.json", "evaluations"
FORMAT = 1
HASH = "sha256"  # config.json: {"sha256": {"model.safetensors": hex digest}}
_CARRIED = ("model_spec", "data_spec", "threat_model", "defense", "epoch")


def is_export(path: str) -> bool:
    """Whether ``path`` is a directory written by ``export_model``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def _write_tmp(path: str, data: bytes) -> str:
    """``data`` in this process's temporary file beside ``path``, fsynced; returns its name."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def _recipe(checkpoint: str, state: Dict[str, Any]) -> Optional[bytes]:
    """The run's operative gin config: config.gin beside the checkpoint, else the one it stores."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), GIN)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        config = state.get("config")
        return config.encode() if isinstance(config, str) and config else None


def _owned(out_dir: str) -> List[str]:
    """The files an earlier export left in ``out_dir`` (the ones an export writes)."""
    names = [f for f in (WEIGHTS, CONFIG, README, GIN, INFO) if os.path.lexists(os.path.join(out_dir, f))]
    folder = os.path.join(out_dir, EVALUATIONS)
    if os.path.isdir(folder):
        names += sorted(os.path.join(EVALUATIONS, f) for f in os.listdir(folder) if f.endswith(".json"))
    return names


def _contents(checkpoint: str, out_dir: str, name: Optional[str], robustbench: bool) -> Tuple[Dict[str, bytes], Dict[str, Any]]:
    """Every file of the export (relative name -> bytes) and its config, all checked before any is written."""
    state = load_checkpoint(checkpoint)
    check_state_types(checkpoint, state)
    if not isinstance(state.get("model"), dict):
        raise AdvewsError(f"{checkpoint} is not an advews checkpoint (no model weights)")
    weights, which = select_weights(state, None, checkpoint)
    check_weights(checkpoint, state["model_spec"], weights)
    from safetensors.torch import save

    from advews.engine.evaluations import find_evaluations
    from advews.engine.model_card import card_text

    data = save({k: v.detach().cpu().contiguous() for k, v in weights.items()}, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    config = {"format": FORMAT, "advews_version": __version__, "source": os.path.basename(checkpoint), "weights": which,
              HASH: {WEIGHTS: digest}, **{k: state.get(k) for k in _CARRIED}}
    name = name or os.path.basename(os.path.normpath(os.path.abspath(out_dir)))
    evaluations, skipped = find_evaluations(checkpoint, state.get("epoch"), which)
    files = {WEIGHTS: data, CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    recipe = _recipe(checkpoint, state)
    if recipe is not None:
        files[GIN] = recipe
    if robustbench:
        from advews.engine.robustbench_info import model_info, pick_standard

        info = model_info(pick_standard(evaluations, config, checkpoint), config, name, digest)
        files[INFO] = (json.dumps(info, indent=2) + "\n").encode()
    files.update({f"{EVALUATIONS}/{e.name}": e.raw for e in evaluations})
    hashes = {f: hashlib.sha256(content).hexdigest() for f, content in files.items()}
    files[README] = card_text(config, name, evaluations, hashes).encode()
    for line in skipped:
        warn_once(line, line)
    return files, config


def export_model(checkpoint: str, out_dir: str, force: bool = False, name: Optional[str] = None,
                 robustbench: bool = False) -> Dict[str, Any]:
    """Write ``checkpoint``'s model and its model card to ``out_dir`` (``name``: the card's, default
    the directory's name; ``robustbench``: also model_info.json, refused unless a standard AutoAttack
    evaluation lies next to the checkpoint); returns the config. Refuses to overwrite an export unless
    ``force`` (which also removes the files of the earlier export this one does not rewrite); checks
    the directory, the checkpoint's model and the evaluations before writing."""
    earlier = _owned(out_dir) if os.path.isdir(out_dir) else []
    if not force and earlier:
        shown = [f for f in earlier if "/" not in f] + ([EVALUATIONS + "/"] if any("/" in f for f in earlier) else [])
        raise AdvewsError(f"{out_dir} already holds an export ({', '.join(shown)}); pass --force or choose "
                          "another DIR")
    check_output_dir(out_dir)
    files, config = _contents(checkpoint, out_dir, name, robustbench)
    targets = [os.path.join(out_dir, *f.split("/")) for f in files]
    created: List[str] = []
    tmps: List[str] = []
    current = targets[0]
    try:
        created = make_dirs(out_dir)
        if any(f.startswith(EVALUATIONS + "/") for f in files):
            created += make_dirs(os.path.join(out_dir, EVALUATIONS))
        for target, content in zip(targets, files.values()):
            current = target
            tmps.append(_write_tmp(target, content))
        for tmp, target in zip(tmps, targets):  # all complete: a crash between the renames is a hash mismatch
            current = target
            os.replace(tmp, target)
    except BaseException as e:
        for tmp in tmps:
            remove_quietly(tmp)
        remove_dirs(created)
        if is_disk_full(e):
            raise disk_full(current, f"nothing was exported ({checkpoint} is unchanged, "
                                     f"{out_dir} {'was removed' if created else 'is as it was'})") from None
        if isinstance(e, OSError):
            raise AdvewsError(f"cannot write {current}: {e.strerror or e}") from None
        raise
    for stale in set(earlier) - set(files):  # --force: nothing of the earlier export outlives it
        remove_quietly(os.path.join(out_dir, stale))
    return config


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_config(path: str, config: Any) -> None:
    """config.json's own entries (the model's are ``model_check``'s)."""
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model_spec" not in config:
        raise AdvewsError(f"{path} is not an advews export (config.json without format {FORMAT} and model_spec)")
    if config.get("weights", "live") not in WEIGHTS_FROM:
        raise AdvewsError(f"{os.path.join(path, CONFIG)}: weights must be one of {', '.join(WEIGHTS_FROM)}, "
                          f"got {config.get('weights')!r}")
    digest = config.get(HASH)
    if digest is not None and not (isinstance(digest, dict) and isinstance(digest.get(WEIGHTS), str)):
        raise AdvewsError(f"{os.path.join(path, CONFIG)}: {HASH} must be {{\"{WEIGHTS}\": hex digest}}, got {digest!r}")


def load_export(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """An export as the dict a checkpoint loads to (``model_spec``, ``model``, ``data_spec``, ...),
    its weights checked against the SHA-256 in config.json (an export without one: a warning)."""
    config_path, weights_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdvewsError(f"cannot read {config_path}: {e}") from None
    _check_config(path, config)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        digest = _sha256(weights_path)
        weights = load_file(weights_path, device=str(torch.device(map_location)))
    except (OSError, SafetensorError) as e:
        raise AdvewsError(f"cannot read {weights_path}: {' '.join(str(e).split())}") from None
    expected = (config.get(HASH) or {}).get(WEIGHTS)
    if expected is None:
        warn_once(os.path.abspath(weights_path), f"{weights_path} is unverified: {config_path} carries no "
                  f"SHA-256 of it (written by advews {config.get('advews_version', '?')}, before exports carried one)")
    elif digest != expected.lower():
        raise AdvewsError(f"export {path} is corrupt: {weights_path} does not match the SHA-256 in {config_path} "
                          f"(the file hashes to {digest}, config.json records {expected}: bytes changed on disk)")
    return {**{k: config.get(k) for k in _CARRIED}, "model": weights, "export": config}
