"""Fine-tuning of an approximated model (lowrank_fm.finetune): structure kept, losses measured against an
independent computation, labels and label-free modes on a deliberately damaged vgg-digits approximation,
determinism, and the command line's --finetune-epochs (record, report, saved model)."""

import json
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

import lowrank_fm
from lowrank_fm import approximate
from lowrank_fm.cli import main
from lowrank_fm.cost import measure_costs
from lowrank_fm.finetune import finetune, outlier_weights
from lowrank_fm.zoo.evaluate import accuracy
from lowrank_fm.zoo.models import load_bundled_approximated as load_approximated


@pytest.fixture(scope="module")
def damaged(digits, vgg_digits):
    """vgg-digits approximated far too hard (fm-linear at energy 0.5, every layer factorized): (model, report)."""
    loader = DataLoader(Subset(digits.train, range(256)), batch_size=64)
    return approximate(vgg_digits, loader, method="fm-linear", energy=0.5, speed_gate=False, progress=False)


def top1(model, dataset):
    return accuracy(model, dataset, progress=False)["top1"]


def logits(model, images):
    with torch.no_grad():
        return model(images)


def held_out_divergence(student, teacher, loss):
    if loss == "mse":
        return float((student - teacher).pow(2).sum(1).mean())
    p, q = torch.softmax(teacher.double() / 4, 1), torch.softmax(student.double() / 4, 1)
    return float((p * (p.log() - q.log())).sum(1).mean())


def test_exported_from_package():
    assert lowrank_fm.finetune is finetune and "finetune" in lowrank_fm.__all__


def test_structure_and_macs_unchanged(damaged, digits):
    model, report = damaged
    tuned, record = finetune(model, digits.train, epochs=1, lr=1e-3, progress=False)
    before = {name: tuple(p.shape) for name, p in model.named_parameters()}
    after = {name: tuple(p.shape) for name, p in tuned.named_parameters()}
    assert after == before
    assert [type(m).__name__ for m in tuned.modules()] == [type(m).__name__ for m in model.modules()]
    example = digits.test[0][0][None]
    costs = measure_costs(tuned, example)
    assert sum(c.macs for c in costs.values()) == report.totals["macs_after"]
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    # the weights did move, and the input model was left as it was
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), tuned.state_dict().values()))
    assert not tuned.training


def test_loss_decreases_on_a_fixed_batch(damaged, digits):
    model, _ = damaged
    images, labels = digits.train.tensors[0][:64], digits.train.tensors[1][:64]
    batch = TensorDataset(images, labels)
    tuned, record = finetune(model, batch, epochs=5, lr=1e-3, batch_size=64, progress=False)
    # one batch per epoch: the first epoch's loss is the untouched model's cross-entropy on that batch
    assert record["loss"][0] == pytest.approx(float(F.cross_entropy(logits(model, images), labels)), rel=1e-5)
    assert record["steps"] == 5 and record["images"] == 64
    assert all(b < a for a, b in zip(record["loss"], record["loss"][1:]))
    assert float(F.cross_entropy(logits(tuned, images), labels)) < record["loss"][-1]


