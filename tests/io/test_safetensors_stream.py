import pytest
import torch
from safetensors.torch import load_file, save_file

from featurefusion.errors import CheckpointError
from featurefusion.io.safetensors_stream import (
    AppendingSafetensorsWriter,
    PlannedTensor,
    SafetensorsReader,
    StreamingSafetensorsWriter,
)

TENSORS = {
    "a.weight": torch.randn(4, 3),
    "a.bias": torch.randn(4).half(),
    "ids": torch.arange(5, dtype=torch.int64),
    "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    "empty": torch.zeros(0, 3),
}


def plan(tensors):
    return [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_streamed_file_is_read_by_the_safetensors_library(tmp_path):
    out = tmp_path / "out.safetensors"
    with StreamingSafetensorsWriter(out, plan(TENSORS), {"note": "hi"}) as writer:
        for key, value in TENSORS.items():
            writer.write(key, value)
        writer.commit()
    loaded = load_file(out)
    assert loaded.keys() == TENSORS.keys()
    for key, value in TENSORS.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    with SafetensorsReader(out) as reader:
        assert reader.metadata == {"note": "hi"}


def test_reader_matches_the_safetensors_library(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(TENSORS, path, metadata={"k": "v"})
    with SafetensorsReader(path) as reader:
        assert set(reader.keys()) == set(TENSORS)
        for key, value in TENSORS.items():
            got = reader.read(key)
            assert got.dtype == value.dtype and torch.equal(got, value)
        assert reader.metadata == {"k": "v"}


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError), StreamingSafetensorsWriter(out, plan(TENSORS)) as writer:
        writer.write("a.weight", TENSORS["a.weight"])
        raise ValueError("merge failed")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    with StreamingSafetensorsWriter(tmp_path / "o.safetensors", plan(TENSORS)) as writer:
        with pytest.raises(RuntimeError, match="expected 'a.weight'"):
            writer.write("a.bias", TENSORS["a.bias"])
    assert list(tmp_path.iterdir()) == []


def test_commit_before_all_tensors_fails_and_cleans_up(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path / "o.safetensors", plan(TENSORS))
    writer.write("a.weight", TENSORS["a.weight"])
    with pytest.raises(RuntimeError, match="a.bias"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_names_file_and_key(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"first": torch.zeros(10), "second": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        SafetensorsReader(path)
    assert err.value.path == str(path) and err.value.key == "second"


@pytest.mark.parametrize("payload", [b"", b"\x01\x02", b"\xff" * 8 + b"{}", b"\x05\x00\x00\x00\x00\x00\x00\x00nope!"])
def test_corrupt_files_are_rejected(tmp_path, payload):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError) as err:
        SafetensorsReader(path)
    assert str(path) in str(err.value)


def test_appending_writer_round_trip(tmp_path):
    out = tmp_path / "side.safetensors"
    writer = AppendingSafetensorsWriter(out, {"m": "1"})
    for key, value in TENSORS.items():
        writer.write(key, value)
    writer.commit()
    loaded = load_file(out)
    assert all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side.safetensors"]
