"""``advews.audit`` and ``advews-eval --audit``: every indicator of attack failure on one model, an audit
card (JSON and markdown) and a verdict.

The audit runs batch by batch; its state file (``--state``) keeps the counts of every finished batch
under the audit's identity (settings, model hash, data fingerprint), so a rerun after a kill skips
the finished batches, and ``--shards N --shard I`` runs a contiguous range of batches whose states
``merge_audits`` sums (the totals are plain sums of counts, so the merged card equals a single run's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from advews.api.arguments import public
from advews.api.eval_state import LOCK_ADVICE, StateLock
from advews.data.fingerprint import tensor_fingerprint
from advews.errors import AdvewsError
from advews.evaluation.audit import INDICATORS, AuditSettings, add, audit_batch, is_randomized, judge, verdict

CARD_FORMAT = "advews-audit/1"
STATE_FORMAT = "advews-audit-state/1"


def bpda_surrogate(model: nn.Module, modules: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose named submodules pass gradients straight through (BPDA, Athalye et
    al. 2018): forward as the model, backward as if those modules were the identity."""
    names = dict(model.named_modules())
    missing = [m for m in modules if m not in names]
    if missing:
        raise AdvewsError(f"--bpda names no submodule of the model: {', '.join(missing)}; its submodules are "
                          f"{', '.join(n for n in list(names)[1:12] if n)}...")
    twin = copy.deepcopy(model)
    twin_names = dict(twin.named_modules())

    def straight_through(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if not isinstance(output, torch.Tensor) or output.shape != x.shape:
            raise AdvewsError(f"--bpda needs modules whose output has their input's shape, got {tuple(x.shape)} "
                              f"-> {tuple(getattr(output, 'shape', ()))}")
        return x + (output - x).detach()

    for m in modules:
        twin_names[m].register_forward_hook(straight_through)
    return twin


def _square(s: AuditSettings) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """AutoAttack's own Square (pyautoattack, p_init 0.8, its query budget): the black-box attack
    fra31's ``checks.py`` compares with the white-box stages."""
    from pyautoattack.square import SquareAttack

    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attack = SquareAttack(model, p_init=0.8, n_queries=s.square_queries, eps=s.eps, norm=s.norm, n_restarts=1,
                              seed=s.seed, verbose=False, device=x.device)
        with torch.no_grad():
            return attack.perturb(x, y).detach()
    return run


def _identity(s: AuditSettings, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              surrogate: Optional[str]) -> Dict[str, Any]:
    return {"format": STATE_FORMAT, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in vars(s).items()},
            "batch_size": batch_size, "n": len(y), "data": tensor_fingerprint([x, y]),
            "model": tensor_fingerprint(list(model.state_dict().values())), "surrogate": surrogate}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _load_state(path: Optional[str], identity: Dict[str, Any]) -> Dict[str, Any]:
    if not path or not os.path.exists(path):
        return {"identity": identity, "batches": {}}
    state = _load_state_file(path)
    if state["identity"] != identity:
        differ = sorted(k for k in set(identity) | set(state["identity"]) if identity.get(k) != state["identity"].get(k))
        raise AdvewsError(f"{path} belongs to another audit ({', '.join(differ)} differ); choose another --state")
    return state


