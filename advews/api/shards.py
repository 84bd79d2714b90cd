"""Sharded, resumable and mixed-precision evaluation: what advews-eval runs under torchrun, with
``--shards N --shard I``, ``--state`` or ``--amp``.

Shard layout: the evaluated examples (the first --n-examples of the test data, n of them) are cut
into N contiguous ranges whose sizes differ by at most one: shard i holds global examples
[start_i, start_i + size_i) with start_i = i * (n // N) + min(i, n % N), size_i = n // N + (i < n % N).
A shard's k-th flag is global example start_i + k, so the merged flags are the shards' flags
concatenated in shard order. Each shard is evaluated exactly as a run on those examples alone
(every attack starts from --seed, batches are cut from the shard's first example), so its flags
equal that run's flags; they need not equal an unsharded run's, whose batches (and so random
starts) fall elsewhere.

Under torchrun each rank is one shard (WORLD_SIZE shards, rank = shard); rank 0 gathers the shards'
records and writes the one JSON / HDF5 and report. With --shards N --shard I (array jobs) each job
writes its --state file and ``advews-eval --merge`` builds the report from all N of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from advews.api.eval_state import STATE_FORMAT, claim, pack, shard_path, write_state
from advews.engine.ledger import AttackCost
from advews.api.options import EvalOptions
from advews.api.precision_check import attack_flags
from advews.api.shard_merge import merge_records
from advews.data.fingerprint import tensor_fingerprint
from advews.errors import AdvewsError
from advews.evaluation.robust import correct_flags

GATHER_TIMEOUT = datetime.timedelta(days=7)  # ranks finish their shards hours apart on long runs
LAYOUT = "contiguous"
FIXED_LAYOUT = "whole batches, seeded per batch"  # --fixed-batches


@dataclasses.dataclass(frozen=True)
class World:
    """This process's shard, and whether the shards are torchrun ranks (gathered here) or jobs."""

    shards: int
    shard: int
    torchrun: bool


def world(args: EvalOptions) -> World:
    """torchrun's WORLD_SIZE / RANK, else --shards / --shard, else one shard; checked flags."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        if args.shards is not None or args.shard is not None:
            raise AdvewsError(f"--shards/--shard are for runs without torchrun; under torchrun each of the "
                              f"{size} ranks is one shard")
        return World(size, int(os.environ["RANK"]), True)
    if args.shards is None and args.shard is None:
        return World(1, 0, False)
    if args.shards is None or args.shard is None:
        raise AdvewsError("--shards N and --shard I go together (I from 0 to N - 1)")
    if args.shards < 1:
        raise AdvewsError(f"--shards must be >= 1, got {args.shards}")
    if not 0 <= args.shard < args.shards:
        raise AdvewsError(f"--shard must be in 0..{args.shards - 1} for --shards {args.shards}, got {args.shard}")
    if args.shards > 1 and not args.state:
        raise AdvewsError("--shards needs --state FILE: each shard saves its flags there for advews-eval --merge")
    if args.shards > 1 and (args.output or args.hdf5):
        raise AdvewsError(f"{'--output' if args.output else '--hdf5'} is written by advews-eval --merge when the "
                          "shards run as separate jobs; give it there")
    return World(args.shards, args.shard, False)


def shard_bounds(n: int, shards: int, shard: int, batch_size: Optional[int] = None) -> Tuple[int, int]:
    """Global [start, stop) of ``shard``: contiguous, sizes differing by at most one; with
    ``batch_size`` (--fixed-batches), whole batches, counts differing by at most one batch."""
    if batch_size is not None:
        batches = -(-n // batch_size)
        if shards > batches:
            raise AdvewsError(f"{shards} shards for {batches} batches of {batch_size} (--fixed-batches): every "
                              "shard needs at least one batch; lower --batch-size or the number of shards")
        first, last = shard_bounds(batches, shards, shard)
        return first * batch_size, min(last * batch_size, n)
    if shards > n:
        raise AdvewsError(f"{shards} shards for {n} examples: every shard needs at least one example")
    size, extra = divmod(n, shards)
    start = shard * size + min(shard, extra)
    return start, start + size + (1 if shard < extra else 0)


def run_sharded(args: EvalOptions, model: Optional[nn.Module], prepare: Callable[..., Any]
                ) -> Tuple[Dict[str, Any], Dict[str, Any], bool]:
    """Evaluate this process's shard: the result (merged from all ranks under torchrun; this shard's
    alone for an array job), the per-example flags for --hdf5, and whether this process writes them
    (rank 0, or a run without torchrun). --perturbations runs here too, unsharded, before the attacks.
    ``prepare``: advews.api.evaluate's (passed in, as that module calls this one)."""
    place = world(args)
    if args.corruptions or args.analysis:
        what = "--corruptions" if args.corruptions else "--analysis"
        raise AdvewsError(f"{what} runs without --state, --amp, --perturbations, --fixed-batches and sharding; "
                          "run it separately")
    if args.perturbations and place.shards > 1:
        raise AdvewsError("--perturbations runs in one process; run it without --shards or torchrun")
    if args.perturbation_baseline and not args.perturbations:
        raise AdvewsError("--perturbation-baseline normalises --perturbations; give both")
    if args.perturbations and args.attack is None:
        args = dataclasses.replace(args, attack="none")  # flip rates alone unless attacks are named
    if args.amp and args.attack == "none":
        raise AdvewsError("--amp runs the attacks in low precision; --attack none runs none")
    opened = None
    if args.perturbations:
        from advews.api.perturbations import open_perturbations

        opened = open_perturbations(args.perturbations, args.perturbation_baseline)
    state = shard_path(args.state, place.shard, place.shards) if args.state else None
    created = place.torchrun and _init_group()
    if place.torchrun:
        if place.shard != 0:  # only rank 0 writes, so only its --output and --hdf5 are checked
            args = dataclasses.replace(args, output=None, hdf5=None)
    run = prepare(dataclasses.replace(args, state=state, device=shard_device(args)), model)
    perturbations = None
    if opened is not None:
        from advews.api.perturbations import flip_rates

        perturbations = flip_rates(run.model, opened, batch_size=args.batch_size, device=run.device)
    total = len(run.data)
    start, stop = shard_bounds(total, place.shards, place.shard, args.batch_size if args.fixed_batches else None)
    whole = evaluation_fingerprint(run.data, args.batch_size)
    run = dataclasses.replace(run, data=run.data.subset(torch.arange(start, stop)))
    record = evaluate_shard(args, run, place, (start, stop), (total, whole), state)
    if place.torchrun:
        from advews.collectives import all_gather_object

        records = all_gather_object(record)
        if created:
            from advews.engine.distributed import shutdown

            shutdown()  # gc, barrier, destroy: gloo aborts some exits without them
        result, flags = merge_records(records)
    else:
        result, flags = merge_records([record], partial=place.shards > 1)
    if perturbations is not None:
        result["perturbations"] = perturbations
    return result, flags, place.shard == 0 or not place.torchrun


