"""Every kind of bad input gets a clear error naming the file (and key), and leaves nothing at the output."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from featurefusion.errors import CheckpointError, FeatureFusionError, RecipeError
from featurefusion.merge import operations
from featurefusion.merge.operations import OutputOptions

from conftest import build_text_encoder, build_unet, build_vae, to_ldm


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "out" / "merged.safetensors"
    yield path
    # nothing may be left behind: no output, no temporary file, no statistics sidecar
    leftovers = list(path.parent.iterdir()) if path.parent.exists() else []
    assert leftovers == [], leftovers


def edited_copy(src, dst, edit):
    state = load_file(src)
    edit(state)
    save_file(state, dst)
    return dst


KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
CANONICAL = "unet.down_blocks.0.attentions.0.proj_in.weight"


@pytest.mark.parametrize("method", ["featurefusion", "soup"])
def test_architectures_differ(tiny, tmp_path, out, method):
    from conftest import tiny_layout

    other = build_unet(0, block_out_channels=(32, 32), layers_per_block=2)
    from featurefusion.io.checkpoint import unet_layout_from_diffusers_keys

    layout = unet_layout_from_diffusers_keys(other.state_dict().keys(), build_vae().state_dict().keys())
    path = tmp_path / "other.safetensors"
    save_file(to_ldm(other.state_dict(), build_text_encoder().state_dict(), build_vae().state_dict(), layout), path)
    assert tiny_layout() != layout
    with pytest.raises(CheckpointError, match="architectures differ") as err:
        operations.merge([tiny.base, path], out, method)
    assert err.value.path == str(path) and err.value.key


def test_missing_key(tiny, tmp_path, out):
    bad = edited_copy(tiny.specialists[0], tmp_path / "bad.safetensors", lambda s: s.pop(KEY))
    with pytest.raises(CheckpointError, match="key missing") as err:
        operations.merge([tiny.base, bad], out)
    assert err.value.path == str(bad) and err.value.key == CANONICAL


def test_shape_mismatch(tiny, tmp_path, out):
    def edit(state):
        state[KEY] = state[KEY][:, :-1].contiguous()

    bad = edited_copy(tiny.specialists[0], tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match="shape") as err:
        operations.merge([tiny.base, bad], out, "soup")
    assert err.value.path == str(bad) and err.value.key == CANONICAL


def test_truncated_file(tiny, tmp_path, out):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(tiny.specialists[0].read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        operations.merge([tiny.base, bad], out)
    assert err.value.path == str(bad) and err.value.key


def test_corrupt_file(tiny, tmp_path, out):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt") as err:
        operations.merge([tiny.base, bad], out)
    assert err.value.path == str(bad)


def test_nonexistent_path(tiny, tmp_path, out):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="no such file") as err:
        operations.merge([tiny.base, missing], out)
    assert err.value.path == str(missing)


@pytest.mark.parametrize("method", ["featurefusion", "soup"])
def test_a_single_model(tiny, out, method):
    with pytest.raises(RecipeError, match="at least two models"):
        operations.merge([tiny.base], out, method)


def test_nan_is_an_error_by_default(tiny, tmp_path, out):
    def edit(state):
        state[KEY][0, 0] = float("nan")

    bad = edited_copy(tiny.specialists[0], tmp_path / "nan.safetensors", edit)
    with pytest.raises(CheckpointError, match="NaN or Inf") as err:
        operations.merge([tiny.base, bad], out)
    assert err.value.path == str(bad) and err.value.key == CANONICAL


def test_inf_can_be_skipped_with_a_warning(tiny, tmp_path, caplog):
    def edit(state):
        state[KEY][0, 0] = float("inf")

    bad = edited_copy(tiny.specialists[0], tmp_path / "inf.safetensors", edit)
    out = tmp_path / "skipped.safetensors"
    report = operations.merge([tiny.base, bad], out, "soup", out=OutputOptions(nan_policy="skip"))
    assert report.skipped_modules == [CANONICAL.rsplit(".", 1)[0]]
    assert "NaN/Inf" in caplog.text
    merged, base = load_file(out), load_file(tiny.base)
    assert torch.equal(merged[KEY], base[KEY])  # the broken module comes from the base
    other = "model.diffusion_model.out.2.weight"
    assert not torch.equal(merged[other], base[other])  # everything else is merged


def test_nan_in_the_base_is_an_error_even_when_skipping(tiny, tmp_path, out):
    def edit(state):
        state[KEY][0, 0] = float("nan")

    bad = edited_copy(tiny.base, tmp_path / "nanbase.safetensors", edit)
    with pytest.raises(CheckpointError, match="in the base model") as err:
        operations.merge([bad, tiny.specialists[0]], out, out=OutputOptions(nan_policy="skip"))
    assert err.value.path == str(bad)


def test_output_equal_to_an_input(tiny, tmp_path):
    copy = tmp_path / "base.safetensors"
    shutil.copy(tiny.base, copy)
    before = copy.read_bytes()
    with pytest.raises(CheckpointError, match="same as an input") as err:
        operations.merge([copy, tiny.specialists[0]], copy)
    assert err.value.path == str(copy)
    assert copy.read_bytes() == before


def test_output_folder_containing_an_input(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="overlaps"):
        operations.merge([tiny.pipeline, tiny.specialists[0]], tiny.pipeline.parent)


def test_removing_a_model_that_is_not_in_a_soup(tiny, tmp_path, out):
    soup = tmp_path / "soup.safetensors"
    operations.merge([tiny.base, tiny.specialists[0]], soup, "soup")
    with pytest.raises(CheckpointError, match="not a member") as err:
        operations.remove(soup, tiny.specialists[1], out)
    assert err.value.path == str(tiny.specialists[1])


def test_removing_a_model_that_is_not_in_a_featurefusion_merge(tiny, tmp_path, out):
    merged = tmp_path / "ff.safetensors"
    operations.merge([tiny.base, tiny.specialists[0]], merged)
    with pytest.raises(CheckpointError, match="not a member") as err:
        operations.remove(merged, str(tiny.specialists[1]), out)
    assert err.value.path == str(merged)
    with pytest.raises(RecipeError, match="base model"):
        operations.remove(merged, "0", out)


def test_removing_from_a_model_without_recipe(tiny, out):
    with pytest.raises(CheckpointError, match="no featurefusion recipe"):
        operations.remove(tiny.base, "1", out)


def test_failure_mid_merge_leaves_no_output(tiny, tmp_path, out):
    # the NaN sits in the last UNet module, so most of the output has been streamed when it is found
    def edit(state):
        state["model.diffusion_model.out.2.bias"][0] = float("nan")

    bad = edited_copy(tiny.specialists[0], tmp_path / "late.safetensors", edit)
    with pytest.raises(FeatureFusionError):
        operations.merge([tiny.base, bad], out)
