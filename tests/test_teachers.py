"""Teacher strategies: the dense teacher is the unpruned model, the numerous schedule, KD losses."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sppx.adapters import SPPAdapter
from sppx.distill import hidden_mse, layer_mse_sum, logit_kl
from sppx.errors import ConfigError, RunError
from sppx.masking import DenseKeeper, StudentMasks
from sppx.pipeline import plan, run
from sppx.pruning import MagnitudePruner, SparsityPattern, prune_model
from sppx.summary import summary_table
from sppx.teachers import DenseTeacher, NumerousSchedule, NumerousTeacher, TeacherPass
from tests.conftest import compose_config, parameter_storages, tiny_run_overrides

UNSTRUCTURED = SparsityPattern("unstructured")


def ids(n: int = 2, seqlen: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(5))


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters (shared storage counted once)."""
    return sum(parameter_storages(model).values())


def adapted_student(model: nn.Module, steps: int = 0, sparsity: float = 0.5):
    pruner = MagnitudePruner()
    keeper = DenseKeeper(pruner, steps)
    masks = prune_model(model, pruner, sparsity, UNSTRUCTURED, progress=False, keeper=keeper)
    students = StudentMasks.attach(model, masks, keeper.levels or None, steps)
    adapter = SPPAdapter(dropout=0.0)
    adapter.apply(model)
    with torch.no_grad():
        for t in adapter.state(model).values():
            t.normal_(0, 0.2, generator=torch.Generator().manual_seed(6))
    return students, adapter, masks


# --------------------------------------------------------------------------- losses
def test_kd_losses_are_zero_exactly_when_student_equals_teacher():
    logits = torch.randn(2, 7, 50)
    hidden = [torch.randn(2, 7, 16) for _ in range(4)]
    assert logit_kl(logits, logits.clone(), 0.67).item() == 0.0
    assert hidden_mse(hidden, [h.clone() for h in hidden]).item() == 0.0
    other = logits + torch.randn_like(logits)
    assert logit_kl(other, logits, 1.0).item() > 0
    assert hidden_mse(hidden, [h + 1 for h in hidden]).item() > 0


