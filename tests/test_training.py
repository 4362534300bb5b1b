"""Training as people train: a small teacher and student CNN, SoKDLoss under each logit loss,
a few steps of SGD per scenario, on every built backend, compared with the reference backend.

Scenarios: a last batch smaller than the others, torch.compile of the student and of the loss
(default and dynamic=True shapes, fullgraph=True where the docs promise it), bfloat16 autocast,
gradient accumulation, state_dict save and restore mid-training, autograd.grad twice on one
graph, eval()/no_grad/inference_mode, and a two-process gloo DDP run with the policy search.

The policy leaves out Gaussian noise: each backend expands a noise seed with its own generator
(docs/robustness.md), so only the other ops give identical draws on every backend.
"""

import io
import itertools
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from backend_matrix import KERNEL_TARGETS, REFERENCE_TARGETS, target_params, using
from torch import nn

import sokd
from sokd.augment_ops import NOISE, NUM_PRIMITIVES

CLASSES = 5
LOGIT_LOSSES = ("kd", "dkd", "masked")
BATCHES = (6, 6, 4)  # the last batch of an epoch with drop_last=False is smaller
SUB_POLICIES = tuple(
    pair for pair in itertools.combinations(range(NUM_PRIMITIVES), 2) if NOISE not in pair
)
# Kernel backends on the CPU only: the Triton interpreter is too slow for whole training runs.
TRAINING_TARGETS = [t for t in KERNEL_TARGETS if not t.interpreted]


