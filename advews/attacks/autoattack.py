"""The reference AutoAttack (Croce & Hein 2020) through pyautoattack, one cascade stage at a time.

pyautoattack only logs the robust accuracy after each attack of its cascade. Here its own
``run_standard_evaluation`` runs once per stage, on the points still robust (in their original order),
with the attack objects its ``version`` configured. That is exactly the batches and seeds of one
uninterrupted cascade, so every number equals pyautoattack's, and it yields per-stage accuracies,
per-example flags and a resume point after every stage.

torchattacks' AutoAttack (10-step APGD and other settings) is not the reference and is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Protocol, Sequence

import torch
from torch import nn

from advews.attacks.base import frozen
from advews.errors import AdvewsError, disk_full, is_disk_full, remove_quietly
from advews.locks import tmp_name

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("standard", "plus", "rand", "custom", "fast")
FAST_CASCADE = ("apgd-ce", "apgd-t")
# Why 'fast' exists: on AWP's published WRN-34-10 AutoAttack logs, FAB-T and Square took ~70% of the
# time and changed the robust accuracy by 0.00 points; APGD-CE + APGD-T (configured as in 'standard')
# is a screening number, never a substitute for the standard one in a paper.
FAST_NOTE = ("version fast runs APGD-CE and APGD-T of the standard cascade only: a screening number, "
             "not the standard AutoAttack (rerun with --version standard to report)")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP32_SUFFIX = "-fp32"  # with amp: the stages of the cascade run again in fp32 on the points still robust
AA_NORMS = ("Linf", "L2", "L1")
STATE_FORMAT = "advews-autoattack-state/1"
LOGGER = "auto-attack"

# Library lines replaced by the stage lines logged here: accuracies of the subset handed to one stage
# (e.g. "initial accuracy: 100.00%") rather than of the whole evaluation, and the stage announcements.
_REPLACED_LINES = ("initial accuracy", "robust accuracy", "using ", "running ")


def run_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str,
    version: str = "standard",
    attacks: Optional[Sequence[str]] = None,
    seed: int = 0,
    batch_size: int = 250,
    state_path: Optional[str] = None,
    state_io: Optional["StateIO"] = None,
    amp: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
    fixed_batches: bool = False,
) -> Dict[str, Any]:
    """AutoAttack ``version`` (``attacks`` only for ``custom``; ``fast``: APGD-CE + APGD-T set up as
    in ``standard``) on ``x`` in [0, 1] with labels ``y``.

    Returns clean_acc, robust_acc, n_examples, stages (per attack, in cascade order: robust_acc
    after it, seconds, whether it was restored from the state), warnings (pyautoattack's sanity
    checks, and the note that ``fast`` is not the standard AA), and the per-example bool tensors
    clean, robust and stage_robust {attack: flags}. ``state_path`` (or ``state_io``, which keeps the
    same dict elsewhere) is rewritten after every stage; a later call with the same state skips the
    stages it records. ``amp`` ('bf16' or 'fp16'): the cascade runs under autocast and every
    adversarial example is then re-checked in fp32 (only a point the fp32 model misclassifies counts
    as broken); then the same cascade (version, seed) runs again in fp32 on the points still robust,
    as the stages ``<stage>-fp32``, so every point counted robust (``robust``) survived an fp32
    AutoAttack. ``low_precision_robust`` holds what the low-precision model said of its own examples.
    ``log`` receives progress lines and warnings. ``fixed_batches``: each batch of ``batch_size``
    examples keeps its own points through the cascade (one call per batch and stage), instead of
    pyautoattack's re-packing of the robust points into full batches; a batch's flags then depend on
    that batch alone, so any split of the examples into whole batches gives the same flags.
    """
    from pyautoattack import AutoAttack, checks

    check_options(eps=eps, norm=norm, version=version, attacks=attacks)
    _check_inputs(x, y, batch_size)
    if amp is not None and amp not in AMP_DTYPES:
        raise AdvewsError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    x, y = x.detach().cpu(), y.detach().cpu()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    say = log or (lambda _: None)
    store = state_io if state_io is not None else FileState(state_path) if state_path else None
    with frozen(model), _library_log(say) as warnings:
        attacked = model if amp is None else _Autocast(model, low_precision(amp, device))
        aa = AutoAttack(attacked, eps=eps, norm=norm, version="standard" if version == "fast" else version,
                        device=device, seed=seed, attacks=list(attacks) if version == "custom" else None)
        cascade: List[str] = list(FAST_CASCADE) if version == "fast" else list(aa.attacks_to_run)
        classes = fit_classes(aa, model, x[:1].to(device), cascade)
        if version != "rand" and randomized(model, x[:batch_size].to(device)):
            raise AdvewsError("the model is randomized (two eval-mode forward passes disagree): a single pass per "
                              "point inflates AutoAttack; use --version rand (EoT) or advews-eval --audit")
        identity = {"eps": eps, "norm": norm, "version": version, "attacks": cascade, "seed": seed,
                    "n": len(y), "data": _fingerprint([x, y]), "model": _fingerprint(model.state_dict().values()),
                    "amp": amp, **({"fixed_batches": True} if fixed_batches else {}),
                    **({"fp32_reattack": True} if amp else {})}
        # (stage, library attack, runner): with amp the cascade again in fp32 on the survivors
        plan = [(name, name, aa) for name in cascade]
        if amp is not None:
            aa32 = AutoAttack(model, eps=eps, norm=norm, version="standard" if version == "fast" else version,
                              device=device, seed=seed, attacks=list(attacks) if version == "custom" else None)
            plan += [(name + FP32_SUFFIX, name, aa32) for name in cascade]
            fit_classes(aa32, model, x[:1].to(device), cascade, classes)
        done = _check_state(store.load(), identity, store.name) if store else []
        clean = _correct(model, x, y, batch_size, device)
        robust = clean.clone()
        low = clean.clone()  # robust according to the low-precision model (== robust without amp)
        stage_robust: Dict[str, torch.Tensor] = {}
        stage_low: Dict[str, torch.Tensor] = {}
        stages: List[Dict[str, Any]] = []
        say(f"clean accuracy: {_pct(clean)} of {len(y)}; cascade {', '.join(cascade)} at {norm} eps {eps:g}")
        for name, library_name, runner in plan:
            start = time.time()
            in_fp32 = runner is not aa or amp is None
            restored = next((s for s in done if s["attack"] == name), None)
            if restored is not None:
                robust &= _unpack(restored["robust"], len(y))
                low &= _unpack(restored.get("low_robust", restored["robust"]), len(y))
                seconds = restored["seconds"]
                say(f"{name}: restored from {store.name}")
            else:
                index = robust.nonzero().flatten()
                say(f"{name}: attacking {len(index)} robust points" + (" in fp32" if amp and in_fp32 else ""))
                runner.attacks_to_run = [library_name]
                for part in _groups(index, batch_size if fixed_batches else None):
                    x_adv, y_adv = runner.run_standard_evaluation(x[part], y[part], batch_size=batch_size)
                    held = y_adv.cpu() == y[part]  # according to the model ``runner`` attacks
                    if runner is aa:
                        low[part] &= held
                    # with amp, a low-precision example breaks a point only if the fp32 model misclassifies it
                    robust[part] = held if in_fp32 else _correct(model, x_adv.cpu(), y[part], batch_size, device)
                seconds = round(time.time() - start, 2)
            stage_robust[name], stage_low[name] = robust.clone(), low.clone()
            stages.append({"attack": name, "robust_acc": _acc(robust), "seconds": seconds,
                           "resumed": restored is not None,
                           **({"low_precision_robust_acc": _acc(low)} if amp and not in_fp32 else {}),
                           **({"fp32_reattack": True} if amp and in_fp32 else {})})
            saved = ""
            if store and restored is None:
                store.save(_state_dict(identity, stages, stage_robust, stage_low if amp else None))
                saved = f" (saved to {store.name})"
            say(f"robust accuracy after {name}: {_pct(robust)}{saved}")
        checks.check_square_sr({"clean": _acc(clean), **{s["attack"]: s["robust_acc"] for s in stages}},
                               logger=aa.logger)
    return {
        "clean_acc": _acc(clean),
        "robust_acc": _acc(robust),
        "n_examples": len(y),
        "stages": stages,
        "warnings": list(warnings) + ([FAST_NOTE] if version == "fast" else []),
        "clean": clean,
        "robust": robust,
        "stage_robust": stage_robust,
        **({"low_precision_robust": low, "amp": amp} if amp else {}),
    }


def _groups(index: torch.Tensor, batch_size: Optional[int]) -> List[torch.Tensor]:
    """The points one stage attacks, per call: all at once (pyautoattack batches them), or per batch
    of the original examples (``batch_size``, for --fixed-batches)."""
    if not len(index):
        return []
    if batch_size is None:
        return [index]
    batch = index // batch_size
    return [index[batch == b] for b in batch.unique()]


def low_precision(amp: str, device: torch.device) -> Callable[[], ContextManager[Any]]:
    """The autocast factory of ``amp`` ('bf16' or 'fp16') on ``device``'s type, as Attack.autocast takes it."""
    dtype = AMP_DTYPES[amp]
    return lambda: torch.autocast(device.type, dtype=dtype)