def _init_group() -> bool:
    """gloo carries the (small) gathered records on any device; each rank attacks on its own GPU.
    Whether the group was created here (a caller's own group is left alone)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    return True


def shard_device(args: EvalOptions) -> str:
    """--device for this rank: auto/cuda become cuda:LOCAL_RANK under torchrun."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and args.device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local}"
    return args.device


def evaluation_fingerprint(data: Any, batch_size: int) -> str:
    """SHA-256 of the content of all the evaluated examples and labels, as selected (--data and
    --n-examples): every shard's identity holds it, so shards of other data are never merged."""
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):  # in memory: the stored bytes
        return tensor_fingerprint([images, labels])
    return tensor_fingerprint(t for batch in data.batches(batch_size) for t in batch)


def evaluate_shard(args: EvalOptions, run: Any, place: World, bounds: Tuple[int, int], whole: Tuple[int, str],
                   state: Optional[str]) -> Dict[str, Any]:
    """The shard's record (see advews.api.eval_state): clean flags, then each attack, saved to
    ``state`` after every batch or AutoAttack stage, skipping what a previous run saved. ``whole``:
    the number of examples of the whole evaluation and the fingerprint of their content. The state
    file is locked for the whole shard."""
    xs, ys = zip(*run.data.batches(args.batch_size))
    x, y = torch.cat(xs), torch.cat(ys)
    identity = {
        "attack": run.attack_spec, "params": run.params, "seed": args.seed, "batch_size": args.batch_size,
        "amp": args.amp, "n_examples": whole[0], "layout": FIXED_LAYOUT if args.fixed_batches else LAYOUT,
        "model": tensor_fingerprint(list(run.model.state_dict().values())), "data": whole[1],
        **({"amp_fp32_reattack": True} if args.amp else {}),  # earlier --amp states lack the re-attack
    }
    fresh = {"format": STATE_FORMAT, "identity": identity, "shard": place.shard, "shards": place.shards,
             "start": bounds[0], "stop": bounds[1], "data": tensor_fingerprint([x, y]), "info": run.info,
             "threat": list(run.threat), "labels": y.tolist(), "attacks": {}, "progress": {}}
    record, lock = _claim_everywhere(state, fresh, place)
    try:
        return _run_shard(args, run, place, bounds, state, record, x, y)
    finally:
        if lock is not None:
            lock.release()


def _claim_everywhere(state: Optional[str], fresh: Dict[str, Any], place: World):
    """``claim`` on every rank; under torchrun a refusal on any rank stops all of them (none waits for
    the others' records forever) and only rank 0 prints it."""
    if not place.torchrun:
        return claim(state, fresh)
    from advews.collectives import all_gather_object

    got, refusal = (fresh, None), None
    try:
        got = claim(state, fresh)
    except AdvewsError as error:
        refusal = (str(error), getattr(error, "exit_code", 2))
    refusals = [r for r in all_gather_object(refusal) if r]
    if refusals:
        if got[1] is not None:
            got[1].release()
        error = AdvewsError(refusals[0][0])
        error.exit_code = refusals[0][1]
        error.main_rank = place.shard == 0  # advews-eval prints it on rank 0 only
        raise error
    return got


