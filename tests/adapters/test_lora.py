"""LoRA baselines: masked LoRA keeps every zero through the merge; plain LoRA (peft) merges densely and
the run reports exactly the sparsity it lost."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from sppx.adapters import LoRAAdapter, MaskedLoRAAdapter, MaskedLoRALinear, load_adapter
from sppx.anatomy import prunable_linears
from sppx.errors import ConfigError
from sppx.models import TinyLlama
from sppx.pipeline import run
from sppx.pruning import SparsityPattern, WandaPruner, prune_model
from tests.conftest import compose_config, tiny_run_overrides

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_a_little(model, steps=3, seed=0):
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def pruned_tiny(pattern=SparsityPattern()):
    model, _ = TinyLlama(seed=0).load()
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_model(model, WandaPruner(batch_size=4), 0.5, pattern, calib, progress=False)
    return model


def test_masked_lora_layer_forward_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(48, 32, bias=False)
    with torch.no_grad():
        base.weight.mul_(torch.rand_like(base.weight) > 0.5)
    zeros = base.weight == 0
    layer = MaskedLoRALinear(copy.deepcopy(base), r=4, scale=2.0, dropout=0.0)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 48)
    expected = x @ base.weight.T + 2.0 * x @ ((layer.B @ layer.A) * ~zeros).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    merged = layer.merged_weight()
    torch.testing.assert_close(x @ merged.T, layer(x), rtol=1e-5, atol=1e-5)
    assert (merged[zeros] == 0).all() and (merged[~zeros] != base.weight[~zeros]).any()


@pytest.mark.parametrize("pattern", [SparsityPattern(), SparsityPattern("nm", 2, 4)], ids=lambda p: p.label)
def test_masked_lora_keeps_every_zero_and_merged_equals_unmerged(pattern):
    model = pruned_tiny(pattern)
    zeros = {n: lin.weight == 0 for n, lin in prunable_linears(model, TARGETS).items()}
    adapter = MaskedLoRAAdapter(dropout=0.0)
    adapter.apply(model)
    train_a_little(model)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    assert len(adapter.merge(model)) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)
    for name, lin in prunable_linears(model, TARGETS).items():
        assert type(lin) is nn.Linear
        assert (lin.weight[zeros[name]] == 0).all()
        assert int((lin.weight == 0).sum()) == int(zeros[name].sum())  # the update moved every kept weight


@pytest.mark.slow
def test_lora_merges_densely_through_peft(tmp_path):
    model = pruned_tiny()
    adapter = LoRAAdapter(dropout=0.0)
    names = adapter.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == 2 * len(names)
    train_a_little(model)
    adapter.save(model, tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    adapter.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-4)
    assert all(type(lin) is nn.Linear for lin in prunable_linears(model, TARGETS).values())
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # peft's own loader reads it (onto the pruned model it was tuned on) and merges to the same weights.
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(pruned_tiny(), str(tmp_path / "adapter")).merge_and_unload()
    for (name, a), b in zip(
        prunable_linears(model, TARGETS).items(), prunable_linears(peft_model, TARGETS).values(), strict=True
    ):
        torch.testing.assert_close(a.weight, b.weight, msg=name)

    # The saved adapter rebuilds the same merge on a fresh copy of the pruned model.
    fresh = pruned_tiny()
    assert fresh is not model and not hasattr(model, "peft_config")
    load_adapter(fresh, tmp_path / "adapter").merge(fresh)
    for (name, a), b in zip(
        prunable_linears(model, TARGETS).items(), prunable_linears(fresh, TARGETS).values(), strict=True
    ):
        torch.testing.assert_close(a.weight, b.weight, msg=name)


@pytest.mark.slow
def test_run_reports_the_sparsity_lora_destroyed(tmp_path, text_file):
    cfg = compose_config(
        tiny_run_overrides(text_file, adapter="lora", **{"adapter.dropout": 0.0}), tmp_path / "r"
    )
    results = run(cfg, progress=False)
    sp = results["sparsity"]
    assert sp["before_merge"] == 0.5
    linears = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    numel = 2 * sum(o * i for o, i in linears)
    # Count the zeros left in the exported weights: the report must match them exactly.
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "r" / "model" / "model.safetensors"))
    zeros = sum(int((t == 0).sum()) for k, t in weights.items() if k.endswith("proj.weight"))
    assert sp["measured"] == pytest.approx(zeros / numel, abs=1e-12)
    assert sp["lost_in_merge"] == pytest.approx(0.5 - zeros / numel, abs=1e-12) and sp["lost_in_merge"] > 0.4
    assert sp["zeros_verified"] == 0

    spp = run(
        compose_config(tiny_run_overrides(text_file, **{"export.enabled": "false"}), tmp_path / "s"),
        progress=False,
    )
    assert spp["sparsity"]["lost_in_merge"] == 0.0 and spp["sparsity"]["before_merge"] == 0.5
    assert math.isfinite(results["ppl"]["final"])


def test_lora_arguments_are_checked():
    with pytest.raises(ConfigError, match=r"^adapter\.r=0: must be an integer >= 1$"):
        LoRAAdapter(r=0)
    with pytest.raises(ConfigError, match=r"^adapter\.dropout=1\.0: must be a number in \[0, 1\)$"):
        MaskedLoRAAdapter(dropout=1.0)
