"""NutePrune: hard-concrete gates, the expected-sparsity constraint, the snapshot teachers and the
clean-up after mask learning, on tiny random Llamas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sppx.adapters import LoRAAdapter
from sppx.anatomy import Dims
from sppx.errors import ConfigError, RunError
from sppx.pipeline import build
from sppx.pruning.structured.base import StructuredContext
from sppx.pruning.structured.hard_concrete import (
    BETA,
    GAMMA,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    ZETA,
    HardConcrete,
    hard_concrete,
    keep_probability,
    log_alpha_for,
    lowest_zeroed,
    soft_gate,
)
from sppx.pruning.structured.nuteprune import (
    INTACT,
    MaskLearner,
    NutePrunePruner,
    Snapshot,
    TeacherSchedule,
    UnitGates,
    distills,
    expected_sparsity,
    target_at,
)
from sppx.pruning.structured.units import shrink_model
from sppx.teachers import DenseTeacher, NoTeacher, NumerousTeacher
from tests.conftest import CONF_DIR, parameter_storages

PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: the tiny models run several times faster than with two on a shared machine, and
    the short mask-learning runs are reproducible."""
    torch.set_num_threads(1)


def windows(n: int = 16, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def numerous() -> NumerousTeacher:
    return NumerousTeacher(lm_weight=0.0, kl_weight=0.1, hidden_weight=0.9, temperature=2 / 3)


# The tiny random model's distillation gradients are small: the reference's multiplier lr (0.1) balances
# them, where SmolLM2's need the much larger default (docs/nuteprune.md).
TINY = {"batch_size": 2, "lambda_lr": 0.1}


def run_select(model, sparsity: float, teacher=None, **fields):
    fields = {**TINY, **fields}
    pruner = NutePrunePruner(**fields)
    d = Dims.of(model.config)
    budget = pruner.budget(d, sparsity)
    ctx = StructuredContext(
        train=windows(), teacher=teacher, progress=False, seed=0, lora_factory=LoRAAdapter
    )
    return pruner, budget, pruner.select(model, budget, ctx)


# --------------------------------------------------------------------------- hard concrete
def hand_gate(log_alpha: float, u: float) -> float:
    s = 1.0 / (1.0 + math.exp(-(math.log(u) - math.log(1.0 - u) + log_alpha) / BETA))
    return min(1.0, max(0.0, s * (ZETA - GAMMA) + GAMMA))


def test_sample_equals_the_hand_formula_including_both_clamped_ends():
    log_alpha = [-3.0, 0.0, 0.7, 4.0, 0.0]
    u = [0.3, 0.5, 0.2, 0.9, 0.97]
    z = hard_concrete(torch.tensor(log_alpha, dtype=torch.float64), torch.tensor(u, dtype=torch.float64))
    expected = [hand_gate(a, b) for a, b in zip(log_alpha, u, strict=True)]
    assert z.tolist() == pytest.approx(expected, abs=1e-12)
    assert z[0].item() == 0.0 and z[3].item() == 1.0  # the stretch puts mass on exactly 0 and 1
    assert 0.0 < z[1].item() < 1.0 and 0.0 < z[2].item() < 1.0
    # The module draws the same function of its log_alpha.
    gate = HardConcrete(5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(log_alpha))
    assert gate.sample(u=torch.tensor(u)).tolist() == pytest.approx(expected, abs=1e-6)


def test_keep_probability_by_hand_and_by_monte_carlo():
    log_alpha = [-2.0, -0.5, 0.0, 1.5]
    hand = [1.0 - 1.0 / (1.0 + math.exp(-(BETA * math.log(-GAMMA / ZETA) - a))) for a in log_alpha]
    got = keep_probability(torch.tensor(log_alpha, dtype=torch.float64))
    assert got.tolist() == pytest.approx(hand, abs=1e-12)
    # P(z > 0) of 20000 samples per gate; the standard error of a mean of Bernoullis is <= 0.0036, so
    # 0.015 is a four-sigma tolerance.
    samples = 20000
    gate = HardConcrete((samples, len(log_alpha)))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(log_alpha).expand(samples, -1))
    z = gate.sample(torch.Generator().manual_seed(0))
    assert (z > 0).float().mean(dim=0).tolist() == pytest.approx(hand, abs=0.015)
    assert gate.expected_kept().item() == pytest.approx(samples * sum(hand), rel=1e-5)