def _load_state_file(path: str) -> Dict[str, Any]:
    """An audit state file, its format and content hash checked (its identity is the caller's)."""
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise AdvewsError(f"cannot read audit state {path}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("identity"), dict) or \
            state["identity"].get("format") != STATE_FORMAT or not isinstance(state.get("batches"), dict):
        raise AdvewsError(f"{path} is not an audit state file ({STATE_FORMAT})")
    if state.get("hash") != _digest({k: v for k, v in state.items() if k != "hash"}):
        raise AdvewsError(f"{path} was changed after it was written (its content hash does not match); "
                          "remove it to rerun the audit")
    return state


def _save_state(path: Optional[str], state: Dict[str, Any]) -> None:
    if not path:
        return
    from advews.errors import disk_full, is_disk_full, remove_quietly
    from advews.locks import tmp_name

    body = {k: v for k, v in state.items() if k != "hash"}
    tmp = tmp_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump({**body, "hash": _digest(body)}, f)
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        if is_disk_full(e):
            raise disk_full(path, f"the audit state keeps {len(state['batches']) - 1} finished batches") from None
        raise AdvewsError(f"cannot write audit state {path}: {e.strerror or e}") from None


def run_audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AuditSettings, *,
              batch_size: int = 100, device: Optional[torch.device] = None, surrogate: Optional[nn.Module] = None,
              surrogate_name: Optional[str] = None, state_path: Optional[str] = None,
              shard: Optional[Sequence[int]] = None, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """The audit's counts on (a shard of) ``x``, ``y`` and, unless sharded, its indicators and verdict.
    ``shard`` = (i, n): run only the i-th of n contiguous ranges of batches. A ``state_path`` is locked
    for the whole audit: a second process on it is refused in one line naming the holder's pid."""
    say = log or (lambda _: None)
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x.detach().cpu(), y.detach().cpu()
    n_batches = (len(y) + batch_size - 1) // batch_size
    first, stop = 0, n_batches
    if shard is not None:
        i, count = shard
        first, stop = i * n_batches // count, (i + 1) * n_batches // count
    identity = _identity(settings, model, x, y, batch_size, surrogate_name)
    _load_state(state_path, identity)  # refused before the lock file is made
    lock = StateLock(f"{state_path}.lock", f"--state {state_path}", LOCK_ADVICE).acquire() if state_path else None
    try:
        return _run_batches(model, x, y, settings, identity, batch_size, device, surrogate, state_path,
                            first, stop, say)
    finally:
        if lock is not None:
            lock.release()


def _run_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AuditSettings,
                 identity: Dict[str, Any], batch_size: int, device: torch.device, surrogate: Optional[nn.Module],
                 state_path: Optional[str], first: int, stop: int, say: Callable[[str], None]) -> Dict[str, Any]:
    """The audit's batches ``first`` to ``stop``, each saved to the state as it ends, then the card."""
    from advews.attacks.base import frozen

    state = _load_state(state_path, identity)  # read again under the lock; batches are numbered globally
    start = time.time()
    with frozen(model):
        if surrogate is not None:
            surrogate.eval()
        torch.manual_seed(settings.seed)
        probe = x[:batch_size].to(device)
        randomized = state.get("randomized")
        if randomized is None:
            randomized = is_randomized(model, probe)[0]
            state["randomized"] = randomized
        if randomized:
            say(f"the model is randomized: EoT over {settings.eot} gradients, best of {settings.best_of} passes")
        square = _square(settings)
        for b in range(first, stop):
            if str(b) in state["batches"]:
                continue
            xb, yb = x[b * batch_size:(b + 1) * batch_size].to(device), y[b * batch_size:(b + 1) * batch_size].to(device)
            state["batches"][str(b)] = audit_batch(model, xb, yb, settings, b, randomized, surrogate, square)
            _save_state(state_path, state)
            say(f"batch {b + 1 - first} of {stop - first} done ({time.time() - start:.0f} s)")
    return finish(state, settings, surrogate is not None, seconds=time.time() - start)


def finish(state: Dict[str, Any], settings: AuditSettings, has_surrogate: bool, seconds: float) -> Dict[str, Any]:
    totals: Dict[str, Any] = {}
    for b in sorted(state["batches"], key=int):
        totals = add(totals, state["batches"][b])
    rows = judge(totals, settings, bool(state.get("randomized")), has_surrogate)
    return {"format": CARD_FORMAT, "verdict": verdict(rows), "n_examples": totals.get("n", 0),
            "clean_acc": totals.get("clean", 0) / max(totals.get("n", 1), 1),
            "robust_acc": totals.get("base_robust", 0) / max(totals.get("n", 1), 1),
            "randomized": bool(state.get("randomized")), "indicators": rows,
            "settings": state["identity"]["settings"], "batch_size": state["identity"]["batch_size"],
            "data_sha256": state["identity"]["data"], "model_sha256": state["identity"]["model"],
            "seconds": round(seconds, 2)}


def merge_audits(paths: Sequence[str]) -> Dict[str, Any]:
    """The card of a sharded audit from its shards' state files (every batch exactly once)."""
    states = [(path, _load_state_file(path)) for path in paths]
    base = states[0][1]["identity"]
    merged: Dict[str, Any] = {"identity": base, "batches": {}, "randomized": False}
    for path, state in states:
        if state["identity"] != base:
            raise AdvewsError(f"{path} belongs to another audit than {states[0][0]}")
        merged["randomized"] |= bool(state.get("randomized"))
        for b, counts in state["batches"].items():
            if b in merged["batches"]:
                raise AdvewsError(f"batch {b} appears in two shard states ({path})")
            merged["batches"][b] = counts
    n_batches = (base["n"] + base["batch_size"] - 1) // base["batch_size"]
    missing = [b for b in range(n_batches) if str(b) not in merged["batches"]]
    if missing:
        raise AdvewsError(f"the shard states lack batches {missing[:5]}: run the missing shards first")
    settings = AuditSettings(**{**base["settings"], "sweep": tuple(base["settings"]["sweep"]),
                                "indicators": tuple(base["settings"]["indicators"])})
    return finish(merged, settings, base.get("surrogate") is not None, seconds=0.0)


