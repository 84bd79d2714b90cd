"""The export's README.md: a model card in the model hubs' format, written with huggingface_hub's
own ``ModelCardData`` / ``EvalResult`` (its YAML and ``model-index``), offline.

The YAML says what a hub indexes (library advews, tags, dataset, the threat model); ``model-index``
holds one metric per number of each evaluation JSON found next to the checkpoint (clean accuracy,
each attack and AutoAttack with its parameters, the worst case over several attacks, corruption
error, flip rates), each with its JSON's file name and SHA-256 in ``args``; the text repeats them
with the command that produced each and the audit verdicts. The card is parsed back with
``ModelCard`` before it is written and must give the same numbers, so what a hub shows is what the
JSONs say."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from advews.engine.evaluations import AUDIT, RESULT, Evaluation, attack_label, data_flag
from advews.engine.robustbench_info import format_eps

TASK = "image-classification"
# Entries of an attack's JSON that are results, not parameters (cli/eval.py's NOT_PARAMS and the attack's cost).
_RESULTS = ("robust_acc", "seconds", "stages", "warnings", "amp", "robust_acc_low_precision", "broken_low_precision",
            "confirmed_fp32", "broken_fp32", "precision_warning", "missed_low_precision", "forward_passes",
            "backward_passes", "flops")
# (key in a --perturbations result, metric type, name)
_FLIP_METRICS = (("mean_flip_probability", "flip_probability", "Mean flip probability"),
                 ("mean_top5_distance", "top5_distance", "Mean top-5 distance"),
                 ("mfr", "mFR", "mFR (flip rate normalised by the baseline)"),
                 ("mt5d", "mT5D", "mT5D (top-5 distance normalised by the baseline)"))
UPLOAD = "hf upload USER/NAME {dir}"


def _where(evaluation: Evaluation, dataset: str) -> Dict[str, Any]:
    """The dataset an evaluation ran on: --data when its command names one, else the test split."""
    data = data_flag(evaluation.command)
    if data is not None:
        return {"dataset_type": data, "dataset_name": data}
    return {"dataset_type": dataset, "dataset_name": f"{dataset} test split", "dataset_split": "test"}


def metrics(evaluation: Evaluation, dataset: str) -> List[Dict[str, Any]]:
    """The metrics of one evaluation JSON as ``EvalResult`` keyword arguments (one per number)."""
    data = evaluation.data
    source = {"evaluation": evaluation.name, "sha256": evaluation.sha256}
    where = {"task_type": TASK, "task_name": "Image classification", **_where(evaluation, dataset)}
    n = {"n_examples": data["n_examples"]}
    rows = [dict(where, metric_type="accuracy", metric_name="Clean accuracy", metric_value=data["clean_acc"],
                 metric_config="clean", metric_args={**n, **source})]
    for name, entry in data["attacks"].items():
        params = {k: v for k, v in entry.items() if k not in _RESULTS}
        rows.append(dict(where, metric_type="robust_accuracy", metric_name=f"{attack_label(name, entry)} robust accuracy",
                         metric_value=entry["robust_acc"], metric_config=name, metric_args={**params, **n, **source}))
    if len(data["attacks"]) > 1:
        rows.append(dict(where, metric_type="robust_accuracy", metric_name="Worst case over the attacks",
                         metric_value=data["robust_acc"], metric_config="worst-case",
                         metric_args={"attacks": sorted(data["attacks"]), **n, **source}))
    corruptions = data.get("corruptions")
    if isinstance(corruptions, dict):
        bench = {"task_type": TASK, "task_name": "Common corruptions", "dataset_type": corruptions.get("benchmark"),
                 "dataset_name": str(corruptions.get("benchmark"))}
        args = {"n_examples": corruptions.get("n_examples"), "severities": corruptions.get("severities"), **source}
        rows.append(dict(bench, metric_type="mean_corruption_error", metric_name="Mean corruption error",
                         metric_value=corruptions["mean_error"], metric_config="corruptions", metric_args=args))
        if corruptions.get("mce") is not None:
            rows.append(dict(bench, metric_type="mCE", metric_name="mCE (normalised by AlexNet)",
                             metric_value=corruptions["mce"], metric_config="corruptions", metric_args=args))
    flips = data.get("perturbations")
    if isinstance(flips, dict):
        bench = {"task_type": TASK, "task_name": "Perturbation stability", "dataset_type": flips.get("benchmark"),
                 "dataset_name": str(flips.get("benchmark"))}
        args = {"n_sequences": flips.get("n_sequences"), **source}
        rows += [dict(bench, metric_type=kind, metric_name=label, metric_value=flips[key], metric_config="perturbations",
                      metric_args=args) for key, kind, label in _FLIP_METRICS if flips.get(key) is not None]
    return rows


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else str(value)


def _results_text(evaluations: List[Evaluation], rows: List[Tuple[Evaluation, List[Dict[str, Any]]]]) -> List[str]:
    lines = ["## Results", ""]
    if not evaluations:
        return lines + ["No evaluation JSON was found next to the checkpoint when this card was written "
                        "(`advews-eval --checkpoint CKPT --output CKPT_DIR/NAME.json` writes one).", ""]
    for evaluation, metric_rows in rows:
        lines += [f"### {evaluation.name}", "", "| metric | value | parameters |", "|---|---|---|"]
        for row in metric_rows:
            args = {k: v for k, v in row["metric_args"].items() if k not in ("evaluation", "sha256")}
            shown = ", ".join(f"{k}={format_eps(v) if k == 'eps' else v}" for k, v in args.items())
            value = row["metric_value"]
            lines.append(f"| {row['metric_name']} | {_percent(value)} | {shown} |")
        lines += ["", f"Command: `{evaluation.command}`  ", f"`{evaluation.name}` sha256 `{evaluation.sha256}` "
                  f"(copied to `evaluations/{evaluation.name}`)", ""]
    for audit in [e for e in evaluations if e.kind == AUDIT]:
        card = audit.data
        lines += [f"### Audit ({audit.name}): {card['verdict']}", "",
                  f"{card.get('n_examples')} examples, clean {_percent(card.get('clean_acc'))}, robust "
                  f"{_percent(card.get('robust_acc'))}; indicators flagged: "
                  + (", ".join(r.get("indicator", "?") for r in card["indicators"] if r.get("flagged")) or "none"), "",
                  f"Command: `{audit.command}`  ", f"`{audit.name}` sha256 `{audit.sha256}` "
                  f"(copied to `evaluations/{audit.name}`)", ""]
    return lines


def card_text(config: Dict[str, Any], name: str, evaluations: List[Evaluation], files: Dict[str, str]) -> str:
    """README.md of an export: ``config`` is its config.json, ``files`` maps each file it holds to its
    SHA-256. Parsed back with huggingface_hub before it is returned (``check_card``)."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = (config.get("data_spec") or {}).get("dataset") or "unknown"
    threat = config.get("threat_model") or {}
    spec = config["model_spec"]
    defense = str(config.get("defense"))
    rows = [(e, metrics(e, dataset)) for e in evaluations if e.kind == RESULT]
    results = [EvalResult(**row) for _, metric_rows in rows for row in metric_rows]
    audits = [{"verdict": e.data["verdict"], "evaluation": e.name, "sha256": e.sha256}
              for e in evaluations if e.kind == AUDIT]
    data = ModelCardData(
        library_name="advews", pipeline_tag=TASK, datasets=[dataset], model_name=name,
        tags=["advews", "adversarial-robustness", "image-classification", "safetensors",
              defense.lower().replace("_", "-")],
        eval_results=results or None,
        threat_model={"norm": threat.get("norm"), "eps": threat.get("eps")} if threat else None,
        advews={"arch": spec["arch"], "defense": defense, "epoch": config.get("epoch"), "weights": config.get("weights"),
                "version": config.get("advews_version"), "sha256": files, **({"audits": audits} if audits else {})},
    )
    eps = f"{threat.get('norm')} eps {format_eps(threat['eps'])}" if threat else "no adversarial threat model"
    body = [f"# {name}", "",
            f"`{spec['arch']}` trained with [advews](https://pypi.org/project/advews/) {config.get('advews_version')} "
            f"({defense}, epoch {config.get('epoch')}, {config.get('weights')} weights) on `{dataset}`; threat model: "
            f"{eps}.", "",
            "## Use", "",
            "```python",
            "import advews",
            "",
            "model = advews.load_model(\"THIS_DIR\")  # refuses model.safetensors if its SHA-256 differs from config.json",
            "```", "",
            "or `advews-eval --checkpoint THIS_DIR --attack autoattack`. Only `config.json` and `model.safetensors` are "
            "read: no pickle, no training code.", "",
            "## Files", "",
            "| file | sha256 |", "|---|---|",
            *[f"| `{f}` | `{h}` |" for f, h in sorted(files.items())], "",
            "`config.gin` is the training recipe (the run's operative gin config): "
            "`advews-train --gin config.gin` retrains it.", "",
            *_results_text(evaluations, rows)]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    check_card(text, results)
    return text


def check_card(text: str, results: List[Any]) -> None:
    """Parse ``text`` with huggingface_hub as a hub would; its model-index must give ``results`` back."""
    from huggingface_hub import ModelCard

    parsed = ModelCard(text).data.eval_results or []
    got = [(r.metric_config, r.metric_value, json.dumps(r.metric_args, sort_keys=True)) for r in parsed]
    want = [(r.metric_config, r.metric_value, json.dumps(r.metric_args, sort_keys=True)) for r in results]
    if sorted(got, key=str) != sorted(want, key=str):
        raise RuntimeError(f"the model card does not parse back to its results: {got} != {want}")
