"""Where a model family keeps its parts: the one module that knows a causal LM's layout.

Today that is the Llama layout: the decoder blocks are the ``nn.ModuleList`` at ``model.model.layers``;
each block's attention has the projections ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` and its MLP
``gate_proj``, ``up_proj`` and ``down_proj``; the widths come from the config (``num_hidden_layers``,
``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``),
and a model whose layers have their own widths lists them under :data:`LAYER_WIDTHS_KEY`. Another family
is supported by describing its layout here; the pruners, adapters and exporters only ask this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sppx.errors import ConfigError

# The Linears of a decoder block, attention first: the default targets of pruning and of adapters.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The order of true_sequential pruning inside a block (SparseGPT's option); other targets come last.
SEQUENTIAL_ORDER = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

# A config key sppx writes for a model whose decoder layers have different widths: one entry per layer
# with its own WIDTH_KEYS (see sppx.models.load_layer_widths_model).
LAYER_WIDTHS_KEY = "sppx_layer_widths"
WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__}: expected decoder blocks at model.model.layers (Llama family)"
        )
    return layers


def layers_prefix(model: nn.Module) -> str:
    """The module name of the decoder blocks' ModuleList (``model.layers``)."""
    layers = decoder_layers(model)
    return next(name for name, mod in model.named_modules() if mod is layers)


def block_linears(block: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Linears of one block whose last name component is in ``targets``, by their name in the block."""
    found = {
        name: mod
        for name, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    return dict(sorted(found.items(), key=lambda kv: targets.index(kv[0].rsplit(".", 1)[-1])))


def prunable_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Every targeted Linear of the decoder, by its full module name."""
    layers, prefix = decoder_layers(model), layers_prefix(model)
    return {
        f"{prefix}.{i}.{name}": lin
        for i, block in enumerate(layers)
        for name, lin in block_linears(block, targets).items()
    }


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def sequential_groups(names: list[str]) -> list[list[str]]:
    """Split a block's Linear names into the true_sequential groups, in order, dropping empty ones."""
    groups = [[n for n in names if n.rsplit(".", 1)[-1] in kinds] for kinds in SEQUENTIAL_ORDER]
    placed = {n for g in groups for n in g}
    groups.append([n for n in names if n not in placed])
    return [g for g in groups if g]


def block_output(out):
    """The hidden states a decoder block returns (alone or first in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class Dims:
    """The shapes that structured pruning counts in."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Dims:
        if getattr(config, LAYER_WIDTHS_KEY, None):
            raise ConfigError(
                "model",
                LAYER_WIDTHS_KEY,
                "has per-layer widths already: structured pruning needs uniform widths",
            )
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
        )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def head_params(self) -> int:
        """A query head: its q_proj rows and o_proj columns."""
        return 2 * self.head_dim * self.hidden

    @property
    def kv_params(self) -> int:
        """One key/value head: its k_proj and v_proj rows."""
        return 2 * self.head_dim * self.hidden

    @property
    def neuron_params(self) -> int:
        return 3 * self.hidden

    @property
    def attention_params(self) -> int:
        return self.heads * self.head_params + self.kv_heads * self.kv_params

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.intermediate * self.neuron_params

    @property
    def total(self) -> int:
        """The decoder's prunable parameters: every projection of every layer (biases not counted)."""
        return self.layers * self.layer_params