def test_init_and_deterministic_gates():
    assert log_alpha_for(0.5) == 0.0
    assert log_alpha_for(0.1) == pytest.approx(math.log(9.0))
    gate = HardConcrete((2, 3), droprate_init=0.5, init_std=0.0)
    assert gate.keep_prob().flatten().tolist() == pytest.approx(
        [1 - 1 / (1 + math.exp(-BETA * math.log(1 / 11)))] * 6
    )
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([[3.0, -4.0, 0.5], [-5.0, 2.0, 2.0]]))
    zeros = round(gate.expected_zeros().item())
    assert zeros == 2
    assert gate.deterministic().tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert gate.deterministic(zeros=3).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    # Ties go to the lower flat index.
    assert lowest_zeroed(torch.tensor([1.0, 0.0, 0.0, 2.0]), 1).tolist() == [1.0, 0.0, 1.0, 1.0]
    # An explicit start overrides the drop rate; constrain() clamps to [log 1e-2, log 1e2].
    heads = HardConcrete((2, 3), log_alpha_init=10.0, init_std=0.0)
    assert heads.log_alpha.flatten().tolist() == [10.0] * 6
    with torch.no_grad():
        heads.log_alpha[0, 0] = -9.0
    heads.constrain()
    assert heads.log_alpha[0, 0].item() == pytest.approx(math.log(1e-2))
    assert heads.log_alpha[1].tolist() == pytest.approx([math.log(1e2)] * 3)


def test_deterministic_rows_close_the_rounded_expected_count_per_layer_with_soft_values():
    gate = HardConcrete((2, 4), init_std=0.0)
    rows = torch.tensor([[4.0, -4.0, -3.0, 0.5], [4.0, 4.0, 4.0, -4.0]])
    with torch.no_grad():
        gate.log_alpha.copy_(rows)
    z = gate.deterministic_rows()
    for i in range(2):
        zeros = round(4 - keep_probability(rows[i]).sum().item())
        closed = sorted(range(4), key=lambda j: rows[i, j].item())[:zeros]
        for j in range(4):
            soft = 1 / (1 + math.exp(-0.8 * rows[i, j].item() / BETA))
            assert z[i, j].item() == pytest.approx(0.0 if j in closed else soft, abs=1e-6)
    assert (z[0] == 0).sum().item() == 2 and (z[1] == 0).sum().item() == 1  # per layer, not overall
    assert gate.deterministic_rows(soft=False).tolist() == (z != 0).float().tolist()


# --------------------------------------------------------------------------- expected sparsity
def test_expected_sparsity_equals_a_hand_count(tiny):
    model, _ = tiny
    d = Dims.of(model.config)  # 2 layers, 4 heads / 2 KV heads of 16, hidden 64, 128 neurons
    gates = UnitGates(d, ["heads", "neurons"], droprate_init=0.5)
    c = BETA * math.log(-GAMMA / ZETA)  # log_alpha = c keeps a gate with probability 1/2
    with torch.no_grad():
        gates.kinds["heads"].log_alpha[0] = c
        gates.kinds["heads"].log_alpha[1] = c + math.log(3.0)  # keep probability 3/4
        gates.kinds["neurons"].log_alpha.fill_(c)
    # Per layer: a query head is 2 x 16 x 64 = 2048 parameters, a K/V head 2048, a neuron 3 x 64 = 192.
    total = 2 * (4 * 2048 + 2 * 2048 + 128 * 192)
    kept = (4 * 0.5 + 4 * 0.75) * 2048 + 2 * 2 * 2048 + 2 * 128 * 0.5 * 192
    assert gates.expected_sparsity().item() == pytest.approx(1 - kept / total, abs=1e-6)
    # 0/1 gates count whole units; nothing closed is the dense model.
    ones = gates.ones()
    assert gates.sparsity_of(ones) == pytest.approx(0.0, abs=1e-7)
    ones["heads"][0, 1] = 0.0
    ones["neurons"][1, :10] = 0.0
    assert gates.sparsity_of(ones) == pytest.approx((2048 + 10 * 192) / total)
    # Only the chosen units are gated.
    assert float(expected_sparsity(d, None, None)) == 0.0
    only_neurons = UnitGates(d, ["neurons"], droprate_init=0.5)
    assert set(only_neurons.kinds) == {"neurons"}


