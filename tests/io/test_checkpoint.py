import pytest
import torch
from safetensors.torch import save_file

from featurefusion.errors import CheckpointError
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.io.inspect import describe


def test_layouts_are_detected(tiny):
    assert open_checkpoint(tiny.base).layout == "ldm"
    assert open_checkpoint(tiny.pipeline).layout == "diffusers"
    assert open_checkpoint(tiny.unet_file).layout == "diffusers-unet"
    assert open_checkpoint(tiny.pipeline / "unet").layout == "diffusers-unet"


def test_every_layout_shows_the_same_canonical_tensors(tiny):
    with (
        open_checkpoint(tiny.base) as ldm,
        open_checkpoint(tiny.pipeline) as pipe,
        open_checkpoint(tiny.unet_file) as unet,
    ):
        assert set(ldm.keys("unet")) == set(pipe.keys("unet")) == set(unet.keys("unet"))
        assert set(ldm.keys("vae")) == set(pipe.keys("vae"))
        assert set(ldm.keys("text_encoder")) <= set(pipe.keys("text_encoder")) | {
            "text_encoder.text_model.embeddings.position_ids"
        }
        for key in pipe.keys():
            if key in ldm:
                assert torch.equal(ldm.read(key), pipe.read(key)), key
        for key in unet.keys():
            assert torch.equal(unet.read(key), ldm.read(key)), key


def test_vae_attention_is_seen_as_linear(tiny):
    with open_checkpoint(tiny.base) as ldm:
        key = "vae.encoder.mid_block.attentions.0.to_q.weight"
        assert ldm.ref(key).shape == ldm.read(key).shape and ldm.read(key).ndim == 2


def test_describe(tiny):
    info = describe(tiny.base)
    assert info["layout"] == "ldm"
    assert set(info["components"]) >= {"unet", "text_encoder", "vae"}
    unet_params = sum(v.numel() for v in tiny.unet_states[0].values())
    assert info["components"]["unet"]["parameters"] == unet_params
    assert "cross-attention width 32" in info["family"]


def test_unknown_layout_and_missing_path(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout") as err:
        open_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="neither a diffusers pipeline"):
        open_checkpoint(tmp_path / "folder")


def test_weights_only_pickle(tiny, tmp_path):
    from safetensors.torch import load_file

    state = load_file(tiny.base)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, ckpt)
    with open_checkpoint(ckpt) as pickled, open_checkpoint(tiny.base) as safe:
        assert pickled.layout == "ldm" and set(pickled.keys()) == set(safe.keys())
        key = "unet.conv_in.weight"
        assert torch.equal(pickled.read(key), safe.read(key))


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        open_checkpoint(path)
