"""The toy model is a real diffusers/transformers stack that the merge engine reads like SD."""

import torch

from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.toyworld.models import MAX_TOKENS, build_pipeline, build_tokenizer, load_pipeline
from featurefusion.toyworld.train import TrainConfig, _train, save_unet_file
from featurefusion.toyworld.world import VOCABULARY, standard_tasks


def test_tokenizer_is_word_level_over_the_world_vocabulary():
    tok = build_tokenizer()
    ids = tok("a Red triangle, striped", padding="max_length", max_length=MAX_TOKENS).input_ids
    words = [VOCABULARY.tokens[i] for i in ids]
    assert words == ["<bos>", "a", "red", "triangle", ",", "striped", "<eos>", "<pad>"]
    assert VOCABULARY.tokens[tok("a purple blob").input_ids[2]] == "<unk>"


def test_a_few_training_steps_lower_the_loss_and_the_model_saves_and_loads(tmp_path):
    pipe = build_pipeline(0)
    config = TrainConfig(batch_size=16, warmup=1)
    losses = _train(pipe, standard_tasks()["broad"], 30, 2e-3, 0.9, config, True, 0, "t", False)
    assert sum(losses[-5:]) < sum(losses[:5])
    pipe.save_pretrained(tmp_path / "model")
    save_unet_file(pipe.unet, tmp_path / "unet.safetensors", torch.float32)
    with open_checkpoint(tmp_path / "model") as folder, open_checkpoint(tmp_path / "unet.safetensors") as file:
        assert folder.layout == "diffusers" and file.layout == "diffusers-unet"
        assert set(folder.keys("unet")) == set(file.keys("unet"))
        assert folder.keys("text_encoder") and not folder.keys("vae")
    loaded = load_pipeline(tmp_path / "model", tmp_path / "unet.safetensors")
    a = pipe(["a red circle, plain", "a blue star, dark"], steps=3, seed=1)
    b = loaded(["a red circle, plain", "a blue star, dark"], steps=3, seed=1)
    assert a.shape == (2, 3, 16, 16) and torch.allclose(a, b, atol=1e-5)
    # an image does not depend on its batch
    c = loaded(["a blue star, dark"] * 3, steps=3, seed=1, batch_size=2)
    assert torch.allclose(c[1], b[1], atol=1e-5)
