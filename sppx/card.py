"""The model card (README.md) written into every exported ``model/`` folder."""

from __future__ import annotations

import yaml

from sppx.provenance import base_model, without_paths

METHODS = {
    "magnitude": "magnitude pruning (|W|, one threshold per matrix)",
    "wanda": "Wanda (|W| x input-feature norm, per output row)",
    "sparsegpt": "SparseGPT (OBS weight reconstruction from the calibration Hessian)",
    "comp": "COMP (Block-Influence layer removal, condition-based neuron scores, least-squares mask tuning)",
    "nuteprune": "NutePrune (hard-concrete head/neuron masks learned with numerous teachers from one model)",
    "llm_pruner": "LLM-Pruner (first-order Taylor group importance)",
    "flap": "FLAP (fluctuation metric with bias compensation)",
    "shortgpt": "ShortGPT (layers with the lowest Block Influence removed)",
    "magnitude_structured": "structured magnitude (L2 norm of each unit's weights)",
    "none": "no pruning",
}
ADAPTERS = {
    "spp": "SPP (learnable row/column factors multiplied into the sparse weights; the merge keeps every zero)",
    "masked_lora": "masked LoRA (the low-rank update masked by the pruned weights' zeros)",
    "lora": "LoRA (peft; the merge is dense and fills pruned weights in)",
    "none": "no recovery tuning",
}


def _num(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def loading_lines(structured: dict | None, export: dict | None = None) -> list[str]:
    """How to load the export: plain transformers, or sppx's loader for per-layer widths and for
    compressed weights."""
    if (export or {}).get("format") == "compressed":
        return [
            "Made with sppx: prune -> recover -> merge -> evaluate -> export. Its pruned matrices are stored",
            "compactly (only the kept weights plus a bitmask, in `model.sparse.safetensors`; the layout and the",
            "`sppx_compression` section of config.json are compressed-tensors' sparse-bitmask formats, which",
            "compressed-tensors 0.15+ no longer reads), so it loads with sppx's loader, which restores the dense",
            "matrices (plain `from_pretrained` finds no `model.safetensors` and refuses it):",
            "",
            "```python",
            "from sppx.models import load_pretrained",
            'model = load_pretrained("<this folder>")',
            "```",
        ]
    if structured is not None and structured.get("uniform") is False:
        return [
            "Made with sppx: prune -> recover -> merge -> evaluate -> export. Its decoder layers keep",
            "different widths (listed under `sppx_layer_widths` in config.json), which the standard config",
            "keys cannot describe, so it loads with sppx's loader (plain `from_pretrained` refuses it):",
            "",
            "```python",
            "from sppx.models import load_pretrained",
            'model = load_pretrained("<this folder>")',
            "```",
        ]
    return [
        "Made with sppx: prune -> recover -> merge -> evaluate -> export. Loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
    ]


def card_metadata(results: dict, title: str) -> str:
    """The card's YAML header as the Hub reads it: base model and license where known, tags, the hub
    dataset when the run used one, and a model-index with the final perplexity."""
    from huggingface_hub import EvalResult, ModelCardData

    ch, ppl = results["choices"], results["ppl"]
    structured = (results.get("prune") or {}).get("structure")
    base, license_ = base_model(ch["model"])
    data_path = ((results.get("config") or {}).get("data") or {}).get("path")
    kind = "structured-pruning" if structured else "sparse"
    tags = ["sppx", "pruning", kind, f"pruner-{ch['pruner']}", f"adapter-{ch['adapter']}"]
    evals = []
    if ppl.get("final") is not None:
        evals.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=data_path or ch["data"],
                dataset_name=f"{ch['data']} (evaluation part)",
                metric_type="perplexity",
                metric_value=round(float(ppl["final"]), 4),
                metric_name=f"perplexity, {ppl['windows']} windows of {ppl['seqlen']} tokens",
            )
        )
    data = ModelCardData(
        base_model=base,
        license=license_,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[data_path] if data_path else None,
        model_name=title if evals else None,
        eval_results=evals or None,
    )
    return data.to_yaml()


def model_card(results: dict) -> str:
    """Markdown: what was done, the measured numbers, the measured sparsity per module type, the
    resolved config and the command that reproduces it (from a run's results)."""
    return "\n".join(
        [
            *method_lines(results),
            *metric_lines(results),
            *zero_shot_lines(results.get("zeroshot")),
            *speed_lines(results.get("speed")),
            *sparsity_lines(results),
            *reproduce_lines(results),
        ]
    )