class _Autocast(nn.Module):
    """The model's forward under autocast with fp32 logits: what pyautoattack attacks with --amp
    (its losses and the returned examples stay fp32)."""

    def __init__(self, model: nn.Module, autocast: Callable[[], ContextManager[Any]]):
        super().__init__()
        self.model = model
        self.autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(x).float()


class StateIO(Protocol):
    """Where the resume state lives: ``load`` returns the dict saved last (None if none), ``name``
    says where in messages."""

    name: str

    def load(self) -> Optional[Dict[str, Any]]: ...

    def save(self, state: Dict[str, Any]) -> None: ...


class FileState:
    """The resume state as a JSON file of its own, rewritten atomically through a temporary name of
    this process's own (an interrupt mid-write keeps the previous stage's file), with a content hash
    so an edited or damaged file is refused (files of earlier versions, without one, are read as before)."""

    def __init__(self, path: str):
        self.name = path

    def load(self) -> Optional[Dict[str, Any]]:
        if not os.path.exists(self.name):
            return None
        try:
            with open(self.name) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise AdvewsError(f"cannot read AutoAttack state {self.name}: {' '.join(str(e).split())}") from None
        if isinstance(state, dict) and "hash" in state and state["hash"] != _state_hash(state):
            raise AdvewsError(f"AutoAttack state {self.name} was edited or damaged (its content hash does not "
                              "match); use another state file or delete it")
        return state

    def save(self, state: Dict[str, Any]) -> None:
        text = json.dumps({**state, "hash": _state_hash(state)})
        tmp = tmp_name(self.name)
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.name)
        except OSError as e:
            remove_quietly(tmp)
            kept = (f"the previous {self.name} is kept with the stages finished before" if os.path.exists(self.name)
                    else "no stage was saved yet")
            if is_disk_full(e):
                raise disk_full(self.name, kept) from None
            raise AdvewsError(f"cannot write AutoAttack state {self.name}: {e.strerror or e}; {kept}") from None