def card_markdown(card: Dict[str, Any]) -> str:
    """The card as a table a paper appendix can paste."""
    s = card["settings"]
    lines = [f"### Audit: {card['verdict']}", "",
             f"{card['n_examples']} examples, {s['norm']} eps {s['eps']:g}, PGD-{s['steps']} (CE in fp64, cosine step "
             f"from 2 eps, best iterate), "
             f"seed {s['seed']}; clean {card['clean_acc']:.1%}, robust {card['robust_acc']:.1%}.", "",
             "| indicator | flag | finding | figures |", "| --- | --- | --- | --- |"]
    for r in card["indicators"]:
        flag = "n/a" if r["flagged"] is None else "FLAG" if r["flagged"] else "pass"
        figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r["figures"].items() if k != "loss_curve")
        lines.append(f"| {r['indicator']} | {flag} | {r['finding']} | {figures} |")
    if card.get("command"):
        lines += ["", f"Reproduce: `{card['command']}`"]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def write_card(card: Dict[str, Any], path: str) -> List[str]:
    """The card as ``path`` (JSON) and the same stem with .md; returns the paths written."""
    from advews.errors import disk_full, is_disk_full, remove_quietly
    from advews.locks import tmp_name

    md = os.path.splitext(path)[0] + ".md"
    written = []
    for target, text in ((path, json.dumps(card, indent=2)), (md, card_markdown(card))):
        tmp = tmp_name(target)
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, target)
        except OSError as e:
            remove_quietly(tmp)
            if is_disk_full(e):
                raise disk_full(target, "the audit's figures are in the report above") from None
            raise AdvewsError(f"cannot write the audit card {target}: {e.strerror or e}") from None
        written.append(target)
    return written