def test_labels_mode_repairs_a_damaged_approximation(damaged, digits, vgg_digits):
    model, _ = damaged
    original, approximated = top1(vgg_digits, digits.test), top1(model, digits.test)
    assert approximated < original - 0.3  # the damage is real
    seen = []

    def evaluate(student):
        seen.append(student.training)
        return accuracy(student, digits.test, progress=False)

    tuned, record = finetune(model, digits.train, epochs=3, lr=3e-3, evaluate=evaluate, progress=False)
    assert record["top1"][-1] == top1(tuned, digits.test)  # the record's accuracy is the model's
    assert seen == [False] * 3 and record["eval_images"] == len(digits.test)  # once per epoch, in eval mode
    assert record["top1"][-1] > approximated + 0.2
    assert len(record["top1"]) == len(record["loss"]) == 3
    assert record["mode"] == "labels" and record["objective"] == "cross-entropy" and record["seconds"] > 0


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_distill_learns_the_teacher_without_labels(damaged, digits, vgg_digits, loss):
    model, _ = damaged
    images = digits.train.tensors[0]
    wrong = TensorDataset(images, torch.zeros(len(images), dtype=torch.int64))  # every label wrong or zero
    tuned, record = finetune(model, wrong, epochs=3, mode="distill", teacher=vgg_digits, lr=3e-3,
                             distill_loss=loss, progress=False)
    held_out = digits.test.tensors[0]
    target = logits(vgg_digits, held_out)
    # held-out distance to the teacher in the objective's own terms: logit MSE, or the softened KL (T = 4)
    assert held_out_divergence(logits(tuned, held_out), target, loss) < 0.8 * held_out_divergence(
        logits(model, held_out), target, loss)
    assert top1(tuned, digits.test) > top1(model, digits.test) + 0.1
    # the labels were not used: the same images without labels give the same weights
    unlabelled, _ = finetune(model, DataLoader(images, batch_size=64, shuffle=True,
                                               generator=torch.Generator().manual_seed(0)),
                             epochs=3, mode="distill", teacher=vgg_digits, lr=3e-3, distill_loss=loss, progress=False)
    for a, b in zip(tuned.state_dict().values(), unlabelled.state_dict().values()):
        assert torch.equal(a, b)
    assert vgg_digits.training is False  # the teacher's mode is restored
    assert record["objective"] == loss and (record["temperature"] is None) == (loss == "mse")


def test_distill_mse_first_loss_is_the_logit_mse(damaged, digits, vgg_digits):
    model, _ = damaged
    images = digits.train.tensors[0][:32]
    _, record = finetune(model, TensorDataset(images), epochs=1, mode="distill", teacher=vgg_digits,
                         batch_size=32, progress=False)
    expected = (logits(model, images) - logits(vgg_digits, images)).pow(2).sum(1).mean()
    assert record["loss"][0] == pytest.approx(float(expected), rel=1e-5)