def method_lines(results: dict) -> list[str]:
    ch, sp = without_paths(results["choices"]), results["sparsity"]
    structured = (results.get("prune") or {}).get("structure")
    title = f"{ch['model']}, {ch['pruner']} {sp['pattern']}, {ch['adapter']} recovery"
    made = results.get("sppx") or {}
    lines = [
        "---",
        card_metadata(results, title).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        *loading_lines(structured, results.get("export")),
        "",
        f"sppx {made.get('version', '?')}" + (f", commit {made['commit']}" if made.get("commit") else ""),
        "",
        "## Method",
        "",
        f"- Model: {ch['model']}",
        f"- Pruning: {METHODS.get(ch['pruner'], ch['pruner'])}, pattern {sp['pattern']}, "
        f"requested sparsity {sp['requested']:g}",
        f"- Recovery: {ADAPTERS.get(ch['adapter'], ch['adapter'])}; teacher: {ch['teacher']}",
        f"- Data: {ch['data']}",
    ]
    if results.get("export"):
        lines.append(f"- Saved as: {results['export']['format']}, {results['export']['dtype']} weights")
    if structured and structured.get("uniform", True):
        lines.append(
            f"- Structure kept: {structured['layers']} layers, {structured['heads_per_layer']} query heads "
            f"({structured['kv_heads_per_layer']} K/V) and {structured['neurons_per_layer']} FFN neurons per "
            "layer; the pruned units are removed from the matrices"
        )
    elif structured:
        widths = ", ".join(f"{w['heads']}/{w['kv_heads']}/{w['neurons']}" for w in structured["widths"])
        lines.append(
            f"- Structure kept: {structured['layers']} layers with per-layer widths (query heads / K/V heads "
            f"/ FFN neurons): {widths}; the pruned units are removed from the matrices"
        )
    return lines


def metric_lines(results: dict) -> list[str]:
    ppl, params = results["ppl"], results["params"]
    return [
        "",
        "## Metrics",
        "",
        f"Perplexity on {ppl['windows']} windows of {ppl['seqlen']} tokens of the evaluation text:",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| dense | {_num(ppl['dense'])} |",
        f"| pruned | {_num(ppl['pruned'])} |",
        f"| final (this model) | {_num(ppl['final'])} |",
        "",
        f"Parameters: {params['total']:,} ({params['nonzero']:,} nonzero).",
    ]


def zero_shot_lines(zs: dict | None) -> list[str]:
    if not (zs and zs.get("stages")):
        return []
    stages = list(zs["stages"])
    lines = [
        "",
        "Zero-shot accuracy (lm-evaluation-harness"
        + (f", at most {zs['limit']} examples per task" if zs.get("limit") else "")
        + "):",
        "",
        "| task | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for task in zs["tasks"]:
        cells = [_num(zs["stages"][s].get(task, {}).get("acc"), ".4f") for s in stages]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(_num(zs["mean_acc"].get(s), ".4f") for s in stages) + " |")
    if zs.get("skipped"):
        lines.append(f"\nSkipped (dataset not available): {', '.join(zs['skipped'])}.")
    return lines


def speed_lines(speed: dict | None) -> list[str]:
    if not (speed and "final" in speed):
        return []
    setup = speed["setup"]
    lines = [
        "",
        f"Speed ({setup['device']}, {setup['threads']} threads, medians of {setup['repeats']} rounds "
        "side by side with the dense model):",
        "",
        "| model | prefill tok/s | decode tok/s | prefill x dense | decode x dense |",
        "|---|---|---|---|---|",
    ]
    for name, s in speed.items():
        if name != "setup":
            lines.append(
                f"| {name} | {s['prefill_tps']:.1f} | {s['decode_tps']:.2f} | {s['prefill_x']:.2f} | "
                f"{s['decode_x']:.2f} |"
            )
    return lines


def sparsity_lines(results: dict) -> list[str]:
    sp = results["sparsity"]
    structured = (results.get("prune") or {}).get("structure")
    lines = [
        "",
        "## Measured sparsity",
        "",
        f"Fraction of the weights of the pruned projections that are {'removed' if structured else 'zero'}"
        f" (measured after the merge): {sp['measured']:.4f} (target {sp['target']:.4f}).",
        "",
        "| module type | sparsity |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in sorted(sp["per_type"].items())),
    ]
    if not structured and sp.get("zeros_verified"):
        lines.append(
            f"\nEvery one of the {sp['zeros_verified']:,} pruned weights was checked to be exactly 0.0 after "
            "the merge, and again in the saved safetensors files."
        )
    return lines


def reproduce_lines(results: dict) -> list[str]:
    lines = ["", "## Reproduce", ""]
    if results.get("command"):
        lines += ["From a checkout of sppx:", "", "```", without_paths(results["command"]), "```"]
    else:
        lines.append("The run was not started from the command line; its resolved config is below.")
    return [
        *lines,
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(without_paths(results["config"]), sort_keys=False, default_flow_style=None).rstrip(),
        "```",
        "",
    ]
