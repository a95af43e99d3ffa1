"""Every described decoder family (sppx.anatomy.FAMILIES) through one-shot pruning, adapters, the dense
teacher, and structured removal (layers, heads, neurons: masked == removed == the export reloaded with
plain transformers), on tiny random models built here from transformers' config classes (seeded; 2
layers, hidden 64, 4 heads / 2 K/V heads where the family has grouped-query attention, intermediate 128,
vocabulary 300, unless a test says otherwise; nothing downloads). Plus the plan's refusals: a model type
sppx has no description of, heads of a family whose config cannot describe fewer, biases or per-layer
widths a family's export cannot keep."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from sppx.adapters import LoRAAdapter, MaskedLoRAAdapter, SPPAdapter
from sppx.anatomy import (
    FAMILIES,
    LLAMA,
    PROJECTIONS,
    SEQUENTIAL_ORDER,
    Dims,
    block_output,
    decoder_layers,
    family_of,
    prunable_linears,
    sequential_groups,
)
from sppx.errors import ConfigError
from sppx.export import save_model
from sppx.masking import StudentMasks
from sppx.models import byte_tokenizer
from sppx.pipeline import plan
from sppx.pipeline.planning import linear_shapes
from sppx.pruning import SparseGPTPruner, SparsityPattern, WandaPruner, prune_model
from sppx.pruning.owl import layer_sparsities
from sppx.pruning.sequential import capture_block_inputs, run_block
from sppx.pruning.structured import (
    COMPPruner,
    FLAPPruner,
    LLMPrunerPruner,
    MagnitudeStructuredPruner,
    ShortGPTPruner,
    StructuredContext,
    shrink_model,
)
from sppx.pruning.structured.hard_concrete import soft_gate
from sppx.pruning.structured.nuteprune import UnitGates
from sppx.pruning.structured.units import Budget, mask_model
from sppx.teachers import DenseTeacher
from tests.conftest import compose_config, tiny_run_overrides

VOCAB = 300


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the tiny models run several times faster than with two on a shared machine."""
    torch.set_num_threads(1)


def tiny_config(name: str, layers: int = 2, hidden: int = 64, heads: int = 4):
    """A config of family ``name`` (2 layers, hidden 64, 4 heads in 2 K/V groups where the family has
    grouped-query attention, intermediate 128 by default). Gemma's layers mix sliding-window (8 tokens)
    and full attention, so the calibration engine must give each block its own mask and rotary tables."""
    sizes = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    gqa = {"num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 128}
    kinds = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
    sliding = {"sliding_window": 8, "layer_types": kinds}
    return {
        "llama": lambda: LlamaConfig(**sizes, **gqa),
        "mistral": lambda: MistralConfig(**sizes, **gqa, sliding_window=8),
        "qwen2": lambda: Qwen2Config(**sizes, **gqa),
        "qwen3": lambda: Qwen3Config(**sizes, **gqa, head_dim=32),
        "gemma2": lambda: Gemma2Config(**sizes, **gqa, head_dim=32, **sliding),
        "gemma3_text": lambda: Gemma3TextConfig(**sizes, **gqa, head_dim=32, **sliding),
        "phi3": lambda: Phi3Config(**sizes, **gqa, pad_token_id=0),
        "opt": lambda: OPTConfig(
            **sizes, ffn_dim=128, word_embed_proj_dim=hidden, max_position_embeddings=128
        ),
        "gpt_neox": lambda: GPTNeoXConfig(**sizes, intermediate_size=128, max_position_embeddings=128),
    }[name]()


NAMES = [f.name for f in FAMILIES]
WITH_HEADS = [f.name for f in FAMILIES if "heads" in f.units]
UNSTRUCTURED = SparsityPattern("unstructured")


def tiny_model(name: str, **sizes) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(name, **sizes)).eval()


def calibration(n: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def perturbed(adapter, model: nn.Module):
    """The adapter's tensors set to random values, as after some training."""
    with torch.no_grad():
        for t in adapter.state(model).values():
            t.normal_(0, 0.2, generator=torch.Generator().manual_seed(6))
    return adapter


def zeros_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: lin.weight == 0 for n, lin in prunable_linears(model, PROJECTIONS).items()}