def test_distill_mse_caps_an_image_with_exploding_logits(damaged, digits, vgg_digits):
    """One image scaled up 300 times gets teacher logits far beyond 100x the batch's median energy; the first
    loss is the logit MSE with that image's squared error scaled by 100 * median / its energy (computed here
    with numpy), and every other image's error counts in full."""
    model, _ = damaged
    images = digits.train.tensors[0][:32].clone()
    images[5] *= 300.0
    _, record = finetune(model, TensorDataset(images), epochs=1, mode="distill", teacher=vgg_digits,
                         batch_size=32, progress=False)
    teacher = logits(vgg_digits, images).double().numpy()
    errors = ((logits(model, images).double().numpy() - teacher) ** 2).sum(1)
    energy = (teacher**2).sum(1)
    cap = 100 * np.sort(energy)[(32 - 1) // 2]  # the median's lower middle value, as torch.median takes it
    assert energy[5] > 10 * cap and (np.delete(energy, 5) < cap).all()  # exactly one outlier, far out
    weights = np.ones(32)
    weights[5] = cap / energy[5]
    expected = float((errors * weights).mean())
    assert record["loss"][0] == pytest.approx(expected, rel=1e-4)
    assert record["loss"][0] < 0.2 * errors.mean()  # unweighted, the outlier would dominate the batch


def test_outlier_weights_are_exactly_one_within_the_cap():
    generator = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(64, 10, generator=generator)
    assert torch.equal(outlier_weights(teacher), torch.ones(64))
    teacher[7] *= 50  # energy 2500x a typical image's
    weights = outlier_weights(teacher)
    energy = teacher.pow(2).sum(1)
    median = float(np.sort(energy.numpy())[(64 - 1) // 2])  # the lower middle value, as torch.median takes it
    assert weights[7].item() == pytest.approx(100 * median / energy[7].item(), rel=1e-6)
    assert torch.equal(torch.cat([weights[:7], weights[8:]]), torch.ones(63))
    assert torch.equal(outlier_weights(torch.zeros(8, 3)), torch.ones(8))  # no scale: nothing capped


def test_one_batch_of_huge_loss_is_not_divergence():
    """Batch 30 of 80 holds images scaled up 1000 times with their labels flipped: its cross-entropy is
    thousands of times the others'. The mean of the last 20 steps' losses then exceeds 4 times the start's
    (checked here), but their median does not move: no restart, and the model still learns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = _separable().tensors
    batches = [(x[i:i + 8].clone(), y[i:i + 8].clone()) for i in range(0, 640, 8)]
    batches[30] = (1000 * batches[30][0], 1 - batches[30][1])
    tuned, record = finetune(model, batches, epochs=1, lr=3e-3, progress=False)
    assert record["restarts"] == [] and record["steps"] == 80
    with torch.no_grad():
        start = [F.cross_entropy(model(images), labels).item() for images, labels in batches[:20]]
        outlier = F.cross_entropy(model(batches[30][0]), batches[30][1]).item()
    assert outlier / 20 > 4 * sum(start) / 20  # a mean over the window would have called this divergence
    clean = torch.cat([b[0] for i, b in enumerate(batches) if i != 30]), torch.cat(
        [b[1] for i, b in enumerate(batches) if i != 30])
    assert F.cross_entropy(tuned(clean[0]), clean[1]) < F.cross_entropy(model(clean[0]), clean[1])


def test_kl_loss_against_its_definition(damaged, digits, vgg_digits):
    model, _ = damaged
    images = digits.train.tensors[0][:32]
    _, record = finetune(model, TensorDataset(images), epochs=1, mode="distill", teacher=vgg_digits,
                         distill_loss="kl", temperature=3.0, batch_size=32, progress=False)
    p = torch.softmax(logits(vgg_digits, images).double() / 3, 1)
    q = torch.softmax(logits(model, images).double() / 3, 1)
    expected = 9 * (p * (p.log() - q.log())).sum(1).mean()
    assert record["loss"][0] == pytest.approx(float(expected), rel=1e-4)


def test_deterministic(damaged, digits):
    model, _ = damaged
    runs = [finetune(model, digits.train, epochs=1, lr=1e-3, seed=3, progress=False) for _ in range(2)]
    for a, b in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
        assert torch.equal(a, b)
    assert runs[0][1]["loss"] == runs[1][1]["loss"]
    other, _ = finetune(model, digits.train, epochs=1, lr=1e-3, seed=4, progress=False)  # the seed is used
    assert any(not torch.equal(a, b) for a, b in zip(runs[0][0].state_dict().values(), other.state_dict().values()))


def test_synthetic_model_and_tensor_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    images = torch.randn(40, 2, 5, 5)
    labels = torch.randint(0, 3, (40,))
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 40, 8)]  # an iterable of batches, used in order
    tuned, record = finetune(model, batches, epochs=20, lr=1e-1, progress=False)
    assert record["steps"] == 100 and record["batch_size"] is None and record["schedule"] == "cosine"
    assert record["loss"][-1] < 0.5 * record["loss"][0]
    assert float(F.cross_entropy(logits(tuned, images), labels)) < float(F.cross_entropy(logits(model, images), labels))


class Stream(IterableDataset):
    """(image, label) items in a fixed order, without a length."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __iter__(self):
        return iter(zip(self.images, self.labels))


def test_iterable_dataset_is_batched_in_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    images, labels = torch.randn(40, 1, 2, 3), torch.randint(0, 3, (40,))
    tuned, record = finetune(model, Stream(images, labels), epochs=2, batch_size=8, lr=1e-1, progress=False)
    assert record["steps"] == 10 and record["images"] == 40 and record["schedule"] == "constant"
    # the same batches given as a list: the same weights (a list has a length: cosine schedule, so compare
    # against an independent Adam run at a constant rate instead: 0.1 times each tensor's RMS)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam([{"params": [p], "lr": 0.1 * float(torch.sqrt(torch.mean(p.detach() ** 2)))}
                                  for p in reference.parameters()])
    for _ in range(2):
        for i in range(0, 40, 8):
            loss = F.cross_entropy(reference(images[i:i + 8]), labels[i:i + 8])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for a, b in zip(tuned.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(epochs=1, mode="soft"), "mode must be one of"),
    (dict(epochs=1, mode="distill"), "needs teacher="),
    (dict(epochs=1, lr=0.0), "lr must be a finite number > 0"),
    (dict(epochs=1, batch_size=0), "batch_size must be an integer >= 1"),
    (dict(epochs=1, mode="distill", teacher=nn.Identity(), distill_loss="l1"), "distill_loss must be one of"),
])
def test_bad_arguments(kwargs, match):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        finetune(model, TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64)), progress=False, **kwargs)