def _state_hash(state: Dict[str, Any]) -> str:
    """SHA-256 of the state's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in state.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def randomized(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether two eval-mode passes on ``x`` disagree beyond float noise (a stochastic defense)."""
    with torch.no_grad():
        a, b = model(x).double(), model(x).double()
    return bool((a.argmax(1) != b.argmax(1)).any()) or float((a - b).abs().max()) > 1e-4 * (1 + float(a.abs().max()))


def fit_classes(aa: Any, model: nn.Module, probe: torch.Tensor, cascade: Sequence[str],
                classes: Optional[int] = None) -> int:
    """Targeted attacks use min(9, classes - 1) targets (pyautoattack fixes 9, which fails below 10
    classes: fra31/auto-attack#110); DLR needs 3 classes and targeted DLR 4 (#70): refused below."""
    if classes is None:
        with torch.no_grad():
            classes = int(model(probe).shape[1])
    need = {"apgd-dlr": 3, "apgd-t": 4}
    short = [name for name in cascade if classes < need.get(name, 0)]
    if short:
        raise AdvewsError(f"AutoAttack's {', '.join(short)} need at least {max(need[n] for n in short)} classes (the DLR "
                          f"loss), the model has {classes}; run --version custom --aa-attacks apgd-ce,fab,square")
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, classes - 1)
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, classes - 1)
    return classes


def check_options(*, eps: float, norm: str, version: str, attacks: Optional[Sequence[str]]) -> None:
    """Refuse a configuration pyautoattack would reject or silently change (a one-line AdvewsError)."""
    if version not in VERSIONS:
        raise AdvewsError(f"unknown AutoAttack version {version!r}; choose one of {', '.join(VERSIONS)}")
    if version == "custom":
        bad = [a for a in attacks or () if a not in AA_ATTACKS]
        if not attacks or bad or len(set(attacks)) != len(attacks):
            raise AdvewsError(f"bad AutoAttack attacks {list(attacks or [])}: version custom needs a list of "
                              f"distinct names from {', '.join(AA_ATTACKS)}")
    elif attacks is not None:
        raise AdvewsError(f"AutoAttack attacks {list(attacks)} need version custom; {version} fixes its own")
    if norm not in AA_NORMS:
        raise AdvewsError(f"AutoAttack norm must be one of {', '.join(AA_NORMS)}, got {norm!r}")
    if not eps > 0:
        raise AdvewsError(f"AutoAttack eps must be > 0, got {eps}")


