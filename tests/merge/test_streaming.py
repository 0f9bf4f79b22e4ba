"""The engine's fast path for weighted sums writes exactly what the generic module-by-module path writes."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from featurefusion.errors import CheckpointError
from featurefusion.merge import engine, operations, streaming
from featurefusion.merge.operations import OutputOptions


def generic_only(monkeypatch):
    monkeypatch.setattr(engine, "plan_items", lambda *a: None)


@pytest.mark.parametrize(
    ("method", "options", "out"),
    [
        ("soup", {}, OutputOptions()),
        ("soup", {"weights": [3, 1, 1]}, OutputOptions(dtype="bf16")),
        ("soup", {}, OutputOptions(format="diffusers", dtype="fp32")),
        ("block-weighted", {"block_weights": ["0.3", "0.25"]}, OutputOptions()),
    ],
)
def test_fast_path_equals_the_generic_path(tiny, tmp_path, monkeypatch, method, options, out):
    monkeypatch.setattr(streaming, "CHUNK", 1000)  # many chunks per tensor, and tensors smaller than one
    calls = []
    original = streaming.run_items
    monkeypatch.setattr(engine, "run_items", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast, slow = tmp_path / "fast.safetensors", tmp_path / "slow.safetensors"
    models = [tiny.base, *tiny.specialists]
    text_encoder = "average"
    if out.format == "diffusers":  # a pipeline base in, a pipeline folder out; text encoder copied
        models[0], text_encoder = tiny.pipeline, "base"
    operations.merge(models, fast, method, text_encoder=text_encoder, out=out, **options)
    assert calls, "the fast path was not taken"
    generic_only(monkeypatch)
    operations.merge(models, slow, method, text_encoder=text_encoder, out=out, **options)
    files = sorted(p.relative_to(fast) for p in fast.rglob("*.safetensors")) if fast.is_dir() else [None]
    for rel in files:
        a, b = (fast / rel, slow / rel) if rel else (fast, slow)
        assert a.read_bytes() == b.read_bytes(), rel


def test_soup_add_and_remove_take_the_fast_path_and_undo_each_other(tiny, tmp_path):
    soup, added, removed = (tmp_path / f"{n}.safetensors" for n in ("soup", "added", "removed"))
    operations.merge(tiny.models[:2], soup, "soup", out=OutputOptions(dtype="fp32"))
    operations.soup_add(soup, tiny.specialists[1], added)
    operations.remove(added, tiny.specialists[1], removed)
    a, b = load_file(soup), load_file(removed)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_nan_in_a_soup_names_file_and_key_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK", 1000)
    state = load_file(tiny.specialists[0])
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    state[key].view(-1)[-1] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, bad)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="NaN or Inf") as err:
        operations.merge([tiny.base, bad], out, "soup")
    assert err.value.path == str(bad) and err.value.key == "unet.down_blocks.0.attentions.0.proj_in.weight"
    assert list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize(
    ("values", "fails"),
    [
        ((65504.0, 65510.0), False),  # the mean rounds to fp16's largest value: finite, kept
        ((65504.0, 65600.0), True),  # the mean (65552) rounds to Inf in fp16
        ((-65504.0, -65600.0), True),
        ((float("inf"), 1.0), True),  # an infinite input, named by file
    ],
)
def test_fast_path_checks_the_sum_and_its_cast(tiny, tmp_path, monkeypatch, values, fails):
    monkeypatch.setattr(streaming, "CHUNK", 500)
    calls = []
    original = streaming.run_items
    monkeypatch.setattr(engine, "run_items", lambda *a, **k: calls.append(1) or original(*a, **k))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    paths = []
    for i, value in enumerate(values):
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(tiny.base).items()}
        state[key].view(-1)[700] = value  # in the second chunk of the tensor (CHUNK 500)
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    out = tmp_path / "out.safetensors"
    if fails:
        with pytest.raises(CheckpointError, match="Inf") as err:
            operations.merge(paths, out, "soup", out=OutputOptions(dtype="fp16"))
        assert err.value.key == "unet.down_blocks.0.attentions.0.proj_in.weight"
        assert not out.exists()
    else:
        operations.merge(paths, out, "soup", out=OutputOptions(dtype="fp16"))
        assert load_file(out)[key].view(-1)[700].item() == 65504.0
    assert calls, "the fast path was not taken"