def test_evaluate_must_return_top1():
    data = TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="evaluate must return a mapping with 'top1'"):
        finetune(nn.Linear(3, 2), data, epochs=1, evaluate=lambda model: 0.5, progress=False)
    _, record = finetune(nn.Linear(3, 2), data, epochs=2, evaluate=lambda model: {"top1": 0.25}, progress=False)
    assert record["top1"] == [0.25, 0.25] and record["top5"] == [None, None] and "eval_images" not in record


def test_labels_mode_without_labels_raises():
    with pytest.raises(ValueError, match="no labels: pass mode='distill'"):
        finetune(nn.Linear(3, 2), TensorDataset(torch.randn(4, 3)), epochs=1, progress=False)


def test_diverging_loss_raises():
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(FloatingPointError, match="smaller lr"):  # NaN at every rate: two restarts, then the error
        finetune(model, data, epochs=1, progress=False)


def _separable(n=640, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_a_diverging_rate_starts_again_from_the_model_at_a_tenth():
    """Adam at 100 times each tensor's RMS blows a small MLP's loss up; the guard restarts from the untouched
    model at lr 10, then 1 if needed, and the result is exactly a plain run at the rate that finished (same
    shuffling)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _separable()
    tuned, record = finetune(model, data, epochs=1, lr=100.0, batch_size=8, progress=False)
    assert record["restarts"] and record["restarts"][0]["lr"] == 100.0
    assert record["lr"] == pytest.approx(100.0 / 10 ** len(record["restarts"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model untouched
    plain, plain_record = finetune(model, data, epochs=1, lr=record["lr"], batch_size=8, progress=False)
    assert plain_record["restarts"] == [] and plain_record["steps"] == record["steps"] == 80
    for (name, got), want in zip(tuned.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(got, want), name
    x, y = data.tensors
    assert F.cross_entropy(tuned(x), y) < F.cross_entropy(model(x), y)  # and it did learn


def _near_teacher(scale=1e-5):
    """A small MLP and a copy of it with weights moved by ``scale``: a distillation that starts at the teacher."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    student = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    student.load_state_dict({k: v + scale * torch.randn_like(v) for k, v in teacher.state_dict().items()})
    return teacher, student


def test_distilling_from_almost_the_teacher_is_not_divergence():
    """A student within 1e-5 of the teacher starts with a distillation loss near 0, and Adam's first steps
    (each weight moves by about the rate, whatever its gradient) raise it many times over: the guard's scale
    is then 1% of the teacher's mean squared logits (a zero student's loss, computed here independently), so
    that drift is no divergence; it stays far below the teacher's logit energy, and the final check, with the
    same floor as its tolerance, returns the trained model."""
    teacher, student = _near_teacher()
    data = _separable()
    x = data.tensors[0]
    energy = float(logits(teacher, x).pow(2).sum(1).mean())
    start = float((logits(student, x) - logits(teacher, x)).pow(2).sum(1).mean())
    tuned, record = finetune(student, data, epochs=1, mode="distill", teacher=teacher, lr=3e-4, batch_size=8,
                             progress=False)
    assert record["restarts"] == [] and record["steps"] == 80
    drift = record["final_check"]["trained_median"]  # the trained model's loss on the last 20 batches
    assert drift > 4 * start  # the old scale, the start's loss alone, would have called this divergence
    assert drift < 0.04 * energy
    # the final check: worse than the start, but within 1% of the teacher's energy, so the trained model returns
    check = record["final_check"]
    assert check["start_median"] < drift < check["start_median"] + check["tolerance"]
    assert check["tolerance"] == pytest.approx(0.01 * energy, rel=0.3) and not record["kept_start"]
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), student.state_dict().values()))


