"""The sequential calibration engine: what each block's statistics see, and the masks it returns."""

import contextlib
import copy
import math
import platform

import pytest
import torch

from sppx.anatomy import block_linears, decoder_layers, prunable_linears, sequential_groups
from sppx.errors import ConfigError
from sppx.profiling import heap_reused
from sppx.pruning import (
    MagnitudePruner,
    SparseGPTPruner,
    SparsityPattern,
    WandaPruner,
    prune_model,
    sequential,
)
from sppx.pruning.sequential import capture_block_inputs, collect_stats, run_block, run_blocks
from sppx.pruning.wanda import wanda_scores

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RecordingWanda(WandaPruner):
    """Wanda that remembers the input norms each Linear was pruned with."""

    def __post_init__(self):
        super().__post_init__()
        self.seen = {}

    def prune(self, linear, stats, sparsity, pattern):
        self.seen[id(linear)] = stats.norms.clone()
        return super().prune(linear, stats, sparsity, pattern)


def input_norms(model, module, calib) -> torch.Tensor:
    """||X_j|| of ``module``'s inputs in a plain forward of ``model`` over ``calib``."""
    acc = torch.zeros(module.in_features)

    def add(_module, args, _output):  # returns None: the module's output is left alone
        acc.add_((args[0].reshape(-1, acc.numel()) ** 2).sum(0))

    handle = module.register_forward_hook(add)
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    return acc.sqrt()


@pytest.mark.slow
def test_later_blocks_are_calibrated_on_pruned_outputs(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (6, 24))
    dense_q1 = input_norms(model, decoder_layers(model)[1].self_attn.q_proj, calib)
    pruner = RecordingWanda(batch_size=4)
    prune_model(model, pruner, 0.5, SparsityPattern(), calib, progress=False)

    q1 = decoder_layers(model)[1].self_attn.q_proj
    # After pruning, block 1's inputs in a plain forward come from the pruned block 0: exactly what
    # the engine must have measured (block 1's own pruning does not change its q_proj inputs).
    pruned_q1 = input_norms(model, q1, calib)
    torch.testing.assert_close(pruner.seen[id(q1)], pruned_q1, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pruner.seen[id(q1)], dense_q1, rtol=1e-3)


@pytest.mark.slow
def test_first_block_mask_matches_hand_computed_wanda(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 16))
    q0 = decoder_layers(model)[0].self_attn.q_proj
    norms = input_norms(model, q0, calib)
    expected_scores = wanda_scores(q0.weight, norms)
    masks = prune_model(model, WandaPruner(batch_size=3), 0.5, SparsityPattern(), calib, progress=False)
    keep = masks["model.layers.0.self_attn.q_proj"]
    k = math.floor(q0.in_features * 0.5)
    for row in range(q0.out_features):
        pruned = set(torch.nonzero(~keep[row]).flatten().tolist())
        assert pruned == set(torch.sort(expected_scores[row], stable=True).indices[:k].tolist())


def test_masks_cover_every_target_and_zero_exactly_those_weights(tiny):
    model, _ = tiny
    calib = torch.randint(0, 256, (4, 16))
    masks = prune_model(
        model, WandaPruner(batch_size=4), 0.5, SparsityPattern("nm", 2, 4), calib, progress=False
    )
    linears = prunable_linears(model, TARGETS)
    assert list(masks) == list(linears) and len(masks) == 2 * 7
    for name, lin in linears.items():
        assert masks[name].dtype == torch.bool and masks[name].shape == lin.weight.shape
        assert torch.equal(lin.weight == 0, ~masks[name])
    # Their bits were reserved before the first block, in one buffer (no small blocks left among the
    # forward passes' temporaries), and every reserved slot was filled.
    assert len({bits.untyped_storage().data_ptr() for bits in masks.bits.values()}) == 1
    assert not masks.reserved