def parse_sweep(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AdvewsError(f"bad --audit-sweep {text!r}; give increasing fractions of eps, e.g. 0,0.25,0.5,1,2") from None


def audit_from_options(args: Any, model: Optional[nn.Module] = None,
                       default_output: bool = True) -> Tuple[Dict[str, Any], List[str]]:
    """``advews-eval --audit``: check every flag and output first, load the model, data and surrogate,
    run the audit (or merge shard states) and write the card (by default audit.json and audit.md next
    to the checkpoint, else in the current directory). Returns the card and the files written."""
    import dataclasses

    from advews.api.evaluate import prepare, threat_model
    from advews.api.models import checkpoint_model, facts
    from advews.api.sources import home_dir

    settings_only = dict(steps=args.steps or 50, sweep=parse_sweep(args.audit_sweep), best_of=args.best_of,
                         eot=args.eot, square_queries=args.square_queries, seed=args.seed,
                         indicators=tuple(i for i in (args.audit_indicators or ",".join(INDICATORS)).split(",") if i))
    clash = [flag for flag, value in (("--attack", args.attack), ("--analysis", args.analysis),
                                      ("--corruptions", args.corruptions), ("--perturbations", args.perturbations),
                                      ("--hdf5", args.hdf5), ("--amp", args.amp)) if value]
    if clash:
        raise AdvewsError(f"--audit runs its own attacks and writes its own card; drop {', '.join(clash)} "
                          "(run that evaluation separately)")
    AuditSettings(eps=1.0, **settings_only)  # every setting but eps refused now, before anything loads
    if args.shards is not None and not args.state:
        raise AdvewsError("--shards needs --state: each shard's counts go to its own state file for --merge")
    if args.shards is not None and (args.shard is None or not 0 <= args.shard < args.shards):
        raise AdvewsError(f"--shard must be in 0..{args.shards - 1}, got {args.shard}")
    output = args.output or (os.path.join(home_dir({"checkpoint": args.checkpoint}), "audit.json")
                             if args.checkpoint and not args.merge else None)
    if output is None and not args.merge and default_output:
        output = "audit.json"
    if output and args.shards is None:
        for target in (output, os.path.splitext(output)[0] + ".md"):
            if os.path.exists(target) and not args.force:
                raise AdvewsError(f"{target} exists; choose another --output or pass --force")
    state = args.state
    if state and args.shards is not None:
        stem, ext = os.path.splitext(state)
        state = f"{stem}.shard{args.shard}of{args.shards}{ext or '.json'}"
    from advews.api.checks import unwritable

    for path, flag in ((output, "--output"), (state, "--state")):  # found out now, not after the audit
        reason = path and unwritable(path)
        if reason:
            raise AdvewsError(f"cannot write {flag} {path}: {reason}")
    if state and os.path.exists(state):
        _load_state_file(state)
    if args.merge:
        card = merge_audits(args.merge)
        card["command"] = " ".join(shlex.quote(w) for w in ["advews-eval", "--audit", "--merge", *args.merge])
    else:
        quiet = dataclasses.replace(args, attack="none", state=None, output=None, hdf5=None, audit=False,
                                    n_examples=args.n_examples or 200, shards=None, shard=None)
        surrogate = None
        if args.surrogate:  # loads before the model's data, so a bad surrogate costs nothing
            surrogate = checkpoint_model(args.surrogate, torch.device("cpu"), None)
        run = prepare(quiet, model)
        eps, norm = threat_model(args, facts(run.model))
        settings = AuditSettings(eps=eps, norm=norm, **settings_only)
        if args.bpda:
            surrogate = bpda_surrogate(run.model, [m for m in args.bpda.split(",") if m])
        xs, ys = zip(*run.data.batches(args.batch_size))
        card = run_audit(run.model, torch.cat(xs), torch.cat(ys), settings, batch_size=args.batch_size,
                         device=run.device, surrogate=surrogate.to(run.device) if surrogate is not None else None,
                         surrogate_name=args.surrogate or (f"bpda:{args.bpda}" if args.bpda else None),
                         state_path=state, shard=(args.shard, args.shards) if args.shards is not None else None,
                         log=lambda line: print(f"audit: {line}", file=sys.stderr, flush=True))
        card = {**run.info, **card, "command": equivalent_command(args, settings)}
        if args.shards is not None:
            return card, [state]
    return card, write_card(card, output) if output else []


@public
def audit(
    model: Any,
    data: Optional[str] = None,
    eps: Optional[float] = None,
    *,
    norm: Optional[str] = None,
    n_examples: int = 200,
    batch_size: int = 256,
    steps: int = 50,
    indicators: Union[str, Sequence[str], None] = None,
    sweep: Union[str, Sequence[float]] = "0,0.25,0.5,1,2",
    square_queries: int = 5000,
    best_of: int = 10,
    eot: int = 20,
    surrogate: Optional[str] = None,
    bpda: Union[str, Sequence[str], None] = None,
    seed: int = 0,
    state: Optional[str] = None,
    output: Optional[str] = None,
    force: bool = False,
    device: str = "auto",
    weights_from: Optional[str] = None,
) -> Dict[str, Any]:
    """``advews-eval --audit`` as a function: the audit card (also written to ``output``, by default
    audit.json and audit.md next to a checkpoint). ``model``: a checkpoint or export path, or an
    nn.Module taking [0, 1] pixels (then ``data`` and ``eps`` are needed); ``sweep``: fractions of eps;
    ``surrogate``: a checkpoint whose examples are transferred; ``bpda``: submodules to pass gradients
    straight through in a surrogate copy of the model. Raises AdvewsError with one line."""
    from advews.api.arguments import check_arguments
    from advews.api.evaluate import split_model
    from advews.api.options import EvalOptions, comma_list

    check_arguments("audit", locals())
    if not isinstance(sweep, str):
        sweep = ",".join(str(float(v)) for v in sweep)
    checkpoint, module = split_model(model)
    args = EvalOptions(checkpoint=checkpoint, data=data, eps=eps, norm=norm, n_examples=n_examples,
                       batch_size=batch_size, steps=steps, audit=True, audit_indicators=comma_list(indicators),
                       audit_sweep=sweep, square_queries=square_queries, best_of=best_of, eot=eot,
                       surrogate=surrogate, bpda=comma_list(bpda), seed=seed, state=state, output=output,
                       force=force, device=device, weights_from=weights_from)
    return audit_from_options(args, module, default_output=False)[0]


def equivalent_command(args: Any, settings: AuditSettings) -> str:
    """The advews-eval command that reproduces the card (every setting and seed spelled out)."""
    model = (["--checkpoint", args.checkpoint] if args.checkpoint else ["--model", args.model] if args.model else
             ["--arch", args.arch, "--weights", args.weights] if args.arch else ["--model", "MODULE:FUNCTION"])
    words = ["advews-eval", *model, "--audit", *(["--data", args.data] if args.data else []),
             "--eps", f"{settings.eps:g}", "--norm", settings.norm, "--n-examples", str(args.n_examples or 200),
             "--batch-size", str(args.batch_size), "--steps", str(settings.steps),
             "--audit-indicators", ",".join(settings.indicators),
             "--audit-sweep", ",".join(f"{v:g}" for v in settings.sweep), "--square-queries",
             str(settings.square_queries), "--best-of", str(settings.best_of), "--eot", str(settings.eot),
             "--seed", str(settings.seed), *(["--surrogate", args.surrogate] if args.surrogate else []),
             *(["--bpda", args.bpda] if args.bpda else []), *(["--weights-from", args.weights_from]
                                                             if args.weights_from else [])]
    return " ".join(shlex.quote(w) for w in words)


__all__ = ["INDICATORS", "AuditSettings", "audit", "bpda_surrogate", "card_markdown", "merge_audits", "run_audit",
           "write_card"]
