"""The compact sparse layouts: exact round trips, the bit order, 2:4's two values per group, folders."""

import json

import pytest
import torch
from safetensors import safe_open

from sppx import sparse_format
from sppx.models import TinyLlama
from sppx.pruning import SparsityPattern


def sparse_matrix(rows: int, cols: int, keep: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w * (torch.rand(rows, cols, generator=g) < keep)


def two_of_four(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    groups = w.reshape(rows, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return (groups * keep).reshape(rows, cols)


@pytest.mark.parametrize("cols", [8, 13, 64])
def test_bitmask_round_trip_is_exact_and_stores_only_the_nonzeros(cols):
    w = sparse_matrix(7, cols, keep=0.4)
    parts = sparse_format.compress(w, sparse_format.BITMASK)
    assert set(parts) == {"shape", "compressed", "bitmask", "row_offsets"}
    assert parts["shape"].tolist() == [7, cols]
    assert parts["compressed"].numel() == int((w != 0).sum())
    assert parts["bitmask"].dtype == torch.uint8 and tuple(parts["bitmask"].shape) == (7, (cols + 7) // 8)
    counts = (w != 0).sum(-1)
    assert parts["row_offsets"].tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    assert torch.equal(sparse_format.decompress(parts), w)


def test_bits_are_little_endian_within_each_byte():
    w = torch.zeros(1, 10)
    w[0, 0], w[0, 9] = 1.0, 2.0
    parts = sparse_format.compress(w, sparse_format.BITMASK)
    assert parts["bitmask"].tolist() == [[0b00000001, 0b00000010]]
    assert parts["compressed"].tolist() == [1.0, 2.0]


def test_two_of_four_layout_keeps_two_values_per_group_even_where_a_kept_weight_is_zero():
    w = two_of_four(6, 16)
    w[0, 0:4] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # one nonzero: a zero is stored as the second value
    parts = sparse_format.compress(w, sparse_format.BITMASK_24)
    assert set(parts) == {"shape", "compressed", "bitmask"}
    assert parts["shape"].tolist() == [[6], [16]] and tuple(parts["compressed"].shape) == (6, 8)
    bits = sparse_format.unpack_bits(parts["bitmask"], 16).reshape(6, 4, 4)
    assert (bits.sum(-1) == 2).all()
    assert parts["compressed"][0, :2].tolist() == [0.0, 3.0]
    assert torch.equal(sparse_format.decompress(parts), w)


def test_two_of_four_layout_refuses_a_weight_that_is_not_two_of_four():
    w = two_of_four(2, 8)
    w[1, 4:8] = 1.0
    with pytest.raises(ValueError, match="more than two nonzeros"):
        sparse_format.compress(w, sparse_format.BITMASK_24)


def test_the_pattern_decides_the_layout():
    assert sparse_format.format_for(SparsityPattern("nm", 2, 4)) == sparse_format.BITMASK_24
    assert sparse_format.format_for(SparsityPattern("nm", 4, 8)) == sparse_format.BITMASK
    assert sparse_format.format_for(SparsityPattern()) == sparse_format.BITMASK


def compressed_tiny_folder(folder, sparsify, fmt: str, structure: str) -> tuple[list[str], dict]:
    """The tiny model's decoder Linears made sparse by ``sparsify(weight)``, saved and compressed in
    ``fmt``; returns the Linears' names and the model's state dict."""
    model, _ = TinyLlama(seed=0).load()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            w.copy_(sparsify(w))
    model.save_pretrained(folder)
    config = sparse_format.sparsity_config(fmt, structure, 0.5, names)
    sparse_format.compress_folder(folder, names, fmt, config)
    return names, {k: v.clone() for k, v in model.state_dict().items()}


def reads_back(folder, expected: dict) -> bool:
    """Every saved tensor reads back exactly, and only the tied lm_head (not saved) is missing."""
    read = sparse_format.read_folder(folder)
    return set(expected) - set(read) <= {"lm_head.weight"} and all(
        torch.equal(read[k], expected[k]) for k in read
    )


def test_a_compressed_folder_reads_back_every_tensor_exactly(tmp_path):
    names, expected = compressed_tiny_folder(
        tmp_path, lambda w: w * (torch.rand_like(w) < 0.5), sparse_format.BITMASK, "unstructured"
    )
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "model.sparse.safetensors").is_file()
    with safe_open(str(tmp_path / "model.sparse.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert f"{names[0]}.weight" not in keys and f"{names[0]}.weight.bitmask" in keys
    saved = json.loads((tmp_path / "config.json").read_text())[sparse_format.CONFIG_KEY]["sparsity_config"]
    assert saved["format"] == "sparse-bitmask" and saved["targets"] == sorted(names)
    assert sparse_format.saved_format(tmp_path) == sparse_format.BITMASK
    assert reads_back(tmp_path, expected)
    only = sparse_format.read_folder(tmp_path, {f"{names[0]}.weight"})
    assert list(only) == [f"{names[0]}.weight"]


def test_a_two_of_four_folder_names_the_parts_after_each_module(tmp_path):
    names, expected = compressed_tiny_folder(
        tmp_path, lambda w: two_of_four(*w.shape), sparse_format.BITMASK_24, "2:4"
    )
    with safe_open(str(tmp_path / "model.sparse.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert {f"{names[0]}.compressed", f"{names[0]}.bitmask", f"{names[0]}.shape"} <= keys
    assert reads_back(tmp_path, expected)
