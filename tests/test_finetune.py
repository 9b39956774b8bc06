"""Fine-tuning with knowledge distillation: it recovers damaged students, leaves the teacher alone,
repeats exactly, reads every batch format, and says what went wrong in words a user can act on."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressc.errors import UserError
from compressc.pass_context import PassContext, ProgressBars
from compressc.finetune import FinetuneConfig, distillation_loss, finetune, split_batch


# -- data and models -----------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and two spin-waiting threads per pytest worker
    slow a busy 2-core machine down by 50x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """sklearn digits (flattened, 0..1), a fixed 1200 / 597 split, and an MLP teacher trained briefly."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    xtr, ytr, xte, yte = x[perm[:1200]], y[perm[:1200]], x[perm[1200:]], y[perm[1200:]]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(teacher.parameters(), 1e-2)
        for _ in range(120):
            opt.zero_grad()
            F.cross_entropy(teacher(xtr), ytr).backward()
            opt.step()
    return xtr, ytr, xte, yte, teacher.eval()


def accuracy_on(x, y):
    @torch.no_grad()
    def evaluate(model):
        return (model(x).argmax(1) == y).float().mean().item()

    return evaluate


def damaged(teacher, noise=1.0, seed=1):
    """The teacher with Gaussian noise (``noise`` x each tensor's std) on every weight: a stand-in for
    a lossy lowering."""
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return student


def loader(x, y=None, batch_size=64):
    return DataLoader(TensorDataset(x) if y is None else TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def tiny_data(n=4, labeled=True):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) if labeled
            else torch.randn(8, 4, generator=g) for _ in range(n)]


def pair():
    torch.manual_seed(0)
    return nn.Linear(4, 3), nn.Linear(4, 3)


