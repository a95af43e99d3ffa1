"""NutePrune: hard-concrete gates, the expected-sparsity constraint, the snapshot teachers and the
clean-up after mask learning, on tiny random Llamas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sppx.errors import ConfigError
from sppx.pipeline import build
from sppx.pruning.structured.base import StructuredContext
from sppx.pruning.structured.hard_concrete import (
    BETA,
    GAMMA,
    ZETA,
    HardConcrete,
    hard_concrete,
    keep_probability,
    log_alpha_for,
    lowest_zeroed,
)
from sppx.pruning.structured.nuteprune import (
    INTACT,
    MaskLearner,
    NutePrunePruner,
    Snapshot,
    TeacherSchedule,
    UnitGates,
    expected_sparsity,
)
from sppx.pruning.structured.units import Dims, shrink_model
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


def run_select(model, sparsity: float, teacher=None, **fields):
    fields.setdefault("batch_size", 2)
    pruner = NutePrunePruner(**fields)
    d = Dims.of(model.config)
    budget = pruner.budget(d, sparsity)
    ctx = StructuredContext(train=windows(), teacher=teacher, progress=False, seed=0)
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
def test_lagrangian_drives_expected_sparsity_to_the_target(tiny):
    model, _ = tiny
    pruner, budget, _ = run_select(model, 0.3, None, steps=160, warmup=0.25, ramp_from_init=True)
    report = pruner.report
    target = budget.sparsity(Dims.of(model.config))
    assert report["target_sparsity"] == pytest.approx(target, abs=1e-6)
    assert abs(report["expected_sparsity"] - target) < 0.03, report
    assert report["lambda2"] > 0  # gradient ascent: d/d(l2) = (s_hat - t)^2 >= 0 only ever raises it
    assert report["steps"] == 160 and report["warmup_steps"] == 40
    assert report["teacher"]["strategy"] == "none"
    assert [s["teacher"] for s in report["teacher"]["schedule"]] == ["none"]
    assert report["ramp_start"] == pytest.approx(pruner.trace[0]["student_sparsity"], abs=1e-6)


def test_select_gives_uniform_budget_widths_and_leaves_a_plain_model(tiny):
    model, _ = tiny
    names = {n: p.shape for n, p in model.named_parameters()}
    count = sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner, budget, structure = run_select(model, 0.3, DenseTeacher(), steps=4)
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
    # The LoRA was merged into q_proj and v_proj; the other weights are untouched.
    after = dict(model.named_parameters())
    changed = {n.rsplit(".", 2)[-2] for n in names if not torch.equal(before[n], after[n])}
    assert changed == {"q_proj", "v_proj"}
    assert pruner.report["lora_merged"] == 2 * d.layers
    assert pruner.report["mask_learning_s"] > 0
    shrink_model(model, structure)
    assert model(input_ids=windows(1, 8)).logits.shape == (1, 8, 257)


def test_numerous_snapshots_trail_the_student_then_walk_back_to_the_intact_model(tiny):
    model, _ = tiny
    gap, every = 0.1, 0.01
    pruner, _, _ = run_select(model, 0.3, numerous(), steps=60, warmup=0.5, ramp_from_init=True)
    trace, report = pruner.trace, pruner.report
    warmup, target = report["warmup_steps"], report["target_sparsity"]
    assert warmup == 30
    # A snapshot exactly when s_hat climbs into a higher multiple of snapshot_every during the ramp.
    for prev, row in itertools.pairwise(trace):
        climbed = math.floor(row["student_sparsity"] / every + 1e-9) > math.floor(
            prev["student_sparsity"] / every + 1e-9
        )
        assert (row["snapshot_taken"] is not None) == (climbed and row["step"] < warmup), row
    taken = [row for row in trace if row["snapshot_taken"] is not None]
    assert len(taken) == report["teacher"]["snapshots_taken"] >= 5
    # While ramping the teacher trails the student by about teacher_gap: never closer, and within a
    # few snapshot steps once a snapshot that far behind exists.
    lowest = min(r["student_sparsity"] for r in taken)
    snapshot_steps = 0
    for row in trace[:warmup]:
        s, teacher = row["student_sparsity"], row["teacher_sparsity"]
        assert teacher <= s - gap + 1e-9 or row["teacher"] == INTACT
        if row["teacher"] == "snapshot":
            snapshot_steps += 1
            assert s - gap - teacher < 0.04, row
        elif s - gap > lowest + 0.03:
            pytest.fail(f"no snapshot teacher at step {row['step']} although one is far enough behind")
    assert snapshot_steps >= 5
    # After the ramp the teacher's sparsity only falls, stays below target - gap, and the last step is
    # taught by the intact model.
    after = [row["teacher_sparsity"] for row in trace[warmup:]]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert max(after) <= target - gap + 1e-9
    assert trace[-1]["teacher"] == INTACT and trace[-1]["teacher_sparsity"] == 0.0
    stages = report["teacher"]["schedule"]
    assert stages[-1]["teacher"] == "intact" and stages[-1]["steps"][1] == 59
    assert {s["teacher"] for s in stages} == {"intact", "snapshot"}
    assert report["teacher"]["snapshots_held_max"] >= 1 and report["teacher"]["snapshot_mib"] > 0


def test_schedule_rules_on_a_synthetic_student():
    """A student whose s_hat climbs 0.01 a step to 0.4, then holds: snapshots every level, the teacher
    0.1 behind, then a linear walk back to the intact model, freeing snapshots on the way."""
    schedule = TeacherSchedule("numerous", total_steps=60, warmup_steps=40, target=0.4, every=0.01, gap=0.1)

    def take(level, step, s_hat):
        return Snapshot(level, step, s_hat, level * 0.01, {}, {"x": torch.zeros(4)})

    teachers = [schedule.choose(step, min(step, 40) * 0.01 + 0.001, take) for step in range(60)]
    assert schedule.taken == 39  # levels 1..39 (level 40 is reached at step 40, after the ramp)
    assert [t == INTACT for t in teachers[:11]] == [True] * 11
    assert [teachers[step].level for step in range(11, 40)] == [step - 10 for step in range(11, 40)]
    walk = [0.0 if t == INTACT else t.sparsity for t in teachers[40:]]
    assert walk[0] == pytest.approx(0.3) and walk[-1] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(walk))
    assert len(schedule.snapshots) == 0 and schedule.held_max == 39
    # The other strategies never take snapshots.
    dense = TeacherSchedule("dense", 5, 2, 0.3)
    assert [dense.choose(s, 0.2, take) for s in range(5)] == [INTACT] * 5 and dense.taken == 0


def test_a_teacher_pass_reuses_the_students_storage(tiny):
    model, _ = tiny
    pruner = NutePrunePruner(steps=2)
    learner = MaskLearner(model, pruner, 0.3, numerous(), seed=0)
    learner.install()
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
    # The snapshot holds 0/1 gates and LoRA tensors only: a small fraction of the weights.
    assert set(snapshot.lora) == set(lora)
    assert all(((g == 0) | (g == 1)).all() for g in snapshot.gates.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert snapshot.nbytes < 0.1 * model_bytes
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not weights & {t.untyped_storage().data_ptr() for t in snapshot.lora.values()}
    learner.release()


def test_dense_teacher_gives_zero_distillation_loss_with_open_gates_at_step_0(tiny):
    model, _ = tiny
    learner = MaskLearner(
        model, NutePrunePruner(ramp_from_init=False), 0.3, DenseTeacher(lm_weight=0.0, hidden_weight=1.0), 0
    )
    learner.install()  # LoRA B starts at zero, the multipliers at zero
    ids = windows(2, 16)
    terms = learner.losses(ids, 0, learner.gates.ones())
    assert terms["kd_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["kd_hidden"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["lagrangian"].item() == 0.0 and terms["target_sparsity"] == 0.0
    assert terms["teacher_sparsity"] == 0.0
    # Sampled gates differ from the teacher's open ones: the loss sees it.
    sampled = learner.losses(ids, 1, learner.gates.sample(torch.Generator().manual_seed(0)))
    assert sampled["kd_kl"].item() > 1e-4 and sampled["kd_hidden"].item() > 1e-4
    learner.release()


# --------------------------------------------------------------------------- config
def test_config_file_builds_and_bad_values_are_refused(tiny):
    pruner = build(OmegaConf.load(CONF_DIR / "pruner" / "nuteprune.yaml"), "pruner")
    assert isinstance(pruner, NutePrunePruner)
    assert (pruner.name, pruner.uses_teacher, pruner.needs_calibration) == ("nuteprune", True, False)
    assert (pruner.steps, pruner.mask_lr, pruner.lambda_lr, pruner.lora_r) == (40, 0.1, 0.1, 8)
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
        ({"ramp_from_init": "yes"}, "pruner.ramp_from_init"),
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
