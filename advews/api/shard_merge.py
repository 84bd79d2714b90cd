"""The one result of a sharded evaluation, built from its shards' records (``advews.api.eval_state``):
gathered from the torchrun ranks, or read back from the --state files of array jobs by
``advews-eval --merge STATE...``. Flags are concatenated in shard order, so flag k of the merged
result is global example k; every accuracy is recomputed from the merged flags."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from advews.api.eval_state import first_difference, read_state, unpack, write_result
from advews.api.precision_check import precision_summary
from advews.errors import AdvewsError
from advews.evaluation.worst_case import worst_case

# What every shard of one evaluation shares. Not ``info`` (how the model was named: ``./G.pt`` and
# ``G.pt`` are one model, which the identity's weight hash decides); the merged report uses shard 0's.
SAME = ("identity", "shards", "threat")


def fraction(flags: torch.Tensor) -> float:
    return int(flags.sum()) / max(len(flags), 1)


def _check_shards(records: Sequence[Dict[str, Any]], where: Sequence[str], partial: bool) -> List[int]:
    """Shard order of ``records``, after checking they are the complete shards of one evaluation."""
    first = records[0]
    for record, name in zip(records[1:], where[1:]):
        for key in SAME:
            if record.get(key) != first.get(key):
                differs = first_difference(first.get(key), record.get(key)) if key == "identity" else key
                raise AdvewsError(f"{name} belongs to another evaluation than {where[0]} ({differs} differs); "
                                  "merge the state files of one run")
    for record, name in zip(records, where):
        missing = [a for a in first["identity"]["params"] if a not in record.get("attacks", {})]
        if "clean" not in record or missing:
            raise AdvewsError(f"{name} is unfinished (shard {record['shard']} has not run "
                              f"{', '.join(missing) or 'the clean pass'}); resume it with the same command first")
    order = sorted(range(len(records)), key=lambda i: records[i]["shard"])
    if partial:
        return order
    shards = [records[i]["shard"] for i in order]
    if shards != list(range(first["shards"])):
        have = ", ".join(map(str, shards))
        raise AdvewsError(f"--merge needs each of the {first['shards']} shards exactly once, got shards {have}")
    return order


def merge_records(records: Sequence[Dict[str, Any]], where: Sequence[str] = (), partial: bool = False
                  ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(the result advews-eval writes as JSON, the merged per-example flags for --hdf5). ``partial``:
    one shard of several on its own (an array job's report; not the evaluation's numbers)."""
    where = list(where) or [f"shard {r['shard']}" for r in records]
    order = _check_shards(records, where, partial)
    records = [records[i] for i in order]
    first = records[0]
    params: Dict[str, Dict[str, Any]] = first["identity"]["params"]
    amp = first["identity"]["amp"]

    def cat(get) -> torch.Tensor:
        return torch.cat([unpack(get(r), r["stop"] - r["start"], f"shard {r['shard']}") for r in records])

    clean = cat(lambda r: r["clean"])
    robust = {name: cat(lambda r, n=name: r["attacks"][n]["robust"]) for name in params}
    stages = {name: {s: cat(lambda r, n=name, s=s: r["attacks"][n]["stages"][s]) for s in first["attacks"][name]["stages"]}
              for name in params if "stages" in first["attacks"][name]}
    entries = {name: _entry(name, records, robust[name], stages.get(name, {}), clean,
                            cat(lambda r, n=name: r["attacks"][n]["low_robust"]) if amp else None, amp)
               for name in params}
    eps, norm = first["threat"]
    shared = params[next(iter(params))] if len(params) == 1 else {"eps": eps, "norm": norm} if params else {}
    result: Dict[str, Any] = {
        **first["info"],
        "attack": first["identity"]["attack"],
        **shared,
        "clean_acc": fraction(clean),
        "robust_acc": fraction(worst_case(robust)) if robust else None,
        "n_examples": len(clean),
        "attacks": entries,
        **({"amp": amp} if amp else {}),
        "seconds": max(r.get("seconds", 0.0) for r in records),  # the shards ran side by side
    }
    if partial and first["shards"] > 1:
        result["shard"] = {"index": first["shard"], "of": first["shards"], "start": first["start"],
                           "stop": first["stop"], "note": "one shard only: merge all shards for the evaluation"}
    elif first["shards"] > 1:
        result["shards"] = {"count": first["shards"], "layout": first["identity"]["layout"],
                            "ranges": [[r["start"], r["stop"]] for r in records],
                            "seconds": [r.get("seconds", 0.0) for r in records]}
    labels = torch.tensor([label for r in records for label in r["labels"]], dtype=torch.long)
    flags = {"labels": labels, "clean": clean, "robust": robust, "stages": stages, "params": params,
             "seed": first["identity"]["seed"], "info": first["info"]}
    return result, flags