def _check_inputs(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if batch_size < 1:
        raise AdvewsError(f"batch_size must be >= 1, got {batch_size}")
    if not x.is_floating_point() or x.dim() < 2 or not len(x) or y.dtype != torch.long or y.shape != x.shape[:1]:
        raise AdvewsError(f"AutoAttack needs float x (N >= 1, ...) and int64 y (N,), got {tuple(x.shape)} "
                          f"{x.dtype} and {tuple(y.shape)} {y.dtype}")
    if x.min() < 0 or x.max() > 1:
        raise AdvewsError(f"AutoAttack needs x in [0, 1] (normalise inside the model), got "
                          f"[{x.min().item():.4g}, {x.max().item():.4g}]")


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Clean correctness on the CPU, computed batch by batch like pyautoattack's first pass."""
    return torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]
                      for i in range(0, len(y), batch_size)])


class _Relay(logging.Handler):
    """Forwards pyautoattack's log lines to ``log`` and collects its warnings (the sanity checks)."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.DEBUG)
        self.log = log
        self.warnings: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            if msg not in self.warnings:  # the checks rerun at every stage
                self.warnings.append(msg)
                self.log(f"warning: {msg}")
        elif not msg.startswith(_REPLACED_LINES):
            self.log(msg)


@contextlib.contextmanager
def _library_log(log: Callable[[str], None]) -> Iterator[List[str]]:
    """Route the 'auto-attack' logger (DEBUG progress, WARNING checks) to ``log`` during one run, and
    keep it from reaching the root handlers twice; its level and propagation are restored after."""
    logger = logging.getLogger(LOGGER)
    relay = _Relay(log)
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(relay)
    try:
        yield relay.warnings
    finally:
        logger.removeHandler(relay)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _fingerprint(tensors) -> str:
    """SHA-256 of the tensors' bytes, so a state file is never resumed on other data or weights."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_state(state: Optional[Dict[str, Any]], identity: Dict[str, Any], where: str) -> List[Dict[str, Any]]:
    """The stages a previous run of the same evaluation finished; [] when there is no state yet."""
    if state is None:
        return []
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise AdvewsError(f"{where} is not an AutoAttack state file ({STATE_FORMAT})")
    for key, value in identity.items():
        if state.get(key) != value:
            what = {"data": "other inputs", "model": "other model weights"}.get(key, f"{key}={state.get(key)!r}")
            now = "" if key in ("data", "model") else f", this run has {key}={value!r}"
            raise AdvewsError(f"AutoAttack state {where} was written for {what}{now}; use another state file or delete it")
    stages = state.get("stages")
    if not isinstance(stages, list) or not all(
            isinstance(s, dict) and isinstance(s.get("attack"), str) and isinstance(s.get("robust"), str)
            and isinstance(s.get("low_robust", ""), str) and isinstance(s.get("seconds"), (int, float))
            for s in stages):
        raise AdvewsError(f"AutoAttack state {where} has malformed stages (edited or damaged); use another state "
                          "file or delete it")
    return stages


def _state_dict(identity: Dict[str, Any], stages: List[Dict[str, Any]], stage_robust: Dict[str, torch.Tensor],
                stage_low: Optional[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    done = [{**s, "robust": _pack(stage_robust[s["attack"]]),
             **({"low_robust": _pack(stage_low[s["attack"]])} if stage_low is not None else {})} for s in stages]
    return {"format": STATE_FORMAT, **identity, "stages": done}


def _pack(flags: torch.Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def _unpack(text: str, n: int) -> torch.Tensor:
    if len(text) != n or set(text) - {"0", "1"}:
        raise AdvewsError(f"corrupt AutoAttack state: expected {n} flags, got {len(text)} characters")
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def _acc(flags: torch.Tensor) -> float:
    """A fraction of counts, as pyautoattack computes it (not a float32 mean)."""
    return int(flags.sum()) / len(flags)


def _pct(flags: torch.Tensor) -> str:
    return f"{100 * _acc(flags):.2f}%"