def test_a_distillation_that_blows_up_near_the_teacher_is_still_divergence():
    """Adam at 30 times each tensor's RMS (then 3, 0.3) takes the student's logits far beyond the floor: still
    divergence."""
    teacher, student = _near_teacher()
    with pytest.raises(FloatingPointError, match=r"floored at .*after 2 restarts"):
        finetune(student, _separable(), epochs=1, mode="distill", teacher=teacher, lr=30.0, batch_size=8,
                 progress=False)


def test_every_tensor_steps_by_the_rate_times_its_rms():
    """Adam's first step moves each element by its group's rate in the sign of -gradient (m/sqrt(v) = g/|g|),
    so one step shows each tensor's rate: lr * max(RMS(p), 1e-3), computed here from the weights. A tensor
    scaled by 100 steps 100 times further; a zero bias steps at the floor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.mul_(100.0)
        model[2].bias.zero_()
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    tuned, record = finetune(model, [(x, y)], epochs=1, lr=1e-2, progress=False)
    assert record["steps"] == 1
    for (name, p), g, q in zip(model.named_parameters(), grads, tuned.parameters()):
        rate = 1e-2 * max(float(torch.sqrt(torch.mean(p.detach() ** 2))), 1e-3)
        moved = g.abs() > 1e-6  # elements whose gradient dwarfs Adam's eps (1e-8)
        assert moved.any(), name
        torch.testing.assert_close((q - p).detach()[moved], -rate * g.sign()[moved], rtol=1e-3, atol=0)
        assert torch.equal(q.detach()[g == 0], p.detach()[g == 0]), name


def test_a_fine_tune_that_lowers_the_loss_returns_the_trained_model(damaged, digits):
    """The final check compares both models' losses on the last 20 batches, recomputed here independently from
    the same batches (a list of batches, used in its order): the trained model is returned when its median is
    lower."""
    model, _ = damaged
    batches = list(DataLoader(digits.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)))
    tuned, record = finetune(model, batches, epochs=1, lr=1e-2, progress=False)
    last = batches[-20:]
    with torch.no_grad():
        start = sorted(float(F.cross_entropy(model(x), y)) for x, y in last)
    assert record["final_check"]["batches"] == 20
    assert record["final_check"]["start_median"] == pytest.approx((start[9] + start[10]) / 2, rel=1e-5)
    assert record["final_check"]["trained_median"] < record["final_check"]["start_median"]
    assert not record["kept_start"]
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), model.state_dict().values()))


def test_a_fine_tune_that_raises_the_loss_returns_the_start():
    """Labels independent of the images and a model at zero logits (loss log 2, the best it can do on unseen
    images): steps of 0.1 (lr 100 times the floor scale 1e-3) only fit noise, so the losses of the last batches,
    each measured before its step, end above the start's; the start comes back unchanged, and top1_returned is
    evaluated on it."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(640, 8, generator=generator)
    y = torch.randint(0, 2, (640,), generator=generator)
    model = nn.Sequential(nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    evaluate = lambda m: {"top1": float((m(x).argmax(1) == y).float().mean())}  # noqa: E731
    tuned, record = finetune(model, TensorDataset(x, y), epochs=1, lr=100.0, batch_size=8, evaluate=evaluate,
                             progress=False)
    assert record["restarts"] == []
    assert record["final_check"]["start_median"] == pytest.approx(math.log(2))
    assert record["final_check"]["trained_median"] > record["final_check"]["start_median"]
    assert record["final_check"]["tolerance"] == pytest.approx(0.01 * math.log(2))  # 1% of a blank model's loss
    assert record["final_check"]["trained_median"] > math.log(2) + record["final_check"]["tolerance"]
    assert record["kept_start"] and record["top1_returned"] == evaluate(model)["top1"]
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), model.state_dict().values()))
    # a caller that has scored the start already (the CLI, the benchmark) is not asked to score it again
    calls = []
    counting = lambda m: calls.append(1) or evaluate(m)  # noqa: E731
    _, given = finetune(model, TensorDataset(x, y), epochs=1, lr=100.0, batch_size=8, evaluate=counting,
                        start_top1=0.123, progress=False)
    assert given["kept_start"] and given["top1_returned"] == 0.123 and len(calls) == 1  # the epoch's only


