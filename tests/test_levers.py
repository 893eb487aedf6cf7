"""The accuracy levers of params.yaml and the Trainer: test-time views, elastic distortions, distillation."""

import torch
import torch.nn.functional as F

from conftest import META
from helpers import synthetic_digits
from mnist_pipeline import export, exported
from mnist_pipeline.data import random_affine, standardise, to_unit
from mnist_pipeline.engine import Distillation, Trainer, predict_logits, seed_everything
from mnist_pipeline.models import CNN, MLP, build_model

CPU = torch.device("cpu")


def digits(n=64, seed=0):
    x, y = synthetic_digits(n, seed)
    return x, y.long()


def test_views_average_the_logits_of_one_pixel_shifts_in_eval_mode_only():
    torch.manual_seed(0)
    model = MLP([32], 0.0, views=5)
    images = digits(8)[0].clone()
    images[:, [0, -1], :] = 0
    images[:, :, [0, -1]] = 0
    x = standardise(to_unit(images), 0.13, 0.31)
    # Rolling an image with a blank border is shifting it with the edge replicated.
    shifts = [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)]
    model.eval()
    expected = torch.stack([model.net(torch.roll(x, s, dims=(2, 3))) for s in shifts]).mean(0)
    torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(model(x), model.net(x), atol=1e-4)
    nine = build_model("mlp", hidden=[32], dropout=0.0, views=9).eval()
    nine.load_state_dict(model.state_dict())
    assert not torch.allclose(nine(x), model(x), atol=1e-5)
    model.train()
    torch.testing.assert_close(model(x), model.net(x))  # training sees each image once


def test_training_validates_on_one_view_and_keeps_the_views(params):
    seed_everything(0)
    model = MLP([32], 0.0, views=9)
    x, y = digits(200)
    trainer = Trainer(model, (x, y), digits(100, 5), params.train, 0.2, 0.3, 0, CPU)
    loss, _ = trainer.validate()
    vx, vy = digits(100, 5)
    single = F.cross_entropy(predict_logits(model.net, vx, 0.2, 0.3, 100, CPU), vy)
    assert abs(loss - float(single)) < 1e-6
    assert model.views == 9


def test_exported_graph_carries_the_views(tmp_path):
    torch.manual_seed(0)
    single = CNN([[4], [8]], 0.0)
    views = CNN([[4], [8]], 0.0, views=9)
    views.load_state_dict(single.state_dict())
    model = export.deployable(views, 0.13, 0.31)
    export.export_onnx(model, tmp_path / "model.onnx", 18, META)
    x = to_unit(digits(16)[0])
    out = exported.load_model(tmp_path / "model.onnx").run(x.numpy())
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), atol=1e-4, rtol=1e-4)
    plain = export.deployable(single, 0.13, 0.31)(x).detach()
    assert (torch.from_numpy(out) - plain).abs().max() > 1e-3


def field_of(x, alpha, sigma, seed=0):
    """The displacement the elastic warp applied, in pixels, read off warped coordinate images."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    coords = torch.stack([xs, ys]).expand(n, 2, h, w).contiguous()
    warped = random_affine(coords, 0.0, 0.0, 0.0, torch.Generator().manual_seed(seed), alpha, sigma)
    return (warped - coords)[..., 6:-6, 6:-6]  # the centre: zero padding bends the edges


def test_elastic_distortion_is_smooth_scaled_by_alpha_and_off_at_zero():
    x = to_unit(digits(16)[0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = random_affine(x, 10.0, 0.1, 2.0, g1)
    off = random_affine(x, 10.0, 0.1, 2.0, g2, 0.0, 4.0)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    assert torch.equal(g1.get_state(), g2.get_state())  # off draws nothing: older runs are unchanged

    coarse = field_of(x, 34.0, 4.0)
    magnitude = coarse.abs().mean()
    assert 0.3 < magnitude < 3.0  # Simard's α 34, σ 4 moves pixels by about a pixel
    # Smooth: neighbouring pixels move almost together (unblurred noise would not).
    step = (coarse[..., 1:] - coarse[..., :-1]).abs().mean()
    assert step < 0.25 * magnitude
    torch.testing.assert_close(field_of(x, 17.0, 4.0), coarse / 2, atol=1e-4, rtol=1e-3)


def test_elastic_warp_keeps_the_ink():
    x = to_unit(digits(32)[0])
    warped = random_affine(x, 0.0, 0.0, 0.0, torch.Generator().manual_seed(1), 34.0, 4.0)
    assert not torch.allclose(warped, x, atol=1e-2)
    ratio = warped.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert ((ratio > 0.7) & (ratio < 1.3)).all()


def student(params, weight=None):
    """Predictions on its training images of an MLP distilled from a teacher that calls the first
    half of them 3s and the rest 7s, whatever they show; and their labels."""
    seed_everything(0)
    p = params.with_train(epochs=10, label_smoothing=0.0, ema=0.0,
                          augment=params.train.augment.model_copy(update={"enabled": False}))
    model = build_model("mlp", **p.model_kwargs())
    x, y = digits(320)
    answers = torch.where(torch.arange(len(x)) < len(x) // 2, 3, 7)
    distill = None if weight is None else Distillation(F.one_hot(answers, 10).float() * 8, weight, 2.0)
    Trainer(model, (x, y), digits(64, 5), p.train, 0.2, 0.3, 0, CPU, distill).fit()
    return predict_logits(model, x, 0.2, 0.3, 100, CPU).argmax(1), answers, y


def test_distillation_learns_the_teachers_answers_for_each_image(params):
    told, answers, _ = student(params, weight=1.0)
    assert (told == answers).float().mean() > 0.75  # each image its own target (chance: 0.5; the labels: 0.1)
    taught, _, labels = student(params, weight=0.0)
    plain, _, _ = student(params)
    assert torch.equal(taught, plain)  # weight 0 is plain training
    assert (plain == labels).float().mean() > 0.5 and (plain == 3).float().mean() < 0.5