# --------------------------------------------------------------------------- mask learning
def test_gates_start_open_and_the_target_ramps_from_zero(tiny):
    model, _ = tiny
    learner = MaskLearner(model, NutePrunePruner(), 0.3, numerous(), seed=0, lora_factory=LoRAAdapter)
    heads, neurons = learner.gates.kinds["heads"].log_alpha, learner.gates.kinds["neurons"].log_alpha
    assert heads.mean().item() == pytest.approx(10.0, abs=0.01)
    assert neurons.mean().item() == pytest.approx(math.log(0.99 / 0.01), abs=0.01)
    assert learner.gates.expected_sparsity().item() < 0.02  # almost nothing closed before any step
    warmup = learner.pruner.warmup_steps
    assert [target_at(s, 0.3, warmup) for s in (0, warmup // 2, warmup, warmup + 5)] == pytest.approx(
        [0.0, 0.3 * (warmup // 2) / warmup, 0.3, 0.3]
    )
    learner.install()
    terms = learner.losses(windows(2, 16), 0, learner.gates.sample(torch.Generator().manual_seed(0)))
    assert terms["target_sparsity"] == 0.0 and terms["expected_sparsity"].item() < 0.02
    learner.release()


def test_the_lora_comes_from_the_context_and_only_distillers_teach(tiny):
    model, _ = tiny
    pruner = NutePrunePruner(**TINY)
    budget = pruner.budget(Dims.of(model.config), 0.3)
    with pytest.raises(RunError, match=r"^pruner=nuteprune needs a LoRA factory in its context$"):
        pruner.select(model, budget, StructuredContext(train=windows(), progress=False))
    assert not distills(None) and not distills(NoTeacher())
    assert distills(DenseTeacher()) and distills(numerous())
    assert MaskLearner(model, pruner, 0.3, NoTeacher(), lora_factory=LoRAAdapter).teacher is None
    built = []

    def factory(**kwargs):
        built.append(kwargs)
        return LoRAAdapter(**kwargs)

    learner = MaskLearner(model, pruner, 0.3, numerous(), lora_factory=factory)
    assert built == [{"r": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}]
    assert isinstance(learner.lora, LoRAAdapter) and learner.teacher is not None


def test_log_alpha_stays_within_the_clamp_after_training_steps(tiny):
    model, _ = tiny
    # A fast multiplier pushes the gates hard in 12 steps; the heads start at 10, above the clamp.
    pruner, _, _ = run_select(model, 0.3, None, steps=12, lambda_lr=10.0, mask_lr=0.5)
    ranges = pruner.report["log_alpha"]
    assert set(ranges) == {"heads", "neurons"}
    for low, high in ranges.values():
        assert LOG_ALPHA_MIN - 1e-6 <= low <= high <= LOG_ALPHA_MAX + 1e-6
    assert ranges["heads"][1] < 10.0  # clamped after the first step
    assert ranges["neurons"][0] < LOG_ALPHA_MAX - 1.0  # the gates did move


@pytest.mark.slow
def test_lagrangian_drives_expected_sparsity_to_the_target(tiny):
    model, _ = tiny
    pruner, budget, _ = run_select(model, 0.3, None, steps=200, warmup=0.4)
    report = pruner.report
    target = budget.sparsity(Dims.of(model.config))
    assert report["target_sparsity"] == pytest.approx(target, abs=1e-6)
    assert abs(report["expected_sparsity"] - target) < 0.01, report
    assert report["lambda2"] > 0  # gradient ascent: d/d(l2) = (s_hat - t)^2 >= 0 only ever raises it
    assert report["steps"] == 200 and report["warmup_steps"] == 80
    assert report["teacher"]["strategy"] == "none"
    assert [s["teacher"] for s in report["teacher"]["schedule"]] == ["none"]
    assert pruner.trace[0]["student_sparsity"] < 0.02


def test_select_gives_uniform_budget_widths_and_leaves_a_plain_model(tiny):
    model, _ = tiny
    names = {n: p.shape for n, p in model.named_parameters()}
    count = sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner, budget, structure = run_select(model, 0.3, DenseTeacher(), steps=4, fold_gates=False)
    d = Dims.of(model.config)
    assert budget.heads == 2 and budget.neurons > 0  # one query head from each of the 2 K/V groups
    assert structure.widths() == (d.heads - budget.heads, d.kv_heads, d.intermediate - budget.neurons)
    for i in range(d.layers):
        per_group = [
            sum(1 for h in structure.heads_of(i) if h // d.group_size == k) for k in range(d.kv_heads)
        ]
        assert per_group == [1, 1]
    assert structure.sparsity() == pytest.approx(budget.sparsity(d))
    # Nothing NutePrune added is left: no hooks, no LoRA wrappers or tensors, no peft config.
    assert {n: p.shape for n, p in model.named_parameters()} == names
    assert sum(p.numel() for p in model.parameters()) == count
    assert not hasattr(model, "peft_config")
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, name
        if name.rsplit(".", 1)[-1] in PROJECTION_NAMES:
            assert type(module) is nn.Linear, name
    # The LoRA was merged into q_proj and v_proj; without folding the other weights are untouched.
    after = dict(model.named_parameters())
    changed = {n.rsplit(".", 2)[-2] for n in names if not torch.equal(before[n], after[n])}
    assert changed == {"q_proj", "v_proj"}
    assert pruner.report["lora_merged"] == 2 * d.layers and pruner.report["gates_folded"] is False
    assert pruner.report["mask_learning_s"] > 0
    shrink_model(model, structure)
    assert model(input_ids=windows(1, 8)).logits.shape == (1, 8, 257)


def test_folded_gates_equal_the_hooks_with_the_soft_deterministic_values(tiny):
    model, _ = tiny
    d = Dims.of(model.config)
    gates = UnitGates(d, ["heads", "neurons"], droprate_init=0.5)
    with torch.no_grad():
        for gate in gates.kinds.values():
            gate.log_alpha.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(1))
    ids = windows(2, 12)
    gates.attach(model)
    soft = {kind: soft_gate(gate.log_alpha.detach()) for kind, gate in gates.kinds.items()}
    with torch.no_grad(), gates.using(soft):
        hooked = model(input_ids=ids).logits
    gates.detach()
    gates.fold(model)
    with torch.no_grad():
        folded = model(input_ids=ids).logits
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-5)
    # The neuron gate multiplies both gate_proj's and up_proj's outputs: act(z g) * (z u).
    assert not torch.allclose(soft["neurons"], torch.ones_like(soft["neurons"]))


@pytest.mark.slow
def test_numerous_snapshots_follow_the_reference_schedule(tiny):
    model, _ = tiny
    pruner, _, _ = run_select(model, 0.3, numerous(), steps=120, warmup=0.4)
    trace, report = pruner.trace, pruner.report
    teacher, target = report["teacher"], report["target_sparsity"]
    every, ahead = 0.01, 10
    thresholds = [k * every for k in range(1, math.floor(target / every + 1e-9))]
    # One record a step, in order, each when s_hat (before the step's update) reached its threshold.
    taken = [row for row in trace if row["snapshot_taken"] is not None]
    assert [row["snapshot_taken"] for row in taken] == list(range(1, len(thresholds) + 1))
    assert all(row["student_sparsity"] >= thresholds[row["snapshot_taken"] - 1] for row in taken)
    recorded_before = 0
    for row in trace:
        if row["phase"] == "ramp":  # the ahead-th newest record teaches, the intact model before
            expected = recorded_before - ahead + 1 if recorded_before >= ahead else None
            assert row["teacher_level"] == expected, row
        recorded_before += row["snapshot_taken"] is not None
    # The walk back starts after every threshold was recorded and s_hat reached the target; its teachers
    # only get less sparse and the last steps are taught by the intact model.
    reached = teacher["target_reached_step"]
    assert reached is not None and trace[reached]["student_sparsity"] >= target
    walk = [row for row in trace if row["phase"] == "walk back"]
    assert walk and walk[0]["step"] == reached + 1
    levels = [row["teacher_level"] or 0 for row in walk]
    assert all(a >= b for a, b in itertools.pairwise(levels)) and levels[0] > 0
    assert trace[-1]["teacher"] == INTACT
    stages = teacher["schedule"]
    assert teacher["snapshot_stages"] == sum(1 for s in stages if s["teacher"] == "snapshot") >= 3
    assert stages[-1]["teacher"] == "intact" and stages[-1]["steps"][1] == 119
    assert teacher["snapshots_taken"] == len(thresholds) and teacher["snapshot_mib"] > 0


def test_schedule_rules_on_a_synthetic_student():
    """A student whose s_hat climbs 0.01 a step to 0.2, then holds, over 60 steps: the reference's
    records, the teacher 10 records back, then the walk back by remaining steps."""
    schedule = TeacherSchedule("numerous", total_steps=60, target=0.2, every=0.01, gap=0.1)

    def take(level, step, s_hat):
        return Snapshot(level, step, s_hat, level * 0.01, {}, {"x": torch.zeros(4)})

    s_hats = [min(step, 20) * 0.01 + 0.001 for step in range(60)]
    teachers = [schedule.choose(step, s, take) for step, s in enumerate(s_hats)]
    assert schedule.thresholds == pytest.approx([k * 0.01 for k in range(1, 20)])
    assert schedule.taken == 19  # thresholds 0.01 .. 0.19, recorded at steps 1 .. 19
    levels = [None if t == INTACT else t.level for t in teachers]
    # Ramp: records 1..n exist before step n + 1; the 10th newest teaches from step 11 on.
    assert levels[:11] == [None] * 11
    assert levels[11:21] == list(range(1, 11))
    # s_hat 0.201 >= 0.2 at step 20 with every record taken: R0 = 60 - 20 = 40, interval 40 // 20 = 2,
    # record index min(R // 2 - 10, 18) for R = 39, 38, ...: levels 10, 10, 9, 9, ... 1, 1, then intact.
    assert schedule.walk_back_step == 20 and schedule.walk_back_from == 40
    walk = [min((60 - step) // 2 - 10, 18) + 1 for step in range(21, 60)]
    assert levels[21:] == [level if level > 0 else None for level in walk]
    assert levels[21] == 10 and levels[-1] is None
    assert schedule.held_max == 19 and all(snap is None for snap in schedule.records)
    report = schedule.report()
    assert report["snapshot_stages"] == 10 + 10 and report["target_reached_step"] == 20
    # The other strategies never take snapshots.
    dense = TeacherSchedule("dense", 5, 0.3)
    assert [dense.choose(s, 0.2, take) for s in range(5)] == [INTACT] * 5 and dense.taken == 0


def test_a_numerous_run_in_which_no_snapshot_taught_fails(tiny):
    model, _ = tiny
    names = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(RunError, match=r"^teacher=numerous: no snapshot taught in 5 mask-learning steps"):
        run_select(model, 0.3, numerous(), steps=5)
    assert {n: p.shape for n, p in model.named_parameters()} == names  # released before failing
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTION_NAMES:
            assert type(module) is nn.Linear and not module._forward_pre_hooks and not module._forward_hooks


def test_a_teacher_pass_reuses_the_students_storage(tiny):
    model, _ = tiny
    pruner = NutePrunePruner(steps=2)
    learner = MaskLearner(model, pruner, 0.3, numerous(), seed=0, lora_factory=LoRAAdapter)
    learner.install()
    with torch.no_grad():
        learner.gates.kinds["neurons"].log_alpha[:, :40] = -3.0  # some gates closing
    lora = learner.lora.state(model)
    with torch.no_grad():
        for t in lora.values():
            t.add_(0.01)
    snapshot = learner.snapshot(level=20, step=0, s_hat=0.2)
    with torch.no_grad():
        for t in lora.values():
            t.add_(0.01)  # the student moves on after the snapshot
    live = {k: t.detach().clone() for k, t in lora.items()}
    storages = parameter_storages(model)
    ids = windows(2, 16)
    intact = learner.teacher_pass(ids, INTACT)
    snap = learner.teacher_pass(ids, snapshot)
    assert parameter_storages(model) == storages  # the same tensors, nothing copied or re-allocated
    assert all(torch.equal(t, live[k]) for k, t in learner.lora.state(model).items())  # swapped back
    assert learner.gates.current is None
    assert not torch.allclose(intact.last_hidden, snap.last_hidden)
    # The snapshot holds the deterministic gates (closed: 0, kept: their soft value) and LoRA tensors.
    assert set(snapshot.lora) == set(lora)
    neurons = snapshot.gates["neurons"]
    assert ((neurons == 0).sum(dim=1) > 0).all() and ((neurons > 0) & (neurons <= 1)).any()
    assert (
        snapshot.sparsity == pytest.approx(learner.gates.sparsity_of(snapshot.gates))
        and snapshot.sparsity > 0
    )
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert snapshot.nbytes < 0.1 * model_bytes
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not weights & {t.untyped_storage().data_ptr() for t in snapshot.lora.values()}
    learner.release()


def test_dense_teacher_gives_zero_distillation_loss_with_open_gates_at_step_0(tiny):
    model, _ = tiny
    learner = MaskLearner(
        model,
        NutePrunePruner(),
        0.3,
        DenseTeacher(lm_weight=0.0, hidden_weight=1.0),
        0,
        lora_factory=LoRAAdapter,
    )
    learner.install()  # LoRA B starts at zero, the multipliers at zero
    ids = windows(2, 16)
    terms = learner.losses(ids, 0, learner.gates.ones())
    assert terms["kd_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["kd_hidden"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["lagrangian"].item() == 0.0 and terms["target_sparsity"] == 0.0
    assert terms["teacher_sparsity"] == 0.0
    # Gates partly closed differ from the teacher's open ones: the loss sees it.
    half = {kind: torch.full_like(z, 0.5) for kind, z in learner.gates.ones().items()}
    sampled = learner.losses(ids, 1, half)
    assert sampled["kd_kl"].item() > 1e-4 and sampled["kd_hidden"].item() > 1e-4
    learner.release()


# --------------------------------------------------------------------------- config
def test_config_file_builds_and_bad_values_are_refused(tiny):
    pruner = build(OmegaConf.load(CONF_DIR / "pruner" / "nuteprune.yaml"), "pruner")
    assert isinstance(pruner, NutePrunePruner)
    assert (pruner.name, pruner.uses_teacher, pruner.needs_calibration) == ("nuteprune", True, False)
    defaults = NutePrunePruner()
    for key in ("steps", "warmup", "mask_lr", "lambda_lr", "lora_lr", "lora_r", "lora_alpha"):
        assert getattr(pruner, key) == getattr(defaults, key), key
    assert (pruner.lora_r, pruner.lora_alpha, pruner.mask_lr, pruner.lora_lr) == (8, 8.0, 0.1, 1e-3)
    assert (pruner.droprate_init, pruner.head_log_alpha, pruner.fold_gates) == (0.01, 10.0, True)
    for fields, key in [
        ({"head_mode": "group"}, "pruner.head_mode"),
        ({"units": ["layers", "heads"]}, "pruner.units"),
        ({"steps": 0}, "pruner.steps"),
        ({"warmup": 1.5}, "pruner.warmup"),
        ({"mask_lr": 0}, "pruner.mask_lr"),
        ({"lambda_lr": -0.1}, "pruner.lambda_lr"),
        ({"lora_r": 0}, "pruner.lora_r"),
        ({"lora_targets": ["qkv"]}, "pruner.lora_targets"),
        ({"droprate_init": 1.0}, "pruner.droprate_init"),
        ({"head_log_alpha": math.inf}, "pruner.head_log_alpha"),
        ({"fold_gates": "yes"}, "pruner.fold_gates"),
        ({"accelerator": "tpu"}, "pruner.accelerator"),
    ]:
        with pytest.raises(ConfigError) as err:
            NutePrunePruner(**fields)
        assert err.value.key == key, fields
    model, _ = tiny

    class OtherTeacher(NoTeacher):
        name = "other"

    with pytest.raises(ConfigError, match="teacher="):
        run_select(model, 0.3, OtherTeacher(), steps=1)
