import pytest
from distill_fixtures import *  # noqa: F403 (the fixtures backbone, teachers)

from featurefusion.distill.backbone import DistillError
from featurefusion.distill.data import ToyWorldData, ToyWorldTeacherData, open_data
from featurefusion.errors import FeatureFusionError
from featurefusion.toyworld.world import parse_prompt


def test_teacher_data_draws_half_of_a_specialists_batch_from_its_task(backbone):
    data = open_data("toyworld:teachers", backbone, names=["base", "style-dark"])
    assert isinstance(data, ToyWorldTeacherData)
    dark = data.batch(backbone, seed=3, size=8, teacher=1)
    assert all(parse_prompt(p).style == "dark" for p in dark.prompts[:4])
    assert dark.x0.shape == (8, 3, 16, 16)
    base = data.batch(backbone, seed=3, size=8, teacher=0)  # the base has no task of its own: uniform data
    assert base.prompts == ToyWorldTeacherData([], 0.5).batch(backbone, 3, 8).prompts
    assert all(parse_prompt(p).style == "dark" for p in data.prompts(8, seed=1, teacher=1)[:4])


def test_data_specs(backbone, tmp_path):
    assert isinstance(open_data(None, backbone), ToyWorldData)
    assert open_data("toyworld:style-dark", backbone).description == "toyworld:style-dark"
    with pytest.raises(DistillError, match="unknown built-in task"):
        open_data("toyworld:nope", backbone)
    with pytest.raises(DistillError, match="share"):
        open_data("toyworld:teachers:x", backbone)
    with pytest.raises(FeatureFusionError, match="no images"):
        open_data(str(tmp_path), backbone)