COST = ("forward_passes", "backward_passes", "flops")  # per example (passes) and total (flops); engine.ledger


def _entry(name: str, records: Sequence[Dict[str, Any]], robust: torch.Tensor, stages: Dict[str, torch.Tensor],
           clean: torch.Tensor, low: Any, amp: Any) -> Dict[str, Any]:
    """One attack's JSON entry over all shards: parameters, accuracy, AutoAttack stages, warnings
    (each once), the seconds summed over the shards, with --amp both broken counts, and its passes
    per example and FLOPs when every shard counted them (an attack resumed mid-way has no count)."""
    shard_entries = [r["attacks"][name]["entry"] for r in records]
    entry: Dict[str, Any] = {"robust_acc": fraction(robust),
                             **{k: v for k, v in shard_entries[0].items() if k not in ("stages", "warnings", "seconds")
                                and k not in COST}}
    if all(k in e for e in shard_entries for k in COST):  # every shard ran it whole (none resumed mid-attack)
        sizes = [r["stop"] - r["start"] for r in records]
        for key in ("forward_passes", "backward_passes"):
            entry[key] = round(sum(e[key] * n for e, n in zip(shard_entries, sizes)) / max(sum(sizes), 1), 3)
        entry["flops"] = sum(e["flops"] for e in shard_entries)
    if stages:
        entry["stages"] = [{"attack": s, "robust_acc": fraction(flags),
                            "seconds": round(sum(next(x["seconds"] for x in e["stages"] if x["attack"] == s)
                                                 for e in shard_entries), 2),
                            "resumed": any(next(x["resumed"] for x in e["stages"] if x["attack"] == s)
                                           for e in shard_entries)}
                           for s, flags in stages.items()]
    warnings = [w for e in shard_entries for w in e.get("warnings", [])]
    if amp:
        entry.update(precision_summary(clean, robust, low, amp))
        warnings += [entry["precision_warning"]] if "precision_warning" in entry else []
    if "stages" in shard_entries[0] or warnings:
        entry["warnings"] = list(dict.fromkeys(warnings))
    entry["seconds"] = round(sum(e["seconds"] for e in shard_entries), 2)
    return entry


def merge_files(paths: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """advews-eval --merge: the result of the shards whose --state files are ``paths``."""
    records = [read_state(p) for p in paths]
    return merge_records(records, where=list(paths))


def write_hdf5(path: str, result: Dict[str, Any], flags: Dict[str, Any]) -> Tuple[str, Any]:
    """The merged per-example flags as advews-eval's --hdf5 file (global example order)."""
    from advews.evaluation.per_example import save_per_example

    attrs = {"seed": flags["seed"], **flags["info"], "attack": result["attack"], "n_examples": result["n_examples"]}
    return write_result(path, "--hdf5", lambda target: save_per_example(
        target, labels=flags["labels"], clean=flags["clean"], robust=flags["robust"], params=flags["params"],
        stages=flags["stages"], attrs=attrs))