def _run_shard(args: EvalOptions, run: Any, place: World, bounds: Tuple[int, int], state: Optional[str],
               record: Dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> Dict[str, Any]:
    """Clean flags, then each attack not yet in ``record``, saved to ``state`` as they finish."""
    say = _logger(place)

    def save() -> None:
        if state:
            write_state(state, record)

    began = time.time()
    if "clean" not in record:
        record["clean"] = pack(correct_flags(run.model, run.data, batch_size=args.batch_size, device=run.device,
                                             desc="clean"))
        save()
    cost = AttackCost(run.model, x[:1].to(run.device)) if run.attacks else None
    for name, attack in run.attacks.items():
        if name in record["attacks"]:
            say(f"{name}: restored from {state}")
            continue
        torch.manual_seed(args.seed)
        counted: Dict[str, Any] = {}  # passes and FLOPs, kept only for an attack run whole in this process
        whole = name not in record["progress"]

        def keep(progress: Dict[str, Any], name: str = name) -> None:
            record["progress"][name] = progress
            save()

        with cost.count(counted, len(y)):
            if name == "autoattack":
                done = _autoattack(args, run, x, y, (state, record["progress"].get(name)), keep, say)
            else:
                flags = attack_flags(
                    run.model, run.data, attack, batch_size=args.batch_size, device=run.device, amp=args.amp,
                    progress_state=record["progress"].get(name), save=keep, desc=name,
                    batch_seeds=(args.seed, bounds[0] // args.batch_size) if args.fixed_batches else None)
                done = {"robust": pack(flags.robust), "entry": {**run.params[name], "seconds": flags.seconds}}
                if flags.low is not None:
                    stages, done["entry"]["stages"] = _amp_stages(name, args.amp, flags, not whole)
                    done.update(low_robust=pack(flags.low), stages=stages)
        if whole:
            done["entry"].update(counted)
        record["attacks"][name] = done
        record["progress"].pop(name, None)
        save()
    record["seconds"] = round(record.get("seconds", 0.0) + time.time() - began, 2)
    save()
    return record


def _amp_stages(name: str, amp: str, flags: Any, resumed: bool) -> Tuple[Dict[str, str], List[Dict[str, Any]]]:
    """--amp's two stages of an attack other than AutoAttack, as the record's per-example flags and
    its entry's list: after the fp32 check of the low-precision examples (``<name>-<amp>``), and
    after the fp32 re-attack of the points still robust (``<name>-fp32``, the robust flags); so the
    merged JSON and --hdf5 have both."""
    checked, final = f"{name}-{amp}", f"{name}-fp32"
    n = max(len(flags.robust), 1)
    seconds = {checked: round(flags.seconds - flags.fp32_seconds, 2), final: flags.fp32_seconds}
    stage_flags = {checked: flags.checked, final: flags.robust}
    return ({stage: pack(f) for stage, f in stage_flags.items()},
            [{"attack": stage, "robust_acc": int(f.sum()) / n, "seconds": seconds[stage], "resumed": resumed}
             for stage, f in stage_flags.items()])


def _autoattack(args: EvalOptions, run: Any, x: torch.Tensor, y: torch.Tensor,
                saved: Tuple[Optional[str], Optional[Dict[str, Any]]], keep, say) -> Dict[str, Any]:
    """The reference AutoAttack on the shard, its per-stage state kept in the shard's record."""
    from advews.attacks.autoattack import run_autoattack

    class Nested:
        name = f"{saved[0]} (autoattack progress)"

        def load(self) -> Optional[Dict[str, Any]]:
            return saved[1]

        def save(self, state: Dict[str, Any]) -> None:
            keep(state)

    params = run.params["autoattack"]
    res = run_autoattack(run.model, x, y, eps=params["eps"], norm=params["norm"], version=args.version,
                         attacks=params.get("aa_attacks"), seed=args.seed, batch_size=args.batch_size,
                         state_io=Nested() if saved[0] else None, amp=args.amp, log=say,
                         fixed_batches=args.fixed_batches)
    return {
        "robust": pack(res["robust"]),
        "stages": {name: pack(flags) for name, flags in res["stage_robust"].items()},
        "entry": {**params, "stages": res["stages"], "warnings": res["warnings"],
                  "seconds": round(sum(s["seconds"] for s in res["stages"]), 2)},
        **({"low_robust": pack(res["low_precision_robust"])} if args.amp else {}),
    }


def _logger(place: World):
    prefix = f"autoattack[shard {place.shard}/{place.shards}]" if place.shards > 1 else "autoattack"
    return lambda line: print(f"{prefix}: {line}", file=sys.stderr, flush=True)