class Counting:
    """An iterable of batches that counts how many were drawn."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


# -- it works ------------------------------------------------------------------------------------
def test_distillation_recovers_a_damaged_student(digits):
    xtr, ytr, xte, yte, teacher = digits
    evaluate = accuracy_on(xte, yte)
    student = damaged(teacher)
    before = evaluate(student)
    config = FinetuneConfig(epochs=2, lr=3e-3, optimizer="adam", schedule="constant", warmup=0.0)
    report = finetune(student, teacher, loader(xtr, ytr), config, evaluate=evaluate)
    after = evaluate(student)
    assert report.accuracy_before == before
    assert after == report.best_accuracy  # the student ends with the weights of the best score
    assert after >= before + 0.2, (before, after)  # measured: 0.52 -> 0.95
    assert after >= evaluate(teacher) - 0.03
    assert len(report.losses) == len(report.accuracies) == 2 and report.batches == (19, 19)
    assert report.losses[1] < report.losses[0]


def test_quantization_aware_student_trains_through_a_parametrization(digits):
    """A straight-through rounding of each weight to 3 levels, as fake-quant lowering produces."""
    xtr, ytr, xte, yte, teacher = digits
    evaluate = accuracy_on(xte, yte)

    class RoundSTE(nn.Module):
        def __init__(self, step):
            super().__init__()
            self.step = step

        def forward(self, w):
            return w + ((w / self.step).round() * self.step - w).detach()

    student = copy.deepcopy(teacher)
    for m in student:
        if isinstance(m, nn.Linear):
            parametrize.register_parametrization(m, "weight", RoundSTE(m.weight.abs().max().item() / 2))
    originals = [m.parametrizations.weight.original for m in student if isinstance(m, nn.Linear)]
    start = [o.detach().clone() for o in originals]
    before = evaluate(student)
    report = finetune(student, teacher, loader(xtr, ytr), FinetuneConfig(epochs=2, lr=3e-3, optimizer="adam"), evaluate=evaluate)
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in originals)  # gradients got through
    assert not all(torch.equal(o, s) for o, s in zip(originals, start))
    assert parametrize.is_parametrized(student[0], "weight")
    assert report.best_accuracy == evaluate(student) > before


def test_pure_distillation_needs_no_labels(digits):
    xtr, _, xte, yte, teacher = digits
    evaluate = accuracy_on(xte, yte)
    student = damaged(teacher)
    before = evaluate(student)
    finetune(student, teacher, loader(xtr), FinetuneConfig(epochs=2, lr=3e-3, optimizer="adam", distill_weight=1.0))
    assert evaluate(student) >= before + 0.2  # measured: 0.52 -> 0.95


def test_plain_fine_tuning_without_labels_is_an_error():
    student, teacher = pair()
    with pytest.raises(UserError, match="needs targets"):
        finetune(student, teacher, tiny_data(labeled=False), FinetuneConfig(epochs=1, distill_weight=0))


def test_teacher_is_bit_identical_after():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    teacher[0].bias.requires_grad_(False)
    student = copy.deepcopy(teacher)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [(p.requires_grad, p.grad) for p in teacher.parameters()]
    finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=2, lr=1e-1))
    assert teacher.training and all(m.training for m in teacher.modules())  # its mode is restored
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())  # BN statistics included
    assert [(p.requires_grad, p.grad) for p in teacher.parameters()] == flags
    assert not torch.equal(student[3].weight, teacher[3].weight)


def test_same_seed_same_weights_and_the_callers_random_state_is_left_alone(digits):
    xtr, ytr, _, _, teacher = digits
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))

    def run(seed):
        student = copy.deepcopy(net)
        finetune(student, teacher, loader(xtr, ytr), FinetuneConfig(epochs=1, seed=seed))
        return student.state_dict()

    rng = torch.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_best_epoch_is_kept():
    def scripted(*scores):
        """An evaluate returning ``scores`` in turn (before training, after epoch 1, ...); it keeps
        the weights it saw in ``.seen``."""
        it = iter(scores)

        def evaluate(model):
            evaluate.seen.append({k: v.clone() for k, v in model.state_dict().items()})
            return next(it)

        evaluate.seen = []
        return evaluate

    config = FinetuneConfig(epochs=3, lr=0.1)
    student, teacher = pair()
    report = finetune(student, teacher, tiny_data(), config, evaluate=scripted(0.5, 0.9, 0.2, 0.9))
    assert report.accuracies == (0.9, 0.2, 0.9) and report.accuracy_before == 0.5
    assert report.best_epoch == 3 and report.best_accuracy == 0.9  # ties go to the later epoch

    student, teacher = pair()
    evaluate = scripted(0.5, 0.9, 0.2, 0.1)
    report = finetune(student, teacher, tiny_data(), config, evaluate=evaluate)
    assert report.best_epoch == 1 and report.best_accuracy == 0.9
    assert all(torch.equal(v, evaluate.seen[1][k]) for k, v in student.state_dict().items())

    student, teacher = pair()
    evaluate = scripted(0.8, 0.1, 0.7, 0.3)
    report = finetune(student, teacher, tiny_data(), config, evaluate=evaluate)
    assert report.best_epoch == 0 and report.best_accuracy == 0.8  # nothing beat the weights it came with
    assert all(torch.equal(v, evaluate.seen[0][k]) for k, v in student.state_dict().items())


def test_modes_are_restored_and_zero_epochs_is_a_no_op():
    student, teacher = pair()
    student.eval()
    start = copy.deepcopy(student.state_dict())
    report = finetune(student, teacher, Counting(tiny_data()), FinetuneConfig(epochs=0),
                      evaluate=lambda m: pytest.fail("not called"))
    assert report.losses == () and report.best_epoch == 0 and report.accuracies is None
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())
    finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=1))
    assert not student.training and teacher.training


def test_batches_per_epoch_caps_the_batches_drawn():
    student, teacher = pair()
    data = Counting(tiny_data(10))
    report = finetune(student, teacher, data, FinetuneConfig(epochs=2, batches_per_epoch=3))
    assert data.drawn == 6 and report.batches == (3, 3)
    data = Counting(tiny_data(2))
    report = finetune(student, teacher, data, FinetuneConfig(epochs=2, batches_per_epoch=3))
    assert data.drawn == 4 and report.batches == (2, 2)


def test_an_endless_stream_with_a_cap_continues_across_epochs():
    student, teacher = pair()

    def stream():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(8, 4, generator=g)

    report = finetune(student, teacher, stream(), FinetuneConfig(epochs=3, batches_per_epoch=2))
    assert report.batches == (2, 2, 2)


# -- batch formats -------------------------------------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_every_batch_format_trains():
    g = torch.Generator().manual_seed(0)
    x, z, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
    for batch in ([x, y], (x, y), (x,), x, {"input": x, "label": y}, {"inputs": x, "targets": y}, {"inputs": (x,)}):
        student, teacher = pair()
        report = finetune(student, teacher, [batch], FinetuneConfig(epochs=1))
        assert report.batches == (1,), batch
    torch.manual_seed(0)
    teacher = TwoInputs()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.b.weight.add_(1.0)
    finetune(student, teacher, [((x, z), y), [[x, z], y]], FinetuneConfig(epochs=1))
    assert not torch.equal(student.b.weight, teacher.b.weight + 1.0)


def test_split_batch():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert split_batch((x, y)) == ((x,), y)
    assert split_batch({"labels": y, "input": x}) == ((x,), y)
    assert split_batch(((x, x), y))[0] == (x, x)


@pytest.mark.parametrize("batch, says", [
    ((torch.zeros(2, 4), torch.zeros(2), torch.zeros(2)), "a tuple of 3 items (Tensor, Tensor, Tensor)"),
    ("not a batch", "yielded a str"),
    ({"x": torch.zeros(2, 4)}, "a dict with keys ['x']"),
    ({"input": torch.zeros(2, 4), "target": 1, "label": 2}, "at most one target key"),
    (("text", torch.zeros(2)), "inputs must be a tensor or a tuple of tensors, not str"),
    ((), "a tuple of 0 items"),
])
def test_an_unsupported_batch_says_what_it_received(batch, says):
    student, teacher = pair()
    with pytest.raises(UserError, match="train_loader yielded") as err:
        finetune(student, teacher, [batch], FinetuneConfig(epochs=1))
    assert says in str(err.value) and "hint: yield (inputs, targets)" in str(err.value)


# -- errors --------------------------------------------------------------------------------------
def test_an_empty_loader_is_an_error():
    student, teacher = pair()
    with pytest.raises(UserError, match="train_loader yielded no batches"):
        finetune(student, teacher, [], FinetuneConfig(epochs=1))


def test_a_one_shot_iterator_is_caught_in_epoch_two():
    student, teacher = pair()
    with pytest.raises(UserError, match=r"no batches in epoch 2 \(it yielded 4 in epoch 1\)") as err:
        finetune(student, teacher, iter(tiny_data()), FinetuneConfig(epochs=2))
    assert "one-shot iterator" in str(err.value)


@pytest.mark.parametrize("value, says", [
    (float("nan"), "returned nan before fine-tuning; it must return a finite number"),
    (float("inf"), "returned inf before"),
    ("0.9", "returned str '0.9' before fine-tuning; it must return a number"),
    (None, "returned NoneType None"),
    (True, "returned bool True"),
    (torch.tensor([0.1, 0.2]), "returned Tensor"),
])
def test_evaluate_must_return_a_finite_number(value, says):
    student, teacher = pair()
    with pytest.raises(UserError, match="evaluate") as err:
        finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=1), evaluate=lambda m: value)
    assert says in str(err.value)


def test_evaluate_may_return_a_scalar_tensor_and_is_checked_every_epoch():
    student, teacher = pair()
    scores = iter([torch.tensor(0.5), 0.6, float("nan")])
    with pytest.raises(UserError, match="returned nan after epoch 2"):
        finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=3), evaluate=lambda m: next(scores))


def test_a_non_finite_loss_names_the_epoch_and_batch_and_suggests_a_lower_lr():
    student, teacher = pair()
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        return F.cross_entropy(outputs, targets) * (math.nan if len(calls) == 7 else 1.0)

    with pytest.raises(UserError, match="loss became nan at epoch 2, batch 3") as err:
        config = FinetuneConfig(epochs=2, lr=0.01, schedule="constant", warmup=0.0)
        finetune(student, teacher, tiny_data(), config, loss_fn=loss_fn)
    assert "(learning rate 0.01)" in str(err.value)
    assert "lower the learning rate ([finetune] lr; try 0.001)" in str(err.value)


@pytest.mark.parametrize("options, says", [
    (dict(epochs=-1), "finetune.epochs: -1 is out of range; allowed: >= 0"),
    (dict(epochs=1.5), "finetune.epochs: expected an integer"),
    (dict(epochs=1, lr=0), "finetune.lr: 0.0 is out of range"),
    (dict(epochs=1, lr="fast"), 'finetune.lr: "fast" is not a learning rate'),
    (dict(epochs=1, temperature=-2), "finetune.temperature"),
    (dict(epochs=1, distill_weight=1.5), "finetune.distill_weight: 1.5 is out of range; allowed: [0, 1]"),
    (dict(epochs=1, optimizer="rmsprop"), 'finetune.optimizer: "rmsprop" is not an optimizer; allowed: "sgd", "adam"'),
    (dict(epochs=1, batches_per_epoch=0), "finetune.batches_per_epoch"),
    (dict(epochs=1, grad_clip=-1.0), "finetune.grad_clip"),
    (dict(epochs=1, soft_loss="l1"), "finetune.soft_loss"),
    (dict(epochs=1, warmup=0.9), "finetune.warmup: 0.9 is out of range"),
    (dict(epochs=1, schedule="step"), "finetune.schedule"),
    (dict(epochs=1, patience=0), "finetune.patience"),
    (dict(epochs=1, device="gpu7"), "finetune.device: 'gpu7' is not a torch device"),
    (dict(epochs=1, seed=-1), "finetune.seed"),
])
def test_bad_options_are_user_errors(options, says):
    with pytest.raises(UserError) as err:
        FinetuneConfig(**options)
    assert says in str(err.value)


def test_sharing_parameters_with_the_teacher_is_an_error():
    student, _ = pair()
    with pytest.raises(UserError, match="shares parameters with the teacher"):
        finetune(student, student, tiny_data(), FinetuneConfig(epochs=1))


def test_the_default_loss_needs_a_logits_tensor_and_loss_fn_a_scalar():
    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), self.fc(x).sum(1)

    torch.manual_seed(0)
    teacher = Pairs()
    with pytest.raises(UserError, match="returns a tuple, and the default loss .* needs a single logits tensor"):
        finetune(copy.deepcopy(teacher), teacher, tiny_data(), FinetuneConfig(epochs=1))
    with pytest.raises(UserError, match=r"loss_fn\(outputs, targets\) returned a tensor of shape \(8,\)"):
        finetune(copy.deepcopy(teacher), teacher, tiny_data(), FinetuneConfig(epochs=1),
                 loss_fn=lambda out, y: F.cross_entropy(out[0], y, reduction="none"))
    finetune(copy.deepcopy(teacher), teacher, tiny_data(), FinetuneConfig(epochs=1),
             loss_fn=lambda out, y: F.cross_entropy(out[0], y))


# -- output --------------------------------------------------------------------------------------
def test_nothing_is_printed(capsys):
    student, teacher = pair()
    finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=2), evaluate=lambda m: 0.5)
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # stderr is not a terminal here: no bar either


def test_epochs_are_tasks_of_the_context_drawn_only_on_a_terminal(capsys):
    terminal = io.StringIO()
    ctx = PassContext(instruments=(ProgressBars(Console(file=terminal, force_terminal=True, width=100)),))
    student, teacher = pair()
    finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=2), evaluate=lambda m: 0.5, ctx=ctx)
    assert capsys.readouterr().out == ""
    shown = terminal.getvalue()
    assert "epoch 1/2" in shown and "epoch 2/2 · score 0.5000" in shown and "loss " in shown
    terminal.truncate(0)
    finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=1))  # no context: nothing drawn
    assert terminal.getvalue() == ""
    ctx = PassContext(instruments=(ProgressBars(),))
    finetune(student, teacher, tiny_data(), FinetuneConfig(epochs=1), ctx=ctx)
    assert capsys.readouterr() == ("", "")  # stderr is not a terminal here: no bar


# -- the loss ------------------------------------------------------------------------------------
def test_kd_loss_equals_a_hand_computation():
    s, t, y, temp, w = [1.0, 2.0, 3.0], [3.0, 1.0, 0.0], 0, 2.0, 0.7

    def softmax(v):
        e = [math.exp(a / temp) for a in v]
        return [a / sum(e) for a in e]

    ps, pt = softmax(s), softmax(t)
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    ce = -math.log(math.exp(s[y]) / sum(math.exp(a) for a in s))
    expected = w * temp**2 * kl + (1 - w) * ce
    got = distillation_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), None, temp, w)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    two = distillation_loss(torch.tensor([s, t]), torch.tensor([t, t]), None, temperature=temp)
    assert two.item() == pytest.approx(temp**2 * kl / 2, rel=1e-6)  # batchmean: averaged over the rows


def test_kd_gradient_is_finite_even_for_huge_logits():
    s = torch.tensor([[1e4, -1e4, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [2.0, 1.0, 0.0]])
    loss = distillation_loss(s, t, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_outputs_that_are_not_logits_get_mse():
    s, t = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [0.0]])
    assert distillation_loss(s, t, None).item() == pytest.approx(2.5)  # (N, 1): regression
    assert distillation_loss(s.flatten(), t.flatten(), None).item() == pytest.approx(2.5)  # (N,)
    y = torch.tensor([[1.5], [1.5]])
    hard = distillation_loss(s, t, y, F.mse_loss, distill_weight=0.25)
    assert hard.item() == pytest.approx(0.25 * 2.5 + 0.75 * 0.25)
    logits = torch.tensor([[1.0, 2.0]])
    assert distillation_loss(logits, logits + 1, None, soft_loss="mse").item() == pytest.approx(1.0)
    with pytest.raises(UserError, match=r"soft_loss='kl' needs class logits .* shape \(2, 1\)"):
        distillation_loss(s, t, None, soft_loss="kl")


def test_structured_outputs_sum_one_term_per_tensor():
    logits_s, logits_t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 1.0, 0.0]])
    box_s, box_t = torch.tensor([[1.0, 1.0]]).T, torch.tensor([[0.0, 0.0]]).T
    kd = distillation_loss(logits_s, logits_t, None)
    out = distillation_loss({"cls": logits_s, "box": box_s, "n": torch.tensor([3])},
                            {"cls": logits_t, "box": box_t, "n": torch.tensor([3])}, None)
    assert out.item() == pytest.approx(kd.item() + 1.0)
    assert distillation_loss((logits_s,), [logits_t], None).item() == pytest.approx(kd.item())
    with pytest.raises(UserError, match="returns 2 tensor.* but the teacher 1"):
        distillation_loss((logits_s, box_s), (logits_t,), None)
    with pytest.raises(UserError, match=r"shape \(1, 3\) but the teacher's has \(1, 4\)"):
        distillation_loss(logits_s, torch.zeros(1, 4), None)
    with pytest.raises(UserError, match="no floating-point tensor"):
        distillation_loss(torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), None)


def test_dense_logits_distil_over_the_channel_dim():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    flat = lambda v: v.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731 (one row per pixel)
    assert distillation_loss(s, t, None).item() == pytest.approx(distillation_loss(flat(s), flat(t), None).item())


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.floats(0.5, 10), st.floats(-100, 100), st.data())
def test_kd_soft_term_is_a_divergence(n, c, temperature, shift, data):
    """>= 0, zero for student = teacher, and blind to a constant added to a row of logits."""
    logits = st.lists(st.lists(st.floats(-30, 30, width=32), min_size=c, max_size=c), min_size=n, max_size=n)
    s, t = (torch.tensor(data.draw(logits), dtype=torch.float64) for _ in range(2))
    kd = distillation_loss(s, t, None, temperature=temperature).item()
    assert kd >= -1e-9
    assert distillation_loss(s, s, None, temperature=temperature).item() == pytest.approx(0, abs=1e-9)
    assert distillation_loss(s + shift, t, None, temperature=temperature).item() == pytest.approx(kd, abs=1e-6)
