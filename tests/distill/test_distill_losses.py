import pytest
import torch
from distill_fixtures import *  # noqa: F403 (the fixtures backbone, teachers)

from featurefusion.distill.backbone import load_teacher
from featurefusion.distill.data import ToyWorldData
from featurefusion.distill.losses import Discriminator, FeatureTap, adversarial_terms, mid_features, predict_x0
from featurefusion.distill.student import StudentUNet
from featurefusion.distill.trainer import DistillConfig, Supervisor, Trainer


def _trainer(backbone, teacher_unets, **config):
    student = StudentUNet.from_base(backbone.unet, [f"s{i}" for i in range(len(teacher_unets))])
    sups = [Supervisor(f"s{i}", (lambda u=u: u), style=i) for i, u in enumerate(teacher_unets)]
    return Trainer(student, sups, backbone, DistillConfig(**{"batch_size": 4, "lr": 1e-3, **config}))


def test_a_teacher_equal_to_the_student_gives_zero_losses(backbone):
    trainer = _trainer(backbone, [backbone.unet], lambda_adv=0.0)
    losses = trainer._slot(ToyWorldData(), 1, 0, 0)
    assert losses["score"].item() == 0.0
    assert losses["feat"].item() == 0.0


def test_feature_tap_records_every_block(backbone):
    tap = FeatureTap(backbone.unet)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), tap.record() as feats:
        backbone.unet(x, torch.tensor([10, 500]), torch.randn(2, 8, 64))
    unet = backbone.unet
    assert len(feats) == len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert feats[len(unet.down_blocks)].shape[1] == unet.config.block_out_channels[-1]
    tap.remove()


@pytest.mark.parametrize("key, lambda_feat", [("score", 0.001), ("feat", 1.0)])
def test_score_and_feature_losses_decrease(backbone, teachers, key, lambda_feat):
    unets = [load_teacher(p, backbone.unet) for p in teachers[:2]]
    trainer = _trainer(backbone, unets, lambda_adv=0.0, lambda_feat=lambda_feat, lr=1e-4, style_lr=1e-3)
    data = ToyWorldData()
    # batches are seeded by step: replaying step 0 makes a fixed regression problem
    before = sum(trainer._slot(data, 1, 0, g)[key].item() for g in range(2))
    for _ in range(12):
        trainer.step = 0
        trainer.train_step(data, 1)
    after = sum(trainer._slot(data, 1, 0, g)[key].item() for g in range(2))
    assert after < 0.7 * before


def test_adversarial_losses_decrease(backbone, teachers):
    torch.manual_seed(0)
    student = StudentUNet.from_base(backbone.unet, ["a", "b"])
    teacher = load_teacher(teachers[2], backbone.unet)
    head = Discriminator(backbone.unet.config.block_out_channels[-1], 4)
    sched = backbone.scheduler
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 16, 16, generator=gen) * 2 - 1
    ctx = backbone.encode_text(["a red circle , plain"] * 8)
    t = torch.full((8,), 400)
    noisy = sched.add_noise(x0, torch.randn(x0.shape, generator=gen), t)
    with torch.no_grad():
        x0_teacher = predict_x0(sched, noisy, teacher(noisy, t, ctx).sample, t) + 0.5  # clearly another distribution

    def terms(seed):
        eps = student(noisy, t, ctx, style=1)
        return adversarial_terms(student.unet, head, sched, predict_x0(sched, noisy, eps, t), x0_teacher, ctx, 1,
                                 torch.Generator().manual_seed(seed))  # fmt: skip

    # the head learns to tell them apart (only the head moves: the student is not in its optimizer)
    opt_d = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = terms(0).discriminator.item()
    for _ in range(15):
        opt_d.zero_grad()
        terms(0).discriminator.backward()
        opt_d.step()
    assert terms(0).discriminator.item() < 0.5 * first
    # the student then learns to be read as "teacher 1" (the head stays fixed: its parameters get no gradient)
    head.zero_grad(set_to_none=True)
    opt_g = torch.optim.Adam(student.parameters(), lr=1e-3)
    first = terms(1).generator.item()
    for _ in range(10):
        opt_g.zero_grad()
        loss = terms(1).generator
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in head.parameters())
        opt_g.step()
    assert terms(1).generator.item() < first


def test_mid_features_with_detached_parameters_pass_gradients_to_the_input_only(backbone):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    params = {k: v.detach() for k, v in backbone.unet.named_parameters()}
    backbone.unet.requires_grad_(True)
    try:
        feats = mid_features(backbone.unet, x, torch.tensor([5, 900]), torch.randn(2, 8, 64), params)
        feats.square().mean().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert all(p.grad is None for p in backbone.unet.parameters())
    finally:
        backbone.unet.requires_grad_(False)