# --------------------------------------------------------------------------- the descriptions
@pytest.mark.parametrize("name", NAMES)
def test_the_description_matches_the_model(name):
    """Blocks, default targets, the shapes a budget predicts and the parameter count are the model's."""
    model = tiny_model(name)
    family = family_of(model)
    assert family.name == name and family is family_of(model.config)
    assert len(decoder_layers(model)) == 2
    linears = prunable_linears(model, PROJECTIONS)  # the Llama default list: the family's defaults
    assert [n.rsplit(".", 1)[-1] for n in linears] == family.targets * 2
    assert all(n.startswith(family.blocks_path + ".") for n in linears)
    d = Dims.of(model.config)
    assert {n: tuple(lin.weight.shape) for n, lin in linears.items()} == Budget().linear_shapes(d, family)
    assert linear_shapes(model.config, family.targets) == Budget().linear_shapes(d, family)
    assert d.total == sum(lin.weight.numel() for lin in linears.values())


def test_llama_keeps_its_names_and_order():
    assert LLAMA.targets == PROJECTIONS and LLAMA.sequential_order == SEQUENTIAL_ORDER
    assert LLAMA.resolve_targets(PROJECTIONS) is PROJECTIONS
    opt = family_of(tiny_config("opt"))
    assert opt.resolve_targets(list(PROJECTIONS)) == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    assert opt.resolve_targets(["fc1"]) == ["fc1"]  # any other list is used as it is
    phi3 = family_of(tiny_config("phi3"))
    assert phi3.targets == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert sequential_groups(
        ["self_attn.o_proj", "mlp.down_proj", "mlp.gate_up_proj", "self_attn.qkv_proj"], phi3.sequential_order
    ) == [
        ["self_attn.qkv_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_up_proj"],
        ["mlp.down_proj"],
    ]
    neox = family_of(tiny_config("gpt_neox"))
    assert neox.targets == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    # Llama's names in the family's roles (NutePrune's LoRA targets): fused inputs once.
    assert phi3.own_names(["q_proj", "v_proj"]) == ["qkv_proj"]
    assert neox.own_names(["q_proj", "v_proj", "down_proj"]) == ["query_key_value", "dense_4h_to_h"]
    assert opt.own_names(["q_proj", "v_proj", "gate_proj", "up_proj", "o_proj"]) == [
        "q_proj",
        "v_proj",
        "fc1",
        "out_proj",
    ]
    assert LLAMA.own_names(PROJECTIONS) == PROJECTIONS


@pytest.mark.parametrize("name", ["phi3", "gpt_neox"])
def test_fused_inputs_split_into_what_the_model_computes_and_fuse_back(name):
    """Phi-3's qkv_proj stacks q, k, v (Phi3Attention slices its output); GPT-NeoX's query_key_value
    interleaves them head by head (GPTNeoXAttention views its output as heads x 3 head_size and chunks
    it); Phi-3's gate_up_proj stacks gate and up (Phi3MLP chunks it in two)."""
    model = tiny_model(name)
    family, d = family_of(model), Dims.of(model.config)
    block = decoder_layers(model)[0]
    x = torch.randn(1, 5, d.hidden, generator=torch.Generator().manual_seed(3))
    for fused in family.fused:
        linear = block.get_submodule(fused)
        weights = family.split_rows(fused, linear.weight, d)
        biases = family.split_rows(fused, linear.bias, d) if linear.bias is not None else [None] * 3
        with torch.no_grad():
            got = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=False)]
            out = linear(x)
        if fused in family.interleaved:
            expected = [t.reshape(1, 5, -1) for t in out.view(1, 5, -1, 3 * d.head_dim).chunk(3, dim=-1)]
        elif fused == family.attention_in[0]:
            q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
            expected = [out[..., :q], out[..., q : q + kv], out[..., q + kv :]]
        else:
            expected = list(out.chunk(2, dim=-1))
        assert len(got) == len(expected) == (3 if fused in family.attention_in else 2)
        for part, want in zip(got, expected, strict=True):
            torch.testing.assert_close(part, want, rtol=0, atol=1e-6)
        assert torch.equal(family.fuse_rows(fused, weights, d.head_dim), linear.weight)