def test_calibration_free_pruner_needs_no_data(tiny):
    model, _ = tiny
    masks = prune_model(
        model, MagnitudePruner(targets=["down_proj"]), 0.25, SparsityPattern(), None, progress=False
    )
    assert list(masks) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all(int((~m).sum()) == math.floor(m.numel() * 0.25) for m in masks.values())


def test_captured_inputs_are_the_embeddings(tiny):
    model, _ = tiny
    calib = torch.randint(0, 256, (5, 12))
    captured = capture_block_inputs(model, calib, batch_size=2)
    assert [h.shape[0] for h, _ in captured] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([h for h, _ in captured]), model.model.embed_tokens(calib))
    assert "position_embeddings" in captured[0][1]


def test_true_sequential_measures_later_sublayers_after_earlier_ones_are_pruned(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (6, 24))
    dense = copy.deepcopy(model)
    down0 = decoder_layers(model)[0].mlp.down_proj
    dense_down0 = input_norms(dense, decoder_layers(dense)[0].mlp.down_proj, calib)

    plain, ordered = RecordingWanda(batch_size=4), RecordingWanda(batch_size=4, true_sequential=True)
    prune_model(dense, plain, 0.5, SparsityPattern(), calib, progress=False)
    prune_model(model, ordered, 0.5, SparsityPattern(), calib, progress=False)

    plain_seen = plain.seen[id(decoder_layers(dense)[0].mlp.down_proj)]
    torch.testing.assert_close(plain_seen, dense_down0, rtol=1e-4, atol=1e-5)  # all of block 0 measured dense
    # In order, down_proj is measured after q,k,v,o,gate,up of the same block were pruned: exactly its
    # inputs in the finished model (its own pruning does not change them).
    torch.testing.assert_close(
        ordered.seen[id(down0)], input_norms(model, down0, calib), rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(ordered.seen[id(down0)], plain_seen, rtol=1e-3)
    # q, k, v come first in either mode, so they see the same (dense) inputs.
    q0 = decoder_layers(model)[0].self_attn.q_proj
    torch.testing.assert_close(
        ordered.seen[id(q0)], plain.seen[id(decoder_layers(dense)[0].self_attn.q_proj)]
    )


def test_sequential_groups_follow_the_block_order():
    names = [
        "mlp.down_proj",
        "self_attn.q_proj",
        "mlp.up_proj",
        "self_attn.o_proj",
        "extra",
        "self_attn.v_proj",
    ]
    assert sequential_groups(names) == [
        ["self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.up_proj"],
        ["mlp.down_proj"],
        ["extra"],
    ]


def test_statistics_are_shared_by_linears_with_one_input_and_the_block_stops_early(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (6, 24))
    block = decoder_layers(model)[0]
    linears = block_linears(block, TARGETS)
    inputs = capture_block_inputs(model, calib, batch_size=4)
    calls = {"down": 0}
    handle = block.mlp.down_proj.register_forward_hook(
        lambda *_: calls.__setitem__("down", calls["down"] + 1)
    )
    stats = collect_stats(block, linears, WandaPruner(), inputs)
    handle.remove()

    assert calls["down"] == 0  # cut short once down_proj's input was read: its matmul never ran
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # q/k/v, o, gate/up, down
    for name, s in stats.items():
        assert s.tokens == 6 * 24
        torch.testing.assert_close(s.norms, input_norms(model, linears[name], calib), rtol=1e-4, atol=1e-5)


def test_each_block_is_pruned_at_its_own_sparsity(tiny):
    model, _ = tiny
    calib = torch.randint(0, 256, (4, 16))
    masks = prune_model(
        model, WandaPruner(batch_size=4), [0.25, 0.75], SparsityPattern(), calib, progress=False
    )
    for name, keep in masks.items():
        expected = 0.25 if ".layers.0." in name else 0.75
        assert int((~keep).sum()) == math.floor(keep.numel() * expected)


@pytest.mark.parametrize("pruner_cls", [WandaPruner, MagnitudePruner])
def test_a_compute_device_holds_one_block_at_a_time_and_gives_the_same_masks(tiny, pruner_cls):
    model, _ = tiny
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    expected = prune_model(reference, pruner_cls(), 0.5, SparsityPattern(), calib, progress=False)
    moves, away = [], set()
    for i, block in enumerate(decoder_layers(model)):

        def spy(device, i=i, block=block, real=block.to):
            target = torch.device(device)
            moves.append((i, str(target)))
            away.symmetric_difference_update({i})  # moved out, then back home
            assert len(away) <= 1, "two blocks on the compute device at once"
            return real(target)

        block.to = spy
    masks = prune_model(model, pruner_cls(device="cpu"), 0.5, SparsityPattern(), calib, progress=False)
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")] and not away
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    with pytest.raises(ConfigError, match=r"^pruner\.device='cuda:7': this machine has \d+ CUDA device"):
        WandaPruner(device="cuda:7")
    with pytest.raises(
        ConfigError, match=r"^pruner\.device='gpu0': must be null, cpu, cuda or cuda:<index>$"
    ):
        WandaPruner(device="gpu0")


def test_run_blocks_writes_each_blocks_outputs_over_its_inputs_and_feeds_them_to_the_next_block(tiny):
    """Each batch's outputs are written over its input tensor (no new long-lived tensors): every block
    sees the same storage, block 0 the captured states, block 1 exactly block 0's outputs; the last
    block's outputs are not computed, so the caller's tensors end holding the last block's inputs."""
    model, _ = tiny
    torch.manual_seed(0)
    inputs = capture_block_inputs(model, torch.randint(0, 256, (6, 16)), 4)
    original = [hidden for hidden, _ in inputs]
    layers = decoder_layers(model)
    with torch.no_grad():
        captured = [h.clone() for h in original]
        expected = [run_block(layers[0], h, kw) for h, kw in inputs]
    seen = []

    def visit(i, block, batch):
        assert all(h is o for (h, _), o in zip(batch, original, strict=True))
        seen.append([h.clone() for h, _ in batch])

    with torch.no_grad():
        run_blocks(layers, inputs, visit, False, "t")
    assert len(seen) == len(layers)
    assert all(h is o for (h, _), o in zip(inputs, original, strict=True))
    for h, c in zip(seen[0], captured, strict=True):
        torch.testing.assert_close(h, c, rtol=0, atol=0)
    for h, e in zip(seen[1], expected, strict=True):
        torch.testing.assert_close(h, e, rtol=0, atol=0)
    for h, last in zip(original, seen[-1], strict=True):
        torch.testing.assert_close(h, last, rtol=0, atol=0)
    assert not torch.equal(seen[0][0], seen[1][0])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap settings are glibc's")
@pytest.mark.parametrize("each_block", [False, True])
def test_the_block_walk_keeps_freed_memory_in_the_heap_and_hands_it_back_after(tiny, monkeypatch, each_block):
    """glibc takes the settings, and run_blocks holds them around the whole walk (visits and outputs);
    with hand_back_each_block, the heap also goes back after each visit and each block's outputs."""
    with heap_reused() as applied:
        assert applied
    events = []

    @contextlib.contextmanager
    def recording():
        events.append("keep")
        yield True
        events.append("hand back")

    monkeypatch.setattr(sequential, "heap_reused", recording)
    monkeypatch.setattr(sequential, "release_freed_memory", lambda: events.append("trim"))
    model, _ = tiny
    inputs = capture_block_inputs(model, torch.randint(0, 256, (4, 16)), 4)
    with torch.no_grad():
        run_blocks(
            decoder_layers(model),
            inputs,
            lambda i, b, x: events.append(f"visit {i}"),
            False,
            "t",
            hand_back_each_block=each_block,
        )
    trims = ["trim"] if each_block else []
    assert events == ["keep", "visit 0", *trims, *trims, "visit 1", *trims, "hand back"]


@pytest.mark.parametrize("pruner_cls", [WandaPruner, SparseGPTPruner])
def test_bf16_compute_multiplies_in_bf16_and_keeps_hidden_states_statistics_and_weights_fp32(
    tiny, pruner_cls
):
    """compute_dtype=bfloat16: every targeted Linear's product comes out bf16 in both passes, while the
    hidden states between blocks, the statistics (accumulated outside autocast) and the weights stay
    fp32; each matrix keeps exactly half, and the masks are nearly those of the fp32 run (rounding only)."""
    model, _ = tiny
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    expected = prune_model(copy.deepcopy(model), pruner_cls(), 0.5, SparsityPattern(), calib, progress=False)

    class Checked(pruner_cls):
        def new_stats(self, linear):
            stats = super().new_stats(linear)
            add = stats.add

            def checked_add(x):
                assert not torch.is_autocast_enabled("cpu"), "statistics accumulated under autocast"
                add(x)

            stats.add = checked_add
            return stats

    products, block_inputs = set(), set()
    linears = prunable_linears(model, TARGETS).values()
    hooks = [lin.register_forward_hook(lambda _m, _a, out: products.add(out.dtype)) for lin in linears]
    hooks += [
        block.register_forward_pre_hook(lambda _m, args: block_inputs.add(args[0].dtype))
        for block in decoder_layers(model)
    ]
    masks = prune_model(
        model, Checked(compute_dtype="bfloat16"), 0.5, SparsityPattern(), calib, progress=False
    )
    for h in hooks:
        h.remove()
    assert products == {torch.bfloat16} and block_inputs == {torch.float32}
    assert {lin.weight.dtype for lin in linears} == {torch.float32}
    agree = sum(int((masks[k] == expected[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
    assert agree > 0.99
    for name, keep in masks.items():
        assert int(keep.sum()) == keep.numel() // 2, name
        weight = prunable_linears(model, TARGETS)[name].weight
        assert torch.equal(weight != 0, keep), name  # exactly the pruned weights are zero


def test_the_default_compute_dtype_leaves_the_forwards_in_fp32_and_others_are_refused(tiny):
    model, _ = tiny
    products = set()
    hooks = [
        lin.register_forward_hook(lambda _m, _a, out: products.add(out.dtype))
        for lin in prunable_linears(model, TARGETS).values()
    ]
    prune_model(model, WandaPruner(), 0.5, SparsityPattern(), torch.randint(0, 256, (4, 16)), progress=False)
    for h in hooks:
        h.remove()
    assert products == {torch.float32}
    with pytest.raises(ConfigError, match=r"^pruner\.compute_dtype='float16': allowed: null .*, bfloat16$"):
        WandaPruner(compute_dtype="float16")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_warns_once_before_the_work(tiny, monkeypatch, caplog, native):
    """Without bf16 matrix instructions (an AVX2-only CPU) the products are emulated, slower than fp32:
    one warning per process, logged before the first block is measured; none with native bf16 or fp32."""
    model, _ = tiny
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(sequential, "cpu_has_bf16_matmul", lambda: native)
    sequential.warn_emulated_bf16.cache_clear()
    captured = []
    real_capture = sequential.capture_block_inputs

    def capture(*args, **kwargs):
        captured.append(len(caplog.records))  # warnings logged before the heavy work starts
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(sequential, "capture_block_inputs", capture)
    with caplog.at_level("WARNING", logger="sppx.pruning.sequential"):
        prune_model(copy.deepcopy(model), WandaPruner(), 0.5, SparsityPattern(), calib, progress=False)
        for _ in range(2):
            pruner = WandaPruner(compute_dtype="bfloat16")
            prune_model(copy.deepcopy(model), pruner, 0.5, SparsityPattern(), calib, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("pruner.compute_dtype=bfloat16: this CPU has no")
        assert captured == [0, 1, 1]  # the fp32 prune warned nothing, the first bf16 one before capturing
    sequential.warn_emulated_bf16.cache_clear()