class Net(nn.Module):
    """conv-BN-ReLU, a strided conv-BN-ReLU giving the hint feature, then a linear classifier."""

    def __init__(self, width, feature_channels):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.hint = nn.Sequential(
            nn.Conv2d(width, feature_channels, 3, stride=2, padding=1),
            nn.BatchNorm2d(feature_channels),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(feature_channels, CLASSES)

    def forward(self, x):
        feature = self.hint(self.stem(x))
        return feature, self.classifier(feature.mean(dim=(2, 3)))


def make_run(logit_loss, seed=0, device="cpu"):
    """A fresh (student, teacher, criterion, optimizer), identical for equal seeds."""
    torch.manual_seed(seed)
    teacher = Net(8, 8).to(device).eval()
    student = Net(4, 6).to(device)
    criterion = sokd.SoKDLoss(
        6,
        8,
        k=3,
        logit_loss=logit_loss,
        policy=sokd.FeaturePolicy(SUB_POLICIES),
        generator=torch.Generator().manual_seed(seed + 1),
        w_feat=10.0,
        w_dam=10.0,
    ).to(device)
    parameters = list(student.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.05, momentum=0.9)
    return student, teacher, criterion, optimizer


def batches(sizes=BATCHES, seed=10, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    for n in sizes:
        x = torch.randn(n, 3, 8, 8, generator=generator).to(device)
        y = torch.randint(0, CLASSES, (n,), generator=generator).to(device)
        yield x, y


def step_loss(student, teacher, criterion, x, y, augment=None):
    feature, logits = student(x)
    with torch.no_grad():
        teacher_feature, teacher_logits = teacher(x)
    out = criterion(feature, teacher_feature, logits, teacher_logits, y, augment=augment)
    return F.cross_entropy(logits, y) + out.total


def trainable(student, criterion):
    return list(student.parameters()) + list(criterion.parameters())


def _zeros_for_none(parameters, grads):
    """Gradients with zeros for the parameters that got none (unused in this step)."""
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


def loss_and_grads(backend, student, teacher, criterion, x, y):
    """The loss and the gradients of every trainable parameter on `backend`, from the current
    state, leaving the generator and BatchNorm statistics as they were before."""
    generator_state = criterion.generator.get_state()
    buffers = [b.clone() for b in itertools.chain(student.buffers(), criterion.buffers())]
    with using(backend):
        loss = step_loss(student, teacher, criterion, x, y)
    parameters = trainable(student, criterion)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    criterion.generator.set_state(generator_state)
    for buffer, saved in zip(itertools.chain(student.buffers(), criterion.buffers()), buffers):
        buffer.copy_(saved)
    return loss.detach(), _zeros_for_none(parameters, grads)


def assert_close_grads(actual, expected, what, rtol=2e-4):
    """Close up to rtol of the largest gradient entry of the whole model: some gradients are
    0 up to rounding (a conv bias followed by BatchNorm), and their rounding is all there is
    to compare."""
    scale = max(float(want.abs().max()) for want in expected)
    for index, (got, want) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, i=index: f"{what}: parameter {i}: {m}")


@pytest.mark.parametrize("logit_loss", LOGIT_LOSSES)
@pytest.mark.parametrize("target", **target_params(TRAINING_TARGETS))
def test_training_steps_match_the_reference(target, logit_loss):
    """Every step (the smaller last batch included): the same loss and gradients as the
    reference from the same state and the same draws; the run then steps on the backend's."""
    student, teacher, criterion, optimizer = make_run(logit_loss)
    for x, y in batches():
        expected_loss, expected = loss_and_grads("reference", student, teacher, criterion, x, y)
        loss, grads = loss_and_grads(target.backend, student, teacher, criterion, x, y)
        torch.testing.assert_close(loss, expected_loss, rtol=2e-5, atol=1e-6)
        assert_close_grads(grads, expected, f"{logit_loss} n={x.shape[0]}")
        with using(target.backend):
            loss = step_loss(student, teacher, criterion, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("logit_loss", LOGIT_LOSSES)
@pytest.mark.parametrize("target", **target_params(TRAINING_TARGETS))
def test_gradient_accumulation_over_micro_batches(target, logit_loss):
    """Two micro-batches accumulated into .grad give the sum of their separate gradients, as
    on the reference (the second backward adds into the first one's gradient in place)."""
    results = {}
    for backend in ("reference", target.backend):
        student, teacher, criterion, _ = make_run(logit_loss)
        with using(backend):
            for x, y in batches((4, 4, 3)):
                (step_loss(student, teacher, criterion, x, y) / 3).backward()
        results[backend] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                            for p in trainable(student, criterion)]
    assert_close_grads(results[target.backend], results["reference"], f"{logit_loss} accumulated")


@pytest.mark.parametrize("target", **target_params(TRAINING_TARGETS))
def test_autocast_bfloat16_matches_the_reference(target):
    results = {}
    for backend in ("reference", target.backend):
        student, teacher, criterion, _ = make_run("kd")
        x, y = next(batches())
        with using(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_loss(student, teacher, criterion, x, y)
        parameters = trainable(student, criterion)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        results[backend] = (loss.detach(), _zeros_for_none(parameters, grads))
    loss, grads = results[target.backend]
    expected_loss, expected_grads = results["reference"]
    assert loss.dtype == expected_loss.dtype
    # bfloat16 keeps 8 significant bits: the convolutions round alike on both backends, and
    # the losses' own rounding differs by a few units in the last place.
    torch.testing.assert_close(loss, expected_loss, rtol=2e-2, atol=1e-3)
    assert_close_grads(grads, expected_grads, "autocast", rtol=2e-2)


@pytest.mark.parametrize("target", **target_params(REFERENCE_TARGETS[:1] + TRAINING_TARGETS))
def test_state_dict_restore_continues_bitwise_identically(target):
    """Save after two steps, restore into fresh objects, continue: every later loss and the
    final weights equal an uninterrupted run bit for bit (the criterion's generator state
    travels in its state_dict)."""
    data = list(batches((6, 6, 6, 6, 4)))

    def train(student, teacher, criterion, optimizer, steps):
        losses = []
        with using(target.backend):
            for x, y in steps:
                loss = step_loss(student, teacher, criterion, x, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        return losses

    student, teacher, criterion, optimizer = make_run("dkd")
    uninterrupted = train(student, teacher, criterion, optimizer, data)
    final = [p.detach().clone() for p in trainable(student, criterion)]

    student, teacher, criterion, optimizer = make_run("dkd")
    first = train(student, teacher, criterion, optimizer, data[:2])
    buffer = io.BytesIO()
    torch.save(
        {
            "student": student.state_dict(),
            "criterion": criterion.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer)
    student, teacher, criterion, optimizer = make_run("dkd", seed=0)
    # A fresh criterion's generator is at its seed; the saved one had moved on.
    student.load_state_dict(saved["student"])
    criterion.load_state_dict(saved["criterion"])
    optimizer.load_state_dict(saved["optimizer"])
    rest = train(student, teacher, criterion, optimizer, data[2:])
    for step, (got, want) in enumerate(zip(first + rest, uninterrupted)):
        assert torch.equal(got, want), f"step {step}: {got} != {want}"
    for got, want in zip(trainable(student, criterion), final):
        assert torch.equal(got, want)


def test_state_dict_without_generator_state_is_refused():
    with_generator = make_run("kd")[2]
    without = sokd.SoKDLoss(6, 8, k=3, logit_loss="kd")
    with pytest.raises(ValueError, match="generator"):
        without.load_state_dict(with_generator.state_dict())


@pytest.mark.parametrize("target", **target_params(TRAINING_TARGETS))
def test_autograd_grad_twice_on_one_graph(target):
    student, teacher, criterion, _ = make_run("kd")
    x, y = next(batches())
    parameters = trainable(student, criterion)
    with using(target.backend):
        loss = step_loss(student, teacher, criterion, x, y)
    first = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, parameters, allow_unused=True)
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    student_ref, teacher_ref, criterion_ref, _ = make_run("kd")
    _, expected = loss_and_grads("reference", student_ref, teacher_ref, criterion_ref, x, y)
    assert_close_grads(_zeros_for_none(parameters, second), expected, "second autograd.grad")


@pytest.mark.parametrize("mode", ("no_grad", "inference_mode", "grad"))
@pytest.mark.parametrize("target", **target_params(TRAINING_TARGETS))
def test_evaluation_modes_match_the_reference(target, mode):
    """eval() turns the augmentation off; under no_grad and inference_mode the loss needs no
    gradient and equals the reference."""
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "grad": torch.enable_grad}[mode]
    values = {}
    for backend in ("reference", target.backend):
        student, teacher, criterion, _ = make_run("dkd")
        student.eval()
        criterion.eval()
        x, y = next(batches())
        with using(backend), context():
            loss = step_loss(student, teacher, criterion, x, y)
        assert loss.requires_grad == (mode == "grad")
        values[backend] = loss.detach().clone()
    torch.testing.assert_close(values[target.backend], values["reference"], rtol=2e-5, atol=1e-6)


# --- torch.compile -----------------------------------------------------------------------------


class GraphCounter:
    """A torch.compile backend that runs graphs eagerly and counts how many it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("target", **target_params(REFERENCE_TARGETS[:1] + TRAINING_TARGETS))
def test_compiled_criterion_compiles_a_fixed_number_of_graphs(target):
    """Each step draws another sub-policy; the compiled criterion must not specialise on the
    draw: after the first steps no step compiles a new graph."""
    torch._dynamo.reset()
    student, teacher, criterion, optimizer = make_run("kd")
    counter = GraphCounter()
    compiled = torch.compile(criterion, backend=counter)
    drawn = set()
    counts = []
    with using(target.backend):
        for x, y in batches((6,) * 16):
            feature, logits = student(x)
            with torch.no_grad():
                teacher_feature, teacher_logits = teacher(x)
            loss = compiled(feature, teacher_feature, logits, teacher_logits).total
            drawn.add(criterion.policy.sample.index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            counts.append(counter.graphs)
    assert len(drawn) > 6, "the test needs several different draws"
    # The graphs around the policy step, each in at most two variants (whether the augmented
    # teacher carries the magnitudes' gradient, which a draw of no active op does not).
    assert counts[-1] <= 6, f"graphs compiled per step: {counts}"
    assert counts[7] == counts[-1], f"graphs compiled per step: {counts}"


def _compiled_training(target, logit_loss, dynamic):
    torch._dynamo.reset()
    student, teacher, criterion, optimizer = make_run(logit_loss)
    student_ref, teacher_ref, criterion_ref, optimizer_ref = make_run(logit_loss)
    compiled_student = torch.compile(student, dynamic=dynamic)
    compiled_criterion = torch.compile(criterion, dynamic=dynamic)
    for x, y in batches():
        losses = []
        for backend, net, crit, opt in (
            (target.backend, compiled_student, compiled_criterion, optimizer),
            ("reference", student_ref, criterion_ref, optimizer_ref),
        ):
            with using(backend):
                loss = step_loss(net, teacher, crit, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    for got, want in zip(trainable(student, criterion), trainable(student_ref, criterion_ref)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    # In eval mode (no policy draw) the whole criterion is one graph.
    torch._dynamo.reset()
    for module in (criterion, student, criterion_ref, student_ref):
        module.eval()
    whole = torch.compile(criterion, dynamic=dynamic, fullgraph=True)
    x, y = next(batches((5,)))
    feature, logits = student(x)
    teacher_feature, teacher_logits = teacher(x)
    with using(target.backend):
        got = whole(feature, teacher_feature, logits, teacher_logits, y).total
    with using("reference"):
        want = criterion_ref(feature, teacher_feature, logits, teacher_logits, y).total
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "logit_loss, dynamic",
    # Every logit loss once, and both ways of compiling shapes; each case compiles for minutes.
    (("kd", None), ("kd", True), ("dkd", None), ("masked", True)),
)
@pytest.mark.parametrize("target", **target_params(TRAINING_TARGETS))
def test_compiled_student_and_criterion_train_like_the_reference(target, logit_loss, dynamic):
    _compiled_training(target, logit_loss, dynamic)


# --- DistributedDataParallel -------------------------------------------------------------------


WORLD_SIZE = 2


class Distilled(nn.Module):
    def __init__(self, student, criterion):
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(self, x, y, teacher_feature, teacher_logits, augment=True):
        feature, logits = self.student(x)
        out = self.criterion(feature, teacher_feature, logits, teacher_logits, y, augment=augment)
        return F.cross_entropy(logits, y) + out.total


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_worker(rank, port, out_dir, backend):
    torch.set_num_threads(1)
    sokd.set_backend(backend)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        student, teacher, criterion, _ = make_run("dkd")
        criterion.generator.manual_seed(100 + rank)  # ranks draw different samples
        model = nn.parallel.DistributedDataParallel(
            Distilled(student, criterion), find_unused_parameters=True
        )

        def objective(x, y, teacher_feature, teacher_logits, augment=True):
            return model(x, y, teacher_feature, teacher_logits, augment=augment)

        search = sokd.PolicySearch(model, criterion, objective, search_epochs=1)
        optimizer = torch.optim.SGD(search.student_parameters(), lr=0.05, momentum=0.9)
        for x, y in batches((4, 4, 3), seed=20 + rank):
            with torch.no_grad():
                teacher_feature, teacher_logits = teacher(x)
            search.step(x, y, teacher_feature, teacher_logits)
            loss = objective(x, y, teacher_feature, teacher_logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.save(
            {"policy": criterion.policy.state_dict(),
             "weights": [p.detach() for p in search.student_parameters()]},
            f"{out_dir}/{backend}-rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("target", **target_params(TRAINING_TARGETS))
def test_ddp_with_policy_search_matches_the_reference(target, tmp_path):
    """Two gloo ranks with different data and different policy draws stay in step, and the
    kernel backend's run ends where the reference's does."""
    results = {}
    for backend in ("reference", target.backend):
        mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), backend), nprocs=WORLD_SIZE,
                 join=True)
        ranks = [torch.load(tmp_path / f"{backend}-rank{r}.pt") for r in range(WORLD_SIZE)]
        for name, value in ranks[0]["policy"].items():
            assert torch.equal(value, ranks[1]["policy"][name]), name
        for mine, theirs in zip(ranks[0]["weights"], ranks[1]["weights"]):
            assert torch.equal(mine, theirs)
        results[backend] = ranks[0]
    initial = sokd.FeaturePolicy(SUB_POLICIES).state_dict()
    assert not torch.equal(results["reference"]["policy"]["probability"], initial["probability"])
    for got, want in zip(results[target.backend]["weights"], results["reference"]["weights"]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    for name, want in results["reference"]["policy"].items():
        got = results[target.backend]["policy"][name]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