@pytest.mark.parametrize("name", NAMES)
def test_block_by_block_pass_reproduces_every_blocks_outputs(name):
    """The calibration engine calls each block as the model does (Gemma: its own mask and rotary tables)."""
    model, calib = tiny_model(name), calibration()
    layers = decoder_layers(model)
    seen: dict[int, list] = {}
    hooks = [
        block.register_forward_hook(lambda _m, _a, out, i=i: seen.setdefault(i, []).append(block_output(out)))
        for i, block in enumerate(layers)
    ]
    for batch in calib.split(2):
        logits(model, batch, use_cache=False)
    for h in hooks:
        h.remove()
    inputs = capture_block_inputs(model, calib, batch_size=2)
    with torch.no_grad():
        for i, block in enumerate(layers):
            inputs = [(run_block(block, hidden, kwargs), kwargs) for hidden, kwargs in inputs]
            for (out, _), expected in zip(inputs, seen[i], strict=True):
                torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- one-shot pruning
@pytest.mark.parametrize("name", NAMES)
def test_wanda_half_of_every_row(name):
    """Wanda compares within each output row: every row of every target loses exactly half its weights,
    with OWL's per-block sparsities too (their size-weighted mean is the target)."""
    model, calib = tiny_model(name), calibration()
    masks = prune_model(model, WandaPruner(batch_size=2), 0.5, UNSTRUCTURED, calib, progress=False)
    assert len(masks) == 2 * len(family_of(model).targets)
    for name_, keep in masks.items():
        assert torch.equal((~keep).sum(dim=1), torch.full((keep.shape[0],), keep.shape[1] // 2)), name_
        assert torch.equal(model.get_submodule(name_).weight == 0, ~keep)
    owl = WandaPruner(batch_size=2, allocation="owl")
    per_block = layer_sparsities(tiny_model(name), owl, 0.5, calib, progress=False)
    assert len(per_block) == 2 and per_block[0] != per_block[1]
    assert sum(per_block) / 2 == pytest.approx(0.5)  # blocks of one family have equal sizes


@pytest.mark.parametrize("name", NAMES)
def test_sparsegpt_2_of_4_true_sequential(name):
    model, calib = tiny_model(name), calibration()
    pruner = SparseGPTPruner(batch_size=2, true_sequential=True)
    masks = prune_model(model, pruner, 0.5, SparsityPattern("nm", 2, 4), calib, progress=False)
    assert len(masks) == 2 * len(family_of(model).targets)
    for name_, lin in prunable_linears(model, PROJECTIONS).items():
        groups = (lin.weight == 0).reshape(lin.weight.shape[0], -1, 4).sum(dim=-1)
        assert (groups >= 2).all(), name_
        assert (lin.weight[~masks[name_]] == 0).all(), name_


# --------------------------------------------------------------------------- adapters and the teacher
@pytest.fixture(scope="module")
def wanda_pruned():
    """One Wanda-pruned (50%) tiny model per family, copied by each test."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            model = tiny_model(name)
            prune_model(model, WandaPruner(batch_size=2), 0.5, UNSTRUCTURED, calibration(), progress=False)
            cache[name] = model
        return copy.deepcopy(cache[name])

    return get


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("adapter", ["spp", "masked_lora"])
def test_sparsity_preserving_merge_keeps_zeros_and_outputs(name, adapter, wanda_pruned):
    model, ids = wanda_pruned(name), calibration(2, 12)
    zeros = zeros_of(model)
    recovery = SPPAdapter(dropout=0.0) if adapter == "spp" else MaskedLoRAAdapter(dropout=0.0)
    names = recovery.apply(model)
    assert names == list(zeros)
    perturbed(recovery, model)
    unmerged = logits(model, ids)
    recovery.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    for n, lin in prunable_linears(model, PROJECTIONS).items():
        assert type(lin) is nn.Linear and (lin.weight[zeros[n]] == 0).all(), n
    assert not torch.equal(unmerged, logits(wanda_pruned(name), ids))  # the adapter did change the model


@pytest.mark.parametrize("name", NAMES)
def test_peft_lora_targets_every_family(name, wanda_pruned):
    model, ids = wanda_pruned(name), calibration(2, 12)
    lora = LoRAAdapter(dropout=0.0)
    assert lora.apply(model) == list(zeros_of(wanda_pruned(name)))
    perturbed(lora, model)
    unmerged = logits(model, ids)
    lora.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dense_teacher_with_keep_all_masks_is_the_unpruned_model(name):
    """Masks in the forward (all kept) plus an SPP adapter switched off: the teacher's logits are the
    unpruned model's (Gemma 2's final soft-capping included)."""
    model, ids = tiny_model(name), calibration(2, 12)
    expected = logits(model, ids)
    masks = {
        n: torch.ones_like(lin.weight, dtype=torch.bool)
        for n, lin in prunable_linears(model, PROJECTIONS).items()
    }
    students = StudentMasks.attach(model, masks)
    adapter = SPPAdapter(dropout=0.0)
    adapter.apply(model)
    perturbed(adapter, model)
    teacher = DenseTeacher()
    teacher.bind(model, students, adapter, 0.0)
    torch.testing.assert_close(teacher.teacher_outputs(model, ids, None).logits(), expected, rtol=0, atol=0)
    assert not torch.allclose(logits(model, ids), expected)  # the student has its adapter on


# --------------------------------------------------------------------------- structured removal
@pytest.mark.parametrize("name", NAMES)
def test_shortgpt_removes_a_layer_from_every_family(name):
    """Removing a layer physically (list, layer_idx, config) computes what zeroing its outputs does,
    with the KV cache on (a cache layer per kept block)."""
    model, calib = tiny_model(name), calibration()
    masked = copy.deepcopy(model)
    pruner = ShortGPTPruner(batch_size=2)
    structure = pruner.select(
        model, pruner.budget(Dims.of(model.config), 0.5), StructuredContext(calibration=calib, progress=False)
    )
    assert len(structure.layers_removed) == 1
    shrink_model(model, structure)
    mask_model(masked, structure)
    torch.testing.assert_close(
        logits(model, calib[:2], use_cache=True), logits(masked, calib[:2]), rtol=0, atol=1e-5
    )
    assert len(decoder_layers(model)) == model.config.num_hidden_layers == 1
    assert all(m.layer_idx == 0 for m in decoder_layers(model)[0].modules() if hasattr(m, "layer_idx"))
    layer_types = getattr(model.config, "layer_types", None)
    assert layer_types is None or len(layer_types) == 1


@pytest.mark.parametrize("name", WITH_HEADS)
def test_heads_and_neurons_come_out_of_every_family_with_heads(name):
    model, calib = tiny_model(name), calibration()
    masked = copy.deepcopy(model)
    pruner = MagnitudeStructuredPruner(units=["heads", "neurons"])
    budget = pruner.budget(Dims.of(model.config), 0.3)
    assert budget.heads and budget.neurons
    structure = pruner.select(model, budget, StructuredContext(progress=False))
    shrink_model(model, structure)
    mask_model(masked, structure)
    torch.testing.assert_close(
        logits(model, calib[:2], use_cache=True), logits(masked, calib[:2]), rtol=0, atol=1e-5
    )
    assert (
        prunable_linears(model, PROJECTIONS).keys()
        == Budget().linear_shapes(Dims.of(tiny_config(name)), family_of(model)).keys()
    )


def structured_units(name: str) -> list[str]:
    """Heads and neurons where the family can lose heads, else neurons."""
    return ["heads", "neurons"] if "heads" in family_of(tiny_config(name)).units else ["neurons"]


# 6 heads in 2 K/V groups of 3 (hidden 48): a quarter of the budget takes one head of each group, and
# the 4 left still divide the hidden size (LlamaConfig and the Gemma configs refuse to save otherwise).
SIX_HEADS = {"hidden": 48, "heads": 6}


def removal_matches_masking(model: nn.Module, structure, folder, ids: torch.Tensor) -> nn.Module:
    """Remove ``structure`` from ``model``, export it as the pipeline does and reload it with plain
    transformers: the reloaded model (and the shrunk one, KV cache on) computes the masked model's
    logits. Returns the reloaded model."""
    masked = copy.deepcopy(model)
    mask_model(masked, structure)
    shrink_model(model, structure)
    save_model(model, byte_tokenizer(), folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = logits(masked, ids)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids, use_cache=True), expected, rtol=0, atol=1e-5)
    assert family_of(loaded) is family_of(model)
    return loaded


@pytest.mark.parametrize("name", NAMES)
def test_magnitude_heads_and_neurons_export_and_reload(name, tmp_path):
    """magnitude_structured at 25%: heads (where the family has them) and neurons come out, the export
    reloads with plain transformers at the budget's shapes and computes the masked model."""
    model, calib = tiny_model(name, **SIX_HEADS), calibration()
    pruner = MagnitudeStructuredPruner(units=structured_units(name))
    d = Dims.of(model.config)
    budget = pruner.budget(d, 0.25)
    assert budget.neurons and bool(budget.heads) == ("heads" in pruner.units)
    structure = pruner.select(model, budget, StructuredContext(progress=False))
    loaded = removal_matches_masking(model, structure, tmp_path / "model", calib[:2])
    shapes = {n: tuple(lin.weight.shape) for n, lin in prunable_linears(loaded, PROJECTIONS).items()}
    assert shapes == budget.linear_shapes(d, family_of(loaded))
    assert Dims.of(loaded.config).head_dim == d.head_dim


@pytest.mark.parametrize("name", NAMES)
def test_comp_layers_and_neurons_export_and_reload(name, tmp_path):
    """COMP at 25% of a 6-layer model: half the budget is one whole layer, the rest neurons (re-fitted
    scales folded into the MLP output); the export reloads and computes the masked model."""
    model, calib = tiny_model(name, layers=6), calibration()
    pruner = COMPPruner(batch_size=4)
    budget = pruner.budget(Dims.of(model.config), 0.25)
    assert budget.layers == 1 and budget.neurons
    structure = pruner.select(model, budget, StructuredContext(calibration=calib, progress=False))
    loaded = removal_matches_masking(model, structure, tmp_path / "model", calib[:2])
    assert loaded.config.num_hidden_layers == 5
    assert family_of(loaded).intermediate(loaded.config) == 128 - budget.neurons


@pytest.mark.parametrize("name", ["phi3", "opt", "gpt_neox"])
@pytest.mark.parametrize("method", ["flap", "llm_pruner"])
def test_flap_and_llm_pruner_on_fused_and_plain_families(name, method, tmp_path):
    """FLAP (uniform widths; bias compensation where the config declares the biases: OPT's enable_bias,
    GPT-NeoX's MLP) and LLM-Pruner (all layers) at 25%: the export reloads and computes the masked model."""
    model, calib = tiny_model(name, **SIX_HEADS), calibration()
    units = structured_units(name)
    if method == "flap":
        pruner = FLAPPruner(units=units, allocation="uniform", bias_compensation=name != "phi3", batch_size=2)
    else:
        pruner = LLMPrunerPruner(units=units, layer_range="all", batch_size=2, nsamples=4, seqlen=16)
    budget = pruner.budget(Dims.of(model.config), 0.25)
    assert budget.neurons and bool(budget.heads) == ("heads" in units)
    structure = pruner.select(model, budget, StructuredContext(calibration=calib, progress=False))
    removal_matches_masking(model, structure, tmp_path / "model", calib[:2])


@pytest.mark.parametrize("name", NAMES)
def test_nuteprune_gates_close_what_removal_removes(name):
    """NutePrune's hooks with closed gates compute the masked model of the structure they give; soft
    gates folded into the weights compute what the hooks do (a fused gate_up_proj: both halves)."""
    model, ids = tiny_model(name, **SIX_HEADS), calibration(2, 12)
    d, units = Dims.of(model.config), structured_units(name)
    gates = UnitGates(d, units, droprate_init=0.5)
    with torch.no_grad():
        for gate in gates.kinds.values():
            gate.log_alpha.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(1))
    structure = gates.structure(Budget(heads=d.kv_heads if "heads" in units else 0, neurons=32))
    kept = {"heads": structure.heads_of, "neurons": structure.neurons_of}
    closed = {kind: torch.zeros_like(gate.log_alpha) for kind, gate in gates.kinds.items()}
    for kind, z in closed.items():
        for i in range(d.layers):
            z[i, kept[kind](i)] = 1.0
    masked = copy.deepcopy(model)
    mask_model(masked, structure)
    gates.attach(model)
    soft = {kind: soft_gate(gate.log_alpha.detach()) for kind, gate in gates.kinds.items()}
    with gates.using(closed):
        torch.testing.assert_close(logits(model, ids), logits(masked, ids), rtol=0, atol=1e-5)
    with gates.using(soft):
        hooked = logits(model, ids)
    gates.detach()
    gates.fold(model)
    torch.testing.assert_close(logits(model, ids), hooked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["phi3", "opt", "gpt_neox"])
