import pytest
import torch
from distill_fixtures import *  # noqa: F403 (the fixtures backbone, teachers)

from featurefusion.distill.store import load_student, save_student
from featurefusion.distill.student import StudentUNet, StyleError, fold_style, parse_style

NAMES = ["a", "b", "c"]


def _inputs(seed=0, batch=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    ctx = torch.randn(batch, 8, 64, generator=gen)
    return x, t, ctx


def _trained_like(student: StudentUNet, seed=0) -> StudentUNet:
    """Give the style MLP non-zero weights, as training does."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.prompts.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return student


@torch.no_grad()
def test_fresh_student_and_zero_codebook_equal_the_base(backbone):
    student = StudentUNet.from_base(backbone.unet, NAMES)
    x, t, ctx = _inputs()
    base = backbone.unet(x, t, ctx).sample
    for style in NAMES:  # the zero-initialised second linear: no offset yet
        assert torch.equal(student(x, t, ctx, style=style), base)
    _trained_like(student)
    student.prompts.codebook.zero_()  # bias-free MLP: a zero embedding is a zero offset
    assert torch.equal(student(x, t, ctx, style="b"), base)


@torch.no_grad()
def test_styles_differ_and_folding_a_style_matches_the_student(backbone):
    student = _trained_like(StudentUNet.from_base(backbone.unet, NAMES))
    x, t, ctx = _inputs()
    outs = {s: student(x, t, ctx, style=s) for s in NAMES}
    assert not torch.allclose(outs["a"], outs["b"], atol=1e-4)
    for style in NAMES:
        folded = fold_style(student, style)
        assert torch.allclose(folded(x, t, ctx).sample, outs[style], atol=1e-5)
    # per-sample styles in one batch equal the single-style calls
    mixed = student(x, t, ctx, style=torch.tensor([0, 1, 2]))
    for i, s in enumerate(NAMES):
        assert torch.allclose(mixed[i], outs[s][i], atol=1e-5)


@torch.no_grad()
def test_style_mixing(backbone):
    student = _trained_like(StudentUNet.from_base(backbone.unet, NAMES))
    x, t, ctx = _inputs()
    assert torch.equal(student(x, t, ctx, style={"b": 1.0}), student(x, t, ctx, style="b"))
    assert torch.equal(student(x, t, ctx, style=parse_style("b=1,c=0")), student(x, t, ctx, style="b"))
    half = student(x, t, ctx, style=parse_style("a=1,c=1"))
    assert not torch.allclose(half, student(x, t, ctx, style="a"), atol=1e-4)
    assert not torch.allclose(half, student(x, t, ctx, style="c"), atol=1e-4)
    # a mix is the mean embedding through the MLP (paper §4.5)
    e = 0.5 * (student.prompts.codebook[0] + student.prompts.codebook[2])
    expected = student.prompts.mlp(e)
    assert torch.allclose(student.prompts.offset(student.prompts.weights({"a": 0.5, "c": 0.5})), expected)


def test_bad_styles(backbone):
    student = StudentUNet.from_base(backbone.unet, NAMES)
    with pytest.raises(StyleError, match="unknown style 'zzz'.*a, b, c"):
        student.prompts.weights("zzz")
    with pytest.raises(StyleError, match="sum to 1"):
        student.prompts.weights({"a": 0.3})
    with pytest.raises(StyleError):
        parse_style("a=x")
    assert parse_style("a=1,b=3") == {"a": 0.25, "b": 0.75}
    with pytest.raises(StyleError, match="distinct"):
        StudentUNet.from_base(backbone.unet, ["a", "a"])


@torch.no_grad()
def test_save_load_round_trip(backbone, tmp_path):
    from featurefusion.toyworld.demo import SHIPPED

    student = _trained_like(StudentUNet.from_base(backbone.unet, NAMES))
    with torch.no_grad():
        student.unet.conv_in.weight.mul_(1.01)
    out = save_student(student, tmp_path / "student", SHIPPED / "base", {"teachers": []})
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    loaded, meta = load_student(out)
    assert meta["styles"] == NAMES and loaded.names == NAMES
    x, t, ctx = _inputs()
    for style in NAMES:
        assert torch.equal(loaded(x, t, ctx, style=style), student(x, t, ctx, style=style))
    assert not list(tmp_path.glob(".*tmp"))