def test_logit_kl_matches_its_definition_and_respects_the_token_mask():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=gen), torch.randn(2, 3, 11, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    T = 2.0
    p_t = torch.softmax(t / T, -1)
    per_token = (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1)
    expected = per_token[mask.bool()].mean() * T**2
    torch.testing.assert_close(logit_kl(s, t, T, mask), expected)


def test_reference_kl_is_batchmean_kl_div_times_t_squared():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 7, 13, generator=gen, requires_grad=True)
    t = torch.randn(3, 7, 13, generator=gen)
    T = 2 / 3
    s_ref = s.detach().clone().requires_grad_(True)
    by_hand = F.kl_div(F.log_softmax(s_ref / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    loss = logit_kl(s, t, T, chunk_rows=5, per="sequence")  # 21 rows in chunks of 5
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    by_hand.backward()
    torch.testing.assert_close(s.grad, s_ref.grad)
    # Summed over the tokens and divided by the sequences: 7 tokens each, so 7x the per-token mean.
    torch.testing.assert_close(loss.detach(), 7 * logit_kl(s.detach(), t, T))
    # Padding stays out: the sum runs over the selected tokens, the divisor is still the sequences.
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    p_t = F.softmax(t / T, -1)
    per_token = (p_t * (F.log_softmax(t / T, -1) - F.log_softmax(s.detach() / T, -1))).sum(-1)
    expected = per_token[mask.bool()].sum() / 3 * T**2
    torch.testing.assert_close(logit_kl(s.detach(), t, T, mask, per="sequence"), expected)
    with pytest.raises(ValueError, match="per must be"):
        logit_kl(s, t, T, per="batch")


def test_reference_hidden_term_is_the_per_layer_mean_over_non_zero_entries_summed():
    gen = torch.Generator().manual_seed(2)
    student = [torch.randn(2, 5, 8, generator=gen) for _ in range(4)]
    teacher = [torch.randn(2, 5, 8, generator=gen) * 3 for _ in range(4)]
    student[2][:, :, :3] = 0.0  # e.g. dimensions a mask zeroed: left out of that layer's mean
    by_hand = sum(
        torch.nn.MSELoss(reduction="mean")(t[s != 0], s[s != 0])
        for s, t in zip(student[1:], teacher[1:], strict=True)
    )
    torch.testing.assert_close(layer_mse_sum(student, teacher), by_hand)
    assert layer_mse_sum(student, [h.clone() for h in student]).item() == 0.0
    # Absolute: scaling both by 10 scales it by 100 (the relative term would not change).
    scaled = layer_mse_sum([h * 10 for h in student], [h * 10 for h in teacher])
    torch.testing.assert_close(scaled, 100 * by_hand)
    # With a token mask only the selected tokens count.
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    sel = mask.bool()
    masked = sum(
        F.mse_loss(s[sel][s[sel] != 0], t[sel][s[sel] != 0])
        for s, t in zip(student[1:], teacher[1:], strict=True)
    )
    torch.testing.assert_close(layer_mse_sum(student, teacher, mask), masked)


def test_distillers_choose_the_normalisation():
    gen = torch.Generator().manual_seed(3)
    head = nn.Linear(8, 11, bias=False)
    hidden_t = [torch.randn(2, 4, 8, generator=gen) for _ in range(3)]
    hidden_s = [h + 0.3 * torch.randn(2, 4, 8, generator=gen) for h in hidden_t]
    with torch.no_grad():
        student = type("Out", (), {"logits": head(hidden_s[-1]), "hidden_states": tuple(hidden_s)})()
    teacher = TeacherPass(hidden_t[-1], tuple(hidden_t), head)
    lm = torch.tensor(2.0)
    numerous = NumerousTeacher(lm_weight=0.0, kl_weight=0.1, hidden_weight=0.9, temperature=2 / 3)
    assert numerous.normalisation == "reference" and DenseTeacher().normalisation == "token"
    total, extra = numerous.distillation(student, teacher, lm, None)
    kl = logit_kl(student.logits, teacher.logits(), 2 / 3, per="sequence")
    torch.testing.assert_close(extra["kd_kl"], kl)
    torch.testing.assert_close(extra["kd_hidden"], layer_mse_sum(hidden_s, hidden_t))
    torch.testing.assert_close(total, 0.1 * kl + 0.9 * layer_mse_sum(hidden_s, hidden_t))
    token = DenseTeacher(lm_weight=1.0, kl_weight=0.1, hidden_weight=0.9, temperature=2 / 3)
    total, extra = token.distillation(student, teacher, lm, None)
    torch.testing.assert_close(extra["kd_kl"], logit_kl(student.logits, teacher.logits(), 2 / 3))
    torch.testing.assert_close(extra["kd_hidden"], hidden_mse(hidden_s, hidden_t))
    with pytest.raises(ConfigError) as err:
        DenseTeacher(normalisation="sum")
    assert err.value.key == "teacher.normalisation"


def test_dense_teacher_loss_is_zero_at_the_start_when_nothing_is_pruned(tiny):
    model, _ = tiny
    students = StudentMasks.attach(model, {})
    adapter = SPPAdapter()  # b = 0: the adapted model starts exactly at the base model
    adapter.apply(model)
    teacher = DenseTeacher(lm_weight=0.0, kl_weight=1.0, hidden_weight=1.0)
    teacher.bind(model, students, adapter, 0.0)
    model.train()
    batch = ids()
    teacher_out = teacher.teacher_outputs(model, batch, None)
    student = model(input_ids=batch, output_hidden_states=True)
    loss, extra = teacher.loss(student, teacher_out, torch.tensor(3.0), None)
    assert extra["kd_kl"].item() == 0.0 and extra["kd_hidden"].item() == 0.0
    assert loss.item() == 0.0


# --------------------------------------------------------------------------- the dense teacher
def test_dense_teacher_pass_is_the_unpruned_model_without_a_second_copy(tiny):
    model, _ = tiny
    unpruned = copy.deepcopy(model)
    bytes_before = parameter_bytes(model)
    students, adapter, _ = adapted_student(model)
    teacher = DenseTeacher()
    teacher.bind(model, students, adapter, 0.5)
    batch = ids()
    with torch.no_grad():
        student_before = model(input_ids=batch).logits
        expected = unpruned(input_ids=batch).logits
    teacher_logits = teacher.teacher_outputs(model, batch, None).logits()
    torch.testing.assert_close(teacher_logits, expected, rtol=0, atol=0)
    # Only the adapter's tensors were added: the base weights exist once.
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.state(model).values())
    assert parameter_bytes(model) == bytes_before + adapter_bytes
    # The student is untouched by the teacher pass and differs from the teacher.
    with torch.no_grad():
        student_after = model(input_ids=batch).logits
    torch.testing.assert_close(student_after, student_before, rtol=0, atol=0)
    assert not torch.allclose(student_after, expected)


# --------------------------------------------------------------------------- the numerous schedule
def test_numerous_schedule_picks_the_teachers_by_hand():
    # 10 steps, 5 mask steps, ramp over 5 steps from mask step 0, teacher 2 steps behind.
    schedule = NumerousSchedule(total_steps=10, levels=5, start_level=0, warmup_steps=5, gap=2)
    assert [schedule.student_level(t) for t in range(10)] == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    assert schedule.snapshots == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    # Ramp: intact until a snapshot 2 behind exists; then walk back 3, 2, 1, 0 and end intact.
    assert [schedule.teacher_level(t) for t in range(10)] == [None, None, 0, 1, 2, 3, 2, 1, 0, None]
    assert schedule.last_use() == {0: 8, 1: 7, 2: 6, 3: 5}


def test_numerous_schedule_with_a_fast_ramp_uses_the_nearest_snapshot_below():
    # 75 mask steps reached in 3 steps: the student jumps 0 -> 25 -> 50 -> 75.
    schedule = NumerousSchedule(total_steps=6, levels=75, start_level=0, warmup_steps=3, gap=10)
    assert [schedule.student_level(t) for t in range(6)] == [0, 25, 50, 75, 75, 75]
    assert [level for level, _ in schedule.snapshots] == [0, 25, 50]
    assert [schedule.teacher_level(t) for t in range(6)] == [None, 0, 25, 50, 25, None]


def test_numerous_teacher_snapshots_follow_the_student(tiny):
    model, _ = tiny
    unpruned = copy.deepcopy(model)
    students, adapter, masks = adapted_student(model, steps=5)
    teacher = NumerousTeacher(snapshot_every=0.1, teacher_gap=0.2, warmup=0.5)
    teacher.bind(model, students, adapter, 0.5)
    teacher.begin(10)
    batch = ids()
    b_values = []
    for step in range(10):
        teacher.before_step(step)
        assert students.level == teacher.schedule.student_level(step)
        out = teacher.teacher_outputs(model, batch, None).logits()
        level = teacher.schedule.teacher_level(step)
        if level is None:
            with torch.no_grad():
                torch.testing.assert_close(out, unpruned(input_ids=batch).logits, rtol=0, atol=0)
        else:
            # The snapshot holds the adapter as it was when the student left that mask step.
            snap_b = teacher._snapshots[level]["model.layers.0.self_attn.q_proj.b"]
            assert torch.all(snap_b == b_values[level]).item()
        # "Train": give every b a value that identifies this step.
        with torch.no_grad():
            for key, t in adapter.state(model).items():
                if key.endswith(".b"):
                    t.fill_(float(step + 1))
        b_values.append(float(step + 1))
    report = teacher.report()
    # One segment per (student, teacher) pair: the student climbs one mask step per step, then stays.
    assert [seg["steps"] for seg in report["schedule"]] == [[t, t] for t in range(10)]
    assert [seg["teacher_level"] for seg in report["schedule"]] == [None, None, 0, 1, 2, 3, 2, 1, 0, None]
    assert [seg["student_level"] for seg in report["schedule"]] == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    assert report["schedule"][5]["teacher_sparsity"] == pytest.approx(0.3, abs=0.01)
    teacher.finish()
    assert students.level == 5
    for name, keep in students.keeps().items():
        assert torch.equal(keep, masks[name])


def test_numerous_teacher_fails_when_no_snapshot_would_teach(tiny):
    model, _ = tiny
    students, adapter, _ = adapted_student(model, steps=5)
    teacher = NumerousTeacher(snapshot_every=0.1, teacher_gap=0.2, warmup=0.5)
    teacher.bind(model, students, adapter, 0.5)
    with pytest.raises(RunError, match=r"^teacher=numerous: no snapshot would teach in 2 tuning steps"):
        teacher.begin(2)  # mask step 0, then the target: nothing 2 steps behind before the walk back
    teacher.begin(10)
    assert teacher.schedule.last_use()


# --------------------------------------------------------------------------- config checks and runs
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["teacher=dense", "pruner=sparsegpt"], "teacher"),
        (["teacher=numerous", "pruner=none"], "teacher"),
        (["teacher=dense", "adapter=none"], "teacher"),
        (["teacher=numerous", "teacher.snapshot_every=0.001", "sparsity=0.5"], "teacher.snapshot_every"),
        (["teacher=numerous", "teacher.start=0.8", "sparsity=0.5"], "teacher.start"),
        (["teacher=dense", "teacher.temperature=0"], "teacher.temperature"),
        (["teacher=dense", "teacher.kl_weight=-1"], "teacher.kl_weight"),
    ],
)
def test_teacher_config_errors_name_the_key(tmp_path, text_file, overrides, key):
    cfg = compose_config(tiny_run_overrides(text_file, **dict(o.split("=", 1) for o in overrides)), tmp_path)
    with pytest.raises(ConfigError) as err:
        plan(cfg)
    assert err.value.key == key


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["spp", "masked_lora"])
def test_numerous_run_keeps_every_zero_and_records_its_teachers(tmp_path, text_file, adapter):
    cfg = compose_config(
        tiny_run_overrides(text_file, teacher="numerous", adapter=adapter, sparsity=0.5), tmp_path
    )
    results = run(cfg, progress=False)
    assert results["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-9)
    assert results["sparsity"]["zeros_verified"] > 0
    schedule = results["teacher"]["schedule"]
    assert schedule[0]["steps"][0] == 0 and schedule[-1]["steps"][1] == results["tune"]["steps"] - 1
    assert schedule[0]["student_sparsity"] == 0.0 and schedule[-1]["student_sparsity"] == pytest.approx(0.5)
    assert {seg["teacher"] for seg in schedule} == {"intact", "snapshot"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["teacher"]["strategy"] == "numerous"
    assert f"{results['teacher']['snapshots_used']} snapshots taught" in summary_table(results).caption
    assert (
        results["teacher"]["snapshot_stages"]
        == sum(1 for seg in schedule if seg["teacher"] == "snapshot")
        >= 1
    )


@pytest.mark.slow
def test_dense_teacher_run_keeps_every_zero(tmp_path, text_file):
    cfg = compose_config(tiny_run_overrides(text_file, teacher="dense", sparsity=0.6), tmp_path)
    results = run(cfg, progress=False)
    assert results["sparsity"]["measured"] == pytest.approx(0.6, abs=1e-3)  # floor(numel * 0.6) each
    assert results["sparsity"]["zeros_verified"] > 0
    assert results["tune"]["steps"] == 6 and results["tune"]["peak_rss_mib"] > 0


def test_chunked_kl_matches_autograd_in_value_and_gradient():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(3, 5, 17, generator=gen, requires_grad=True)
    t = torch.randn(3, 5, 17, generator=gen)
    T = 0.67
    s_ref = s.detach().clone().requires_grad_(True)
    reference = (
        F.kl_div(
            torch.log_softmax(s_ref.reshape(-1, 17) / T, -1),
            torch.log_softmax(t.reshape(-1, 17) / T, -1),
            log_target=True,
            reduction="sum",
        )
        * T**2
        / 15
    )
    loss = logit_kl(s, t, T, chunk_rows=4)  # 15 rows in chunks of 4
    torch.testing.assert_close(loss, reference)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(s.grad, s_ref.grad)
    # The teacher given as a last hidden state and an output head: the same loss, chunk by chunk.
    head = nn.Linear(6, 17, bias=False)
    hidden = torch.randn(3, 5, 6, generator=gen)
    with torch.no_grad():
        from_logits = logit_kl(s, head(hidden), T)
    torch.testing.assert_close(
        logit_kl(s, None, T, teacher_hidden=hidden, head=head, chunk_rows=4), from_logits
    )
