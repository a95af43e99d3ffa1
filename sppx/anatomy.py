"""Where a model family keeps its parts: the one module that knows a causal LM's layout.

Every supported architecture is one :class:`Family` in :data:`FAMILIES`, recognised from the config's
``model_type`` (:func:`family_of`): where the decoder blocks are (``model.model.layers`` for Llama,
``model.decoder.layers`` for OPT, ``gpt_neox.layers`` for GPT-NeoX), the Linears of a block by their
name in the block (attention in / out, MLP in / out, in order), which of them pack several projections
into one matrix (Phi-3's ``qkv_proj`` and ``gate_up_proj``, GPT-NeoX's ``query_key_value``) and how
their rows split into the parts and fuse back (:meth:`Family.split_rows`, :meth:`Family.fuse_rows`), and how the
widths are read from the config (``num_hidden_layers``, ``hidden_size``, the intermediate width under
the family's key, ``num_attention_heads``, ``num_key_value_heads`` when the family has grouped-query
attention, ``head_dim`` when the config sets it apart from hidden / heads, as Qwen3 and Gemma do). A
model whose layers have their own widths lists them under :data:`LAYER_WIDTHS_KEY`.

Targets are short names, the last part of a Linear's name (``q_proj``). :data:`PROJECTIONS` is the
Llama list and the code default of every pruner and adapter; on a family whose Linears have other
names, that exact list stands for the family's own defaults (:meth:`Family.resolve_targets`: OPT's
``q_proj, k_proj, v_proj, out_proj, fc1, fc2``; GPT-NeoX's ``query_key_value, dense, dense_h_to_4h,
dense_4h_to_h``; Phi-3's ``qkv_proj, o_proj, gate_up_proj, down_proj``). Any other list is used as it
is. Another family is supported by describing it here (docs/extending.md); the pruners, adapters and
exporters only ask this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sppx.errors import ConfigError

# The Linears of a Llama decoder block, attention first: the default targets of pruning and of adapters
# (on another family, this list stands for that family's own defaults: Family.resolve_targets).
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The order of true_sequential pruning inside a Llama block (SparseGPT's option); other targets come last.
SEQUENTIAL_ORDER = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

# A config key sppx writes for a model whose decoder layers have different widths: one entry per layer
# with its own WIDTH_KEYS (see sppx.models.load_saved_model).
LAYER_WIDTHS_KEY = "sppx_layer_widths"
WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")

EXTENDING = "docs/extending.md"  # where adding a family is explained


def short(name: str) -> str:
    """The last part of a module name (``self_attn.q_proj`` -> ``q_proj``): what targets list."""
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Family:
    """One decoder architecture's layout. Linear names are relative to a decoder block.

    ``attention_in`` is q, k, v in that order, or the one Linear that packs them (then it is in
    ``fused``); ``mlp_in`` is gate and up (gated MLP), the one Linear packing both (``fused``), or the one
    up projection of a plain MLP (``gated=False``). A fused attention input stacks all q rows, then k,
    then v (Phi-3), or, when also in ``interleaved``, each head's q, k and v rows in turn (GPT-NeoX); a
    fused MLP input stacks gate then up. ``units`` are the structured units sppx can remove from this
    family; ``units_note`` says why the others cannot be (one line of the plan's refusal).
    """

    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    attention_in: tuple[str, ...]
    attention_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    fused: tuple[str, ...] = ()
    interleaved: tuple[str, ...] = ()  # fused attention inputs whose q, k, v rows alternate head by head
    gated: bool = True  # gate and up projections: 3 matrices per neuron (else 2)
    intermediate_key: str = "intermediate_size"
    kv_heads_key: str | None = "num_key_value_heads"  # None: every query head has its own K/V head
    # Config flags that declare a bias on a group of Linears (one flag for all of them): a structured
    # removal that adds a bias to one of them gives the others zero biases and sets the flag.
    bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    always_biased: tuple[str, ...] = ()  # Linears built with a bias whatever the config says
    softcap_key: str | None = None  # config key of the final logit soft-capping (Gemma)
    units: tuple[str, ...] = ("layers", "heads", "neurons")
    units_note: str = ""
    # Whether a structured export whose layers have their own widths can be rebuilt
    # (sppx.models.load_saved_model re-creates Llama-named projections only).
    per_layer_widths: bool = True
    notes: str = ""  # what else differs from Llama (documentation only)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every projection of a block, in the order of the forward pass."""
        return (*self.attention_in, self.attention_out, *self.mlp_in, self.mlp_out)

    @property
    def targets(self) -> list[str]:
        """The default target list: every projection's short name."""
        return [short(n) for n in self.linears]

    @property
    def sequential_order(self) -> tuple[tuple[str, ...], ...]:
        """true_sequential's groups: the inputs that share a tensor, in the order they are computed."""
        return tuple(
            tuple(short(n) for n in group)
            for group in (self.attention_in, (self.attention_out,), self.mlp_in, (self.mlp_out,))
        )

    def resolve_targets(self, targets: list[str]) -> list[str]:
        """``targets``, except that the Llama default list (PROJECTIONS) means this family's defaults."""
        return self.targets if list(targets) == PROJECTIONS and self.targets != PROJECTIONS else targets

    # ----------------------------------------------------------------------- widths from the config
    def heads(self, config) -> int:
        return config.num_attention_heads

    def kv_heads(self, config) -> int:
        value = getattr(config, self.kv_heads_key, None) if self.kv_heads_key else None
        return value or self.heads(config)

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // self.heads(config)

    def intermediate(self, config) -> int:
        return getattr(config, self.intermediate_key)

    def layer_shapes(self, heads: int, kv: int, neurons: int, hidden: int, head_dim: int) -> dict:
        """``{name in the block: (out, in)}`` of a block's projections with these widths."""
        if self.attention_in[0] in self.fused:
            shapes = {self.attention_in[0]: ((heads + 2 * kv) * head_dim, hidden)}
        else:
            q, k, v = self.attention_in
            shapes = {q: (heads * head_dim, hidden), k: (kv * head_dim, hidden), v: (kv * head_dim, hidden)}
        shapes[self.attention_out] = (hidden, heads * head_dim)
        packed = 2 if self.mlp_in[0] in self.fused else 1
        shapes.update({name: (packed * neurons, hidden) for name in self.mlp_in})
        shapes[self.mlp_out] = (hidden, neurons)
        return shapes

    @property
    def mlp_parts(self) -> int:
        """Row parts of the MLP input per neuron: gate and up (2), or a plain MLP's one up projection."""
        return 2 if self.gated else 1

    def split_rows(self, name: str, x: torch.Tensor, d: Dims) -> list[torch.Tensor]:
        """The parts of Linear ``name``'s output rows, in their role order (q, k, v of the attention
        input; gate, up of the MLP input), as views of ``x``: its weight, bias, gradient or row indices
        (anything indexed by its rows first). One part for a Linear that packs nothing."""
        if name not in self.fused:
            return [x]
        rest = tuple(x.shape[1:])
        if name in self.interleaved:  # head h: rows [3 h hd, 3 h hd + hd) are q, then k, then v
            if d.kv_heads != d.heads:
                raise ValueError(f"{name}: interleaved q, k, v need as many K/V heads as query heads")
            per_head = x.reshape(d.heads, 3, d.head_dim, *rest)
            return [per_head[:, j].reshape(d.heads * d.head_dim, *rest) for j in range(3)]
        if name == self.attention_in[0]:
            q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
            return list(x.split([q, kv, kv]))
        return list(x.chunk(2))

    def fuse_rows(self, name: str, parts: list[torch.Tensor], head_dim: int) -> torch.Tensor:
        """Linear ``name``'s rows from its parts (the inverse of :meth:`split_rows`, for parts that
        keep the same heads: q, k and v of an interleaved input keep the same number)."""
        if name in self.interleaved:
            per_head = [p.reshape(-1, head_dim, *p.shape[1:]) for p in parts]
            return torch.stack(per_head, dim=1).flatten(0, 2)
        return torch.cat(parts)

    def input_parts(self, block: nn.Module, d: Dims, values=None) -> tuple[list, list]:
        """(q, k, v) and the MLP input's parts (gate, up; or the plain MLP's one) of a block:
        ``values(linear)`` (its weight by default), one tensor per part, cut to the part's rows."""

        def parts(names: tuple[str, ...]) -> list[torch.Tensor]:
            found = [block.get_submodule(n) for n in names]
            return [
                p
                for n, lin in zip(names, found, strict=True)
                for p in self.split_rows(n, lin.weight if values is None else values(lin), d)
            ]

        return parts(self.attention_in), parts(self.mlp_in)

    def own_names(self, targets: list[str]) -> list[str]:
        """Llama's short names as this family's: each becomes the Linear in its role (q_proj is Phi-3's
        qkv_proj, up_proj OPT's fc1), other names stay; duplicates go, the order stays."""
        attention = self.attention_in if len(self.attention_in) == 3 else self.attention_in * 3
        mlp = self.mlp_in if len(self.mlp_in) == 2 else self.mlp_in * 2
        role = dict(zip(PROJECTIONS, (*attention, self.attention_out, *mlp, self.mlp_out), strict=True))
        return list(dict.fromkeys(short(role[t]) if t in role else t for t in targets))

    def check_structured(self, units: list[str], adds_biases: bool = False, varying=None) -> None:
        """Refuse (one line) structured units this family's layout cannot lose; biases added to the
        attention or MLP output (FLAP's compensation) that its config cannot declare (the exported model
        would load without them); and per-layer widths (``varying``: the setting that gives them, its
        value and the value that does not) where sppx cannot rebuild them."""
        for unit in units:
            if unit not in self.units:
                raise ConfigError(
                    "pruner.units",
                    units,
                    f"{unit} cannot be removed from {self.name} models: {self.units_note}; "
                    f"allowed on {self.name}: {', '.join(self.units)}",
                )
        declared = {name for _, names in self.bias_flags for name in names} | set(self.always_biased)
        outputs = [n for u, n in (("heads", self.attention_out), ("neurons", self.mlp_out)) if u in units]
        undeclared = [n for n in outputs if n not in declared]
        if adds_biases and undeclared:
            raise ConfigError(
                "pruner.bias_compensation",
                True,
                f"adds biases to {' and '.join(undeclared)}, which a {self.name} config cannot declare "
                "(the exported model would load without them); set it to false",
            )
        if varying and not self.per_layer_widths and ("heads" in units or "neurons" in units):
            key, value, uniform = varying
            raise ConfigError(
                key,
                value,
                f"gives layers widths of their own, which sppx reloads only for families with Llama's "
                f"projection names, not {self.name}: set {key}={uniform}",
            )


_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj")


def _llama_like(name: str, model_types: tuple[str, ...], **extra) -> Family:
    """A family with Llama's names: ``model.layers``, self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj."""
    return Family(
        name=name,
        model_types=model_types,
        blocks_path="model.layers",
        attention_in=_LLAMA_ATTENTION,
        attention_out="self_attn.o_proj",
        mlp_in=_LLAMA_MLP,
        mlp_out="mlp.down_proj",
        **extra,
    )


FAMILIES: tuple[Family, ...] = (
    _llama_like(
        "llama",
        ("llama",),
        bias_flags=(
            ("attention_bias", (*_LLAMA_ATTENTION, "self_attn.o_proj")),
            ("mlp_bias", (*_LLAMA_MLP, "mlp.down_proj")),
        ),
        notes="SmolLM2 is a Llama",
    ),
    _llama_like("mistral", ("mistral",), notes="sliding-window attention"),
    _llama_like("qwen2", ("qwen2",), notes="biases on q, k and v (always, no config flag)"),
    _llama_like(
        "qwen3",
        ("qwen3",),
        bias_flags=(("attention_bias", (*_LLAMA_ATTENTION, "self_attn.o_proj")),),
        notes="q and k RMSNorms over head_dim; head_dim set apart from hidden / heads",
    ),
    *(
        _llama_like(
            name,
            (name,),
            bias_flags=(("attention_bias", (*_LLAMA_ATTENTION, "self_attn.o_proj")),),
            softcap_key="final_logit_softcapping",
            notes="sandwich norms, soft-capping, tied embeddings, head_dim apart, sliding / full layers",
        )
        for name in ("gemma2", "gemma3_text")
    ),
    Family(
        name="phi3",
        model_types=("phi3",),
        blocks_path="model.layers",
        attention_in=("self_attn.qkv_proj",),
        attention_out="self_attn.o_proj",
        mlp_in=("mlp.gate_up_proj",),
        mlp_out="mlp.down_proj",
        fused=("self_attn.qkv_proj", "mlp.gate_up_proj"),
        per_layer_widths=False,
        notes="q, k, v stacked in qkv_proj, gate and up in gate_up_proj; head_dim written to the config",
    ),
    Family(
        name="opt",
        model_types=("opt",),
        blocks_path="model.decoder.layers",
        attention_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_out="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        gated=False,
        intermediate_key="ffn_dim",
        kv_heads_key=None,
        bias_flags=(
            (
                "enable_bias",
                (
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.out_proj",
                    "fc1",
                    "fc2",
                ),
            ),
        ),
        units=("layers", "neurons"),
        units_note=(
            "transformers' OPTAttention takes head_dim = hidden_size // num_attention_heads (OPTConfig has "
            "no head_dim), so fewer heads cannot be described with the hidden size kept"
        ),
        per_layer_widths=False,
        notes="biases everywhere; learned positions; fc1 / fc2 plain MLP",
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks_path="gpt_neox.layers",
        attention_in=("attention.query_key_value",),
        attention_out="attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        fused=("attention.query_key_value",),
        interleaved=("attention.query_key_value",),
        gated=False,
        kv_heads_key=None,
        bias_flags=(("attention_bias", ("attention.query_key_value", "attention.dense")),),
        always_biased=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        units=("layers", "neurons"),
        units_note=(
            "transformers' GPTNeoXAttention takes head_size = hidden_size // num_attention_heads and a "
            "3 x hidden_size query_key_value (no head_dim), so fewer heads cannot be described with the "
            "hidden size kept"
        ),
        per_layer_widths=False,
        notes="parallel residual; biases everywhere; q, k, v interleaved per head",
    ),
)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
LLAMA = BY_MODEL_TYPE["llama"]


def family_of(model_or_config) -> Family:
    """The family of a model (or of its config), from ``config.model_type``; ConfigError (one line)
    naming the supported model types when sppx has no description of it."""
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    model_type = getattr(config, "model_type", None)
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ConfigError(
            "model",
            model_type,
            f"has no layout description in sppx.anatomy (supported model types: "
            f"{', '.join(sorted(BY_MODEL_TYPE))}); {EXTENDING} says how to add one",
        )
    return family


def resolve_targets(model_or_config, targets: list[str]) -> list[str]:
    """``targets`` for this model: the Llama default list becomes the family's own defaults."""
    return family_of(model_or_config).resolve_targets(targets)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` for Llama; see :class:`Family`)."""
    family = family_of(model)
    try:
        layers = model.get_submodule(family.blocks_path)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__}: expected decoder blocks at {family.blocks_path} ({family.name} family)"
        )
    return layers


def layers_prefix(model: nn.Module) -> str:
    """The module name of the decoder blocks' ModuleList (``model.layers`` for Llama)."""
    layers = decoder_layers(model)
    return next(name for name, mod in model.named_modules() if mod is layers)


def block_linears(block: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Linears of one block whose last name component is in ``targets``, by their name in the block."""
    found = {
        name: mod
        for name, mod in block.named_modules()
        if isinstance(mod, nn.Linear) and short(name) in targets
    }
    return dict(sorted(found.items(), key=lambda kv: targets.index(short(kv[0]))))


def prunable_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Every targeted Linear of the decoder, by its full module name (the Llama default list means the
    model family's defaults)."""
    layers, prefix = decoder_layers(model), layers_prefix(model)
    targets = resolve_targets(model, targets)
    return {
        f"{prefix}.{i}.{name}": lin
        for i, block in enumerate(layers)
        for name, lin in block_linears(block, targets).items()
    }


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def sequential_groups(names: list[str], order=SEQUENTIAL_ORDER) -> list[list[str]]:
    """Split a block's Linear names into the true_sequential groups of ``order`` (a family's
    :attr:`Family.sequential_order`; Llama's by default), in order, dropping empty ones."""
    groups = [[n for n in names if short(n) in kinds] for kinds in order]
    placed = {n for g in groups for n in g}
    groups.append([n for n in names if n not in placed])
    return [g for g in groups if g]


def block_output(out):
    """The hidden states a decoder block returns (alone or first in a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def renumber_layers(layers: nn.ModuleList) -> None:
    """After layers were removed: every module that knows its layer's index (an attention's
    ``layer_idx``, used by the KV cache) gets its block's new position."""
    for index, block in enumerate(layers):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


class SoftCappedHead(nn.Module):
    """An output head followed by the final logit soft-capping ``cap * tanh(logits / cap)`` (Gemma)."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def output_head(model: nn.Module) -> nn.Module:
    """What turns the decoder's last hidden state into the model's logits: the output embedding, with
    the family's final soft-capping when the config sets one."""
    head = model.get_output_embeddings()
    key = family_of(model).softcap_key
    cap = getattr(model.config, key, None) if key else None
    return SoftCappedHead(head, cap) if cap else head


@dataclass(frozen=True)
class Dims:
    """The shapes that structured pruning counts in."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_matrices: int = 3  # matrices a neuron has a row or column of: gate, up, down (2 without a gate)

    @classmethod
    def of(cls, config) -> Dims:
        if getattr(config, LAYER_WIDTHS_KEY, None):
            raise ConfigError(
                "model",
                LAYER_WIDTHS_KEY,
                "has per-layer widths already: structured pruning needs uniform widths",
            )
        family = family_of(config)
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=family.intermediate(config),
            heads=family.heads(config),
            kv_heads=family.kv_heads(config),
            head_dim=family.head_dim(config),
            mlp_matrices=3 if family.gated else 2,
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
        return self.mlp_matrices * self.hidden

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
