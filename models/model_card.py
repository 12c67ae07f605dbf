"""The README.md model card of an exported model: a YAML header in the Hugging Face Hub's conventions, then
the run's test metrics, data, training recipe and how to load the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CARD_METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
_MAPPERS = {"mlp": "an MLP", "transformer": "a Transformer"}
_HUB_METRIC_TYPES = {"BLEU-4": "bleu", "METEOR": "meteor", "ROUGE-L": "rouge", "CIDEr": "cider", "SPICE": "spice"}


def model_card(
    config: dict[str, Any],
    folder_config: dict[str, Any],
    test_report: dict[str, Any] | None,
    name: str,
    license_id: str,
    load_as: str,
) -> str:
    """Markdown model card. ``config``: the run's config (``to_dict``); ``folder_config``: the exported
    ``config.json``; ``test_report``: the run's ``test_metrics.json`` (None when there is none);
    ``load_as``: what to pass to ``load_captioner`` (a Hub repository id or a folder)."""
    metrics = (test_report or {}).get("metrics", {})
    dataset = _dataset_name(config)
    header = {
        "pipeline_tag": "image-to-text",
        "license": license_id,
        "tags": ["image-captioning", "opg-captioner", "gpt2", "scst" if config["scst"] else "cross-entropy"],
        "metrics": sorted({_HUB_METRIC_TYPES[m] for m in metrics if m in _HUB_METRIC_TYPES}),
    }
    if metrics:
        header["model-index"] = [_model_index(name, dataset, metrics)]
    sections = [
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n",
        f"# {name}\n\n{_summary(config, folder_config)}\n",
        _metrics_section(test_report, dataset),
        _data_section(config),
        _recipe_section(config),
        _usage_section(load_as),
    ]
    return "\n".join(sections)


_GENERIC_FOLDERS = {"annotations", "annotation", "images", "data", "splits", "karpathy", ""}


def _dataset_name(config: dict[str, Any]) -> str:
    """The data set's name: the nearest folder above the test file that is not a generic one."""
    for folder in Path(config["data"]["test_file"]).parents:
        if folder.name.lower() not in _GENERIC_FOLDERS:
            return folder.name
    return "unnamed data set"


def _model_index(name: str, dataset: str, metrics: dict[str, float]) -> dict[str, Any]:
    values = [
        {"type": _HUB_METRIC_TYPES[m], "name": m, "value": round(metrics[m] * 100, 2)}
        for m in CARD_METRICS
        if m in metrics and m in _HUB_METRIC_TYPES
    ]
    result = {
        "task": {"type": "image-to-text", "name": "Image captioning"},
        "dataset": {"type": dataset, "name": f"{dataset} (test split)"},
        "metrics": values,
    }
    return {"name": name, "results": [result]}


def _summary(config: dict[str, Any], folder_config: dict[str, Any]) -> str:
    arch = folder_config["architecture"]
    gpt2, vision = arch["gpt2_config"], arch["vision_config"]
    vocab = folder_config["output_vocabulary"]
    if not arch["sparse_mask"]:
        mask = "no sparse mask"
    elif arch.get("sparse_mask_applied", True):
        mask = "a learned sparse mask over the prefix positions"
    else:
        mask = "a sparse mask that it was trained with in cross-entropy but does not apply (as after SCST)"
    return (
        "An OPG image captioner (one-stage prefix-based generator): a frozen X-VLM Swin image encoder "
        f"({vision['image_res']} px, embed {vision['embed_dim']}, depths {vision['depths']}) gives "
        f"{arch['prefix_length']} visual tokens, {_MAPPERS[arch['mapping_type']]} mapping network "
        "turns them into a "
        f"GPT-2 prefix ({gpt2['n_layer']} layers, width {gpt2['n_embd']}), with {mask}; GPT-2 writes the "
        f"caption over an output vocabulary of {vocab['size']} tokens."
    )


def _metrics_section(report: dict[str, Any] | None, dataset: str) -> str:
    if not report or not report.get("metrics"):
        return "## Test metrics\n\nThe run that produced this model recorded no test metrics.\n"
    metrics = report["metrics"]
    shown = [m for m in CARD_METRICS if m in metrics]
    lines = [
        "## Test metrics\n",
        f"Test split of `{dataset}` with the decoding defaults below (metrics x100):\n",
        "| " + " | ".join(shown) + " |",
        "|" + "---:|" * len(shown),
        "| " + " | ".join(f"{metrics[m] * 100:.1f}" for m in shown) + " |",
    ]
    lines += [f"\n{metric}: not computed by the run." for metric in report.get("unavailable", {})]
    return "\n".join(lines) + "\n"


def _data_section(config: dict[str, Any]) -> str:
    data = config["data"]
    train, val, test = (Path(data[key]).name for key in ("train_file", "val_file", "test_file"))
    return (
        "## Data\n\n"
        f"`{_dataset_name(config)}`: trained on `{train}`, the checkpoint chosen by validation CIDEr on `{val}`, "
        f"tested on `{test}`. Captions lower-cased, punctuation dropped, at most {data['max_words']} words, "
        "ending with '.'.\n"
    )


def _recipe_section(config: dict[str, Any]) -> str:
    train, decode, scst = config["train"], config["decode"], config["scst_opts"]
    stage = "SCST with a CIDEr-D reward, from a cross-entropy checkpoint" if config["scst"] else "cross-entropy"
    capped = f" of at most {train['max_steps_per_epoch']} steps" if train.get("max_steps_per_epoch") else ""
    lines = [
        "## Training recipe\n",
        f"- stage: {stage}",
        f"- {train['epochs']} epoch(s){capped}, batch {train['batch_size']}, AdamW lr {train['lr']}, weight decay "
        f"{train['weight_decay']}, warm-up {train['warmup_ratio']:.0%} then linear decay, precision "
        f"{train['precision']}, seed {train['seed']}",
    ]
    if config["scst"]:
        lines.append(
            f"- SCST: {scst['num_samples']} samples per image, {scst['baseline']} baseline, "
            f"dropout while sampling: {scst['dropout']}"
        )
    elif train["use_aux_loss"]:
        lines.append(f"- loss: cross-entropy + {train['aux_weight']} x N-pair loss")
    lines.append(
        f"- decoding defaults: {decode['beams']} beams, {decode['min_len']} to {decode['max_len']} tokens, "
        f"length penalty {decode['length_penalty']} (also in `generation_config.json`)"
    )
    return "\n".join(lines) + "\n"


def _usage_section(load_as: str) -> str:
    return f"""## How to use

With the OPG captioner code (its `models` package) installed or on the path:

```python
from models import load_captioner
captioner = load_captioner("{load_as}")
print(captioner.caption(["photo.jpg"], beams=3))
```

or from the command line: `python predict.py --checkpoint {load_as} --images photos/`. Loading reads JSON and
safetensors files only; no pickled code is executed.
"""