def test_a_steady_fine_tune_never_restarts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    _, record = finetune(model, _separable(), epochs=2, lr=3e-3, batch_size=8, progress=False)
    assert record["restarts"] == [] and record["lr"] == 3e-3 and record["steps"] == 160


def test_cli_finetune_record_and_reload(tmp_path, digits, capsys):
    common = ["vgg-digits", "--method", "fm-linear", "--energy", "0.5", "--no-speed-gate", "--quiet", "--threads", "1"]
    plain, tuned_out = tmp_path / "plain", tmp_path / "tuned"
    assert main(common + ["--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(common + ["--out", str(tuned_out), "--finetune-epochs", "1"]) == 0
    table = capsys.readouterr().out
    report = json.loads((tuned_out / "report.json").read_text())
    acc = report["accuracy"]
    assert (f"accuracy: top-1 {acc['top1_before']:.4f} -> {acc['top1_approximated']:.4f} approximated -> "
            f"{acc['top1_after']:.4f}") in table
    assert f"fine-tuning: labels (cross-entropy), 1 epoch on {len(digits.train)} images" in table
    plain_report = json.loads((plain / "report.json").read_text())
    assert plain_report["finetune"] is None and "top1_approximated" not in plain_report["accuracy"]
    ft = report["finetune"]
    assert ft["mode"] == "labels" and ft["epochs"] == 1 and len(ft["top1"]) == 1
    assert ft["record"]["images"] == len(digits.train) and len(ft["record"]["loss"]) == 1
    assert report["timing"]["finetune_s"] == ft["record"]["seconds"] > 0
    assert acc["top1_approximated"] == plain_report["accuracy"]["top1_after"]
    assert acc["top1_after"] == ft["top1"][-1]
    assert report["totals"] == plain_report["totals"]  # same ranks and MACs
    # the saved model is the fine-tuned one: it reloads to the model that finetune() makes from the plain run's
    reloaded = load_approximated(tuned_out)
    assert top1(reloaded, digits.test) == acc["top1_after"]
    expected, _ = finetune(load_approximated(plain), digits.train, epochs=1, progress=False)
    images = digits.test.tensors[0]
    assert torch.equal(logits(reloaded, images), logits(expected, images))
    assert not torch.equal(logits(reloaded, images), logits(load_approximated(plain), images))


def test_cli_distill_and_flag_errors(tmp_path, capsys):
    out = tmp_path / "distill"
    code = main(["vgg-digits", "--method", "fm-linear", "--energy", "0.5", "--no-speed-gate", "--quiet",
                 "--threads", "1", "--out", str(out), "--finetune-epochs", "1", "--finetune", "distill"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["mode"] == "distill" and report["finetune"]["record"]["objective"] == "mse"
    for bad in (["--finetune-epochs", "-1"], ["--finetune", "soft"]):
        with pytest.raises(SystemExit) as exc:
            main(["vgg-digits", "--quiet"] + bad)
        assert exc.value.code == 2
        assert "--finetune" in capsys.readouterr().err