def test_nuteprune_learns_masks_on_fused_and_plain_families(name, tmp_path):
    """Two mask-learning steps with LoRA on Llama's q_proj / v_proj (Phi-3's qkv_proj, GPT-NeoX's
    query_key_value), merged, then removed: the export reloads and computes the masked model."""
    from sppx.adapters import LoRAAdapter
    from sppx.pruning.structured import NutePrunePruner

    model, calib = tiny_model(name, **SIX_HEADS), calibration(8, 16)
    pruner = NutePrunePruner(units=structured_units(name), steps=2, batch_size=2, accelerator="cpu")
    budget = pruner.budget(Dims.of(model.config), 0.25)
    ctx = StructuredContext(train=calib, progress=False, lora_factory=LoRAAdapter)
    structure = pruner.select(model, budget, ctx)
    assert pruner.report["lora_merged"] == 2 * len(family_of(model).own_names(["q_proj", "v_proj"]))
    removal_matches_masking(model, structure, tmp_path / "model", calib[:2])


# --------------------------------------------------------------------------- the plan
def model_folder(tmp_path, config) -> str:
    """A local model folder (config, random weights, byte tokenizer) as ``model=hf`` reads it."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def planned(tmp_path, text_file, folder: str, **extra):
    overrides = tiny_run_overrides(text_file, **{"model": "hf", "model.name_or_path": folder, **extra})
    return plan(compose_config(overrides, tmp_path / "run"))


def test_an_undescribed_model_type_fails_in_the_plan(tmp_path, text_file):
    folder = tmp_path / "model"
    folder.mkdir()
    BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")  # never read: the plan stops first
    with pytest.raises(ConfigError) as err:
        planned(tmp_path, text_file, str(folder))
    message = str(err.value)
    assert "\n" not in message and message.startswith("model='bloom': has no layout description")
    assert "llama" in message and "gpt_neox" in message and "docs/extending.md" in message


@pytest.mark.parametrize(("name", "units"), [("opt", "[heads,neurons]"), ("gpt_neox", "[heads]")])
def test_heads_of_a_family_that_derives_head_dim_fail_in_the_plan(tmp_path, text_file, name, units):
    """OPT and GPT-NeoX attention take head_dim = hidden_size // num_attention_heads: fewer heads with the
    hidden size kept has no standard config."""
    folder = model_folder(tmp_path, tiny_config(name))
    with pytest.raises(
        ConfigError,
        match=rf"^pruner\.units=.*: heads cannot be removed from {name} models: transformers' \w+ takes "
        rf"head_\w+ = hidden_size // num_attention_heads[^\n]*; allowed on {name}: layers, neurons$",
    ):
        planned(
            tmp_path,
            text_file,
            folder,
            pruner="magnitude_structured",
            pattern="structured",
            **{"pruner.units": units},
        )


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("phi3", {"pruner": "magnitude_structured", "pruner.units": "[heads,neurons]"}),
        ("phi3", {"pruner": "flap", "pruner.allocation": "uniform", "pruner.bias_compensation": "false"}),
        ("opt", {"pruner": "flap", "pruner.units": "[neurons]", "pruner.allocation": "uniform"}),
        ("gpt_neox", {"pruner": "llm_pruner", "pruner.units": "[neurons]"}),
        ("gpt_neox", {"pruner": "comp"}),
    ],
)
def test_heads_and_neurons_plan_on_phi3_opt_and_gpt_neox(tmp_path, text_file, name, extra):
    """Units a family can lose plan; FLAP's bias compensation where the config declares the biases
    (OPT's enable_bias)."""
    folder = model_folder(tmp_path, tiny_config(name))
    p = planned(tmp_path, text_file, folder, pattern="structured", sparsity=0.25, **extra)
    assert p.pruner.targets == family_of(p.model_config).targets


@pytest.mark.parametrize(
    ("name", "extra", "key"),
    [
        ("opt", {"pruner": "flap", "pruner.units": "[neurons]"}, r"pruner\.allocation='global'"),
        ("phi3", {"pruner": "llm_pruner", "pruner.layer_range": "[0,1]"}, r"pruner\.layer_range=\[0, 1\]"),
    ],
    ids=["flap-global-opt", "layer-range-phi3"],
)
def test_per_layer_widths_a_family_cannot_reload_fail_in_the_plan(tmp_path, text_file, name, extra, key):
    """sppx rebuilds layers of their own widths only for Llama-named projections: elsewhere FLAP's global
    allocation and a protected layer range (layers outside it keep their widths) are refused."""
    folder = model_folder(tmp_path, tiny_config(name))
    with pytest.raises(
        ConfigError,
        match=rf"^{key}: gives layers widths of their own, [^\n]* not {name}: set pruner\.\w+=\w+$",
    ):
        planned(
            tmp_path,
            text_file,
            folder,
            pattern="structured",
            sparsity=0.25,
            **extra,
        )


def test_bias_compensation_a_family_cannot_declare_fails_in_the_plan(tmp_path, text_file):
    """Qwen2's config has no flag for biases on o_proj and down_proj: FLAP's would be lost on reload."""
    folder = model_folder(tmp_path, tiny_config("qwen2"))
    with pytest.raises(
        ConfigError,
        match=r"^pruner\.bias_compensation=True: adds biases to self_attn\.o_proj and mlp\.down_proj, which a qwen2 config cannot declare",
    ):
        planned(tmp_path, text_file, folder, pruner="flap", pattern="structured")
    p = planned(
        tmp_path,
        text_file,
        folder,
        pruner="flap",
        pattern="structured",
        sparsity=0.25,
        **{"pruner.bias_compensation": "false"},
    )
    assert p.pruner.targets == PROJECTIONS


def test_the_plan_uses_each_familys_names(tmp_path, text_file):
    """Default targets become the family's; SPP's rows are checked against each target's real output
    width (GPT-NeoX's query_key_value is 192 wide); layer removal plans on a fused family."""
    folder = model_folder(tmp_path, tiny_config("gpt_neox"))
    p = planned(tmp_path, text_file, folder)
    assert p.pruner.targets == p.adapter.targets == family_of(p.model_config).targets
    with pytest.raises(
        ConfigError,
        match=r"^adapter\.rows=128: must divide the output width 192 of gpt_neox\.layers\.0\.attention\.query_key_value$",
    ):
        planned(tmp_path, text_file, folder, **{"adapter.rows": 128})
    p = planned(tmp_path, text_file, folder, pruner="shortgpt", pattern="structured")
    assert p.pruner.targets == family_of(p.model_config).targets


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("opt", {"pruner": "wanda", "adapter": "spp", "teacher": "dense"}),
        ("gemma3_text", {"pruner": "shortgpt", "pattern": "structured", "adapter": "masked_lora"}),
    ],
)
def test_a_whole_run_on_another_family(tmp_path, text_file, name, extra):
    from sppx.models import load_pretrained
    from sppx.pipeline import run

    folder = model_folder(tmp_path, tiny_config(name))
    overrides = tiny_run_overrides(
        text_file, **{"model": "hf", "model.name_or_path": folder, "trainer.max_steps": 2, **extra}
    )
    results = run(compose_config(overrides, tmp_path / "run"), progress=False)
    assert results["status"] == "complete"
    saved = load_pretrained(results["model_dir"])
    assert family_of(saved).name == name
    if extra["pruner"] == "wanda":
        assert results["sparsity"]["measured"] == pytest.approx(0.5)
        assert results["sparsity"]["zeros_verified_on_disk"] > 0
    else:
        assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["num_hidden_layers"] == 1
