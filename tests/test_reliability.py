"""Issue 12, case by case: a hostile but realistic user at the command line. Every case ends in one line
naming the file (and key) with exit code 2, loses nothing the user owns, and leaves no file behind; or, where
the input is legal, gives the right result. Inputs are the built-in world's tiny shipped checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from featurefusion.cli import main
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.merge.operations import statistics_path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "src" / "featurefusion" / "toyworld" / "checkpoints"
BASE = CHECKPOINTS / "base"
SPECIALISTS = CHECKPOINTS / "specialists"
ROUND, DARK, STRIPED = (SPECIALISTS / f"{n}.safetensors" for n in ("objects-round", "style-dark", "style-striped"))
KEY = "conv_in.weight"


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv] + ([] if argv[0] in ("inspect", "recipe", "sample") else ["--no-progress"]))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def fails(argv, capsys, *fragments: str) -> str:
    """The command exits 2 with one line on stderr holding every fragment."""
    rc, _, err = run(argv, capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith(("WARNING", "INFO"))]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("featurefusion: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def with_header(path: Path, header_bytes: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def edited(src: Path, dst: Path, edit) -> Path:
    state = load_file(src)
    edit(state)
    save_file(state, dst)
    return dst


# ---- 1. an existing, non-empty output folder is never deleted ---------------------------------------------
def test_01_existing_output_folder_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("x")
    fails(["merge", BASE, ROUND, "-o", out], capsys, "not empty", "--overwrite", str(out))
    fails(["merge", BASE, ROUND, "-o", out, "--overwrite"], capsys, "holds no diffusers model")
    assert (out / "keep.txt").read_text() == "x" and (out / "sub").is_dir()
    # --overwrite replaces a folder that holds a model, and nothing else beside it
    model = tmp_path / "model"
    assert run(["merge", BASE, ROUND, "-o", model], capsys)[0] == 0
    fails(["merge", BASE, DARK, "-o", model], capsys, "not empty")
    assert run(["merge", BASE, DARK, "-o", model, "--overwrite"], capsys)[0] == 0
    assert (model / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "model", "model.ffstats"])


# ---- 2, 3. every file a command reads is an input for the overlap check ----------------------------------
@pytest.mark.parametrize("target", ["merged", "statistics"])
def test_02_remove_never_overwrites_its_inputs(tmp_path, capsys, target):
    merged = tmp_path / "m.safetensors"
    assert run(["merge", ROUND, DARK, STRIPED, "-o", merged], capsys)[0] == 0
    before = snapshot(tmp_path)
    output = merged if target == "merged" else statistics_path(merged)
    fails(["remove", merged, "2", "-o", output], capsys, "input", str(output))
    assert snapshot(tmp_path) == before


def test_03_input_named_like_the_outputs_statistics(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    lookalike = statistics_path(out)
    shutil.copy(DARK, lookalike)
    before = snapshot(tmp_path)
    fails(["merge", ROUND, lookalike, "-o", out], capsys, "input", str(lookalike))
    assert snapshot(tmp_path) == before


# ---- 4. statistics are tied to their merge -----------------------------------------------------------------
def test_04_statistics_of_another_merge_are_refused(tmp_path, capsys):
    merged = tmp_path / "m.safetensors"
    assert run(["merge", ROUND, DARK, STRIPED, "-o", merged, "--threshold", "0.2"], capsys)[0] == 0
    assert run(["merge", ROUND, DARK, STRIPED, "-o", merged, "--no-statistics"], capsys)[0] == 0
    fails(["remove", merged, "2", "-o", tmp_path / "r.safetensors"], capsys, "--no-statistics")
    # the same with statistics given by hand, or a default merge whose statistics file is the 0.2 one
    argv = ["remove", merged, "2", "-o", tmp_path / "r.safetensors", "--statistics", statistics_path(merged)]
    fails(argv, capsys, "threshold")
    other = tmp_path / "other.safetensors"
    assert run(["merge", ROUND, DARK, STRIPED, "-o", other], capsys)[0] == 0
    shutil.copy(statistics_path(merged), statistics_path(other))
    fails(["remove", other, "2", "-o", tmp_path / "r.safetensors"], capsys, "other options", "threshold")
    assert not (tmp_path / "r.safetensors").exists()


def test_04_statistics_are_tied_to_the_very_model_file(tmp_path, capsys):
    """Same models, same options, another file (here another dtype): the statistics record their model's
    SHA-256, so a file left from the earlier merge is refused."""
    merged = tmp_path / "m.safetensors"
    assert run(["merge", ROUND, DARK, STRIPED, "-o", merged, "--dtype", "fp16"], capsys)[0] == 0
    earlier = statistics_path(merged).read_bytes()
    assert run(["merge", ROUND, DARK, STRIPED, "-o", merged, "--dtype", "fp32"], capsys)[0] == 0
    statistics_path(merged).write_bytes(earlier)
    fails(["remove", merged, "2", "-o", tmp_path / "r.safetensors"], capsys, "another version", str(merged))


def test_04_model_and_statistics_are_published_together(tmp_path, monkeypatch):
    """When the model's rename fails, the statistics already renamed are taken back: neither changes."""
    from featurefusion.merge import operations

    merged = tmp_path / "m.safetensors"
    operations.merge([ROUND, DARK], merged, threshold=0.2)
    before = snapshot(tmp_path)
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append(Path(dst))
        if Path(dst) == merged and len(calls) == 2:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        operations.merge([ROUND, DARK], merged, threshold=0.5)
    monkeypatch.setattr(os, "replace", real)
    assert calls[0] == statistics_path(merged)  # the statistics had been published first
    assert snapshot(tmp_path) == before  # and were taken back; no staging file is left


# ---- 5. nothing is left behind by error paths; stale staging files are swept ------------------------------
def test_05_replay_with_missing_statistics_leaves_nothing(tmp_path, capsys):
    merged, removed = tmp_path / "m.safetensors", tmp_path / "r.safetensors"
    assert run(["merge", ROUND, DARK, STRIPED, "-o", merged], capsys)[0] == 0
    assert run(["remove", merged, "2", "-o", removed], capsys)[0] == 0
    statistics_path(merged).unlink()
    before = snapshot(tmp_path)
    fails(["merge", "--recipe", removed, "-o", tmp_path / "again.safetensors"], capsys, "not found")
    assert snapshot(tmp_path) == before


def test_05_stale_staging_files_of_dead_processes_are_swept(tmp_path, capsys):
    dead = 2**22 + 17  # above the default pid_max: no process has it
    stale = [tmp_path / f".m.safetensors.ffpart-{dead}-0a1b2c3d", tmp_path / f".m.safetensors.{dead}.partial"]
    for path in stale:
        path.write_bytes(b"half a model")
    alive = tmp_path / f".m.safetensors.ffpart-{os.getpid()}-0a1b2c3d"  # a merge that still runs
    alive.write_bytes(b"in progress")
    assert run(["merge", ROUND, DARK, "-o", tmp_path / "m.safetensors", "--method", "soup"], capsys)[0] == 0
    assert not any(p.exists() for p in stale) and alive.exists()


# ---- 6. the safetensors header is validated like the safetensors library does ------------------------------
def _shift(header, key, by):
    header[key]["data_offsets"] = [o + by for o in header[key]["data_offsets"]]


@pytest.mark.parametrize(
    "corruption, message",
    [
        ("negative", "not a byte range"),
        ("overlap", "overlaps"),
        ("duplicate", "appears twice"),
        ("trailing", "not part of any tensor"),
        ("nested", "nested deeper"),
        ("metadata", "__metadata__"),
    ],
)
def test_06_corrupt_headers(tmp_path, capsys, corruption, message):
    header, data = header_of(DARK)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    second = min((k for k in header if k not in ("__metadata__", first)), key=lambda k: header[k]["data_offsets"][0])
    text = None
    if corruption == "negative":
        size = header[first]["data_offsets"][1]
        header[first]["data_offsets"] = [-size, 0]
    elif corruption == "overlap":
        header[second]["data_offsets"] = list(header[first]["data_offsets"])
        header[second].update(dtype=header[first]["dtype"], shape=header[first]["shape"])
    elif corruption == "duplicate":
        body = json.dumps(header)
        text = body[:-1] + f', "{first}": ' + json.dumps(header[first]) + "}"
    elif corruption == "trailing":
        data += b"\0" * 8
    elif corruption == "nested":
        text = json.dumps(header)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif corruption == "metadata":
        header["__metadata__"] = {"format": ["not", "a", "string"]}
    bad = with_header(tmp_path / "bad.safetensors", (text or json.dumps(header)).encode(), data)
    fails(["merge", ROUND, bad, "-o", tmp_path / "m.safetensors"], capsys, message, str(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


# ---- 7. replay verifies inputs by content -------------------------------------------------------------------
def test_07_replay_detects_an_input_changed_in_place(tmp_path, capsys):
    model = tmp_path / "dark.safetensors"
    shutil.copy(DARK, model)
    merged = tmp_path / "m.safetensors"
    assert run(["merge", ROUND, model, "-o", merged, "--method", "soup"], capsys)[0] == 0
    stat = model.stat()
    raw = bytearray(model.read_bytes())
    raw[-3] ^= 0x01  # one weight changes; size kept, mtime set back
    model.write_bytes(bytes(raw))
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fails(["merge", "--recipe", merged, "-o", tmp_path / "again.safetensors"], capsys, "changed", str(model))
    assert not (tmp_path / "again.safetensors").exists()


def test_07_replay_verifies_while_reading(tmp_path):
    """The hash computed from the merge's own reads is the file's SHA-256, whatever order they come in."""
    from featurefusion.io.recipe import file_sha256

    with open_checkpoint(DARK, hash_content=True) as checkpoint:
        for key in reversed(checkpoint.keys()):
            checkpoint.read(key)
        assert checkpoint.content_hash() == file_sha256(DARK)
    with open_checkpoint(BASE, hash_content=True) as checkpoint:
        from featurefusion.io.recipe import model_hash

        assert checkpoint.content_hash() == model_hash(BASE)


# ---- 8. no NaN/Inf reaches the output, whatever the method or cast ----------------------------------------
def test_08_cast_overflow_is_an_error_or_clamped(tmp_path, capsys):
    big = edited(DARK, tmp_path / "big.safetensors", lambda s: s.__setitem__(KEY, s[KEY].float() * 0 + 1e5))
    big = edited(big, big, lambda s: s.update({k: v.float() for k, v in s.items() if v.is_floating_point()}))
    out = tmp_path / "fp16.safetensors"
    fails(["convert", big, "--dtype", "fp16", "-o", out], capsys, "Inf", KEY, "65504")
    assert not out.exists()
    assert run(["convert", big, "--dtype", "fp16", "-o", out, "--overflow", "clamp"], capsys)[0] == 0
    assert load_file(out)[KEY].float().max().item() == 65504.0


def test_08_featurefusion_output_is_checked(tmp_path, capsys):
    def edit(state):
        state[KEY] = state[KEY].float()
        state[KEY][0] = 1e20

    huge = edited(DARK, tmp_path / "huge.safetensors", edit)  # finite, but its squares overflow float32
    fails(["merge", huge, ROUND, "-o", tmp_path / "m.safetensors", "--dtype", "fp32"], capsys, "NaN", KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.safetensors"]


# ---- 9. float/int mismatch refused; fp8 read ---------------------------------------------------------------
def test_09_float_stored_as_integer_is_refused(tmp_path, capsys):
    bad = edited(DARK, tmp_path / "int.safetensors", lambda s: s.__setitem__(KEY, s[KEY].round().to(torch.int64)))
    fails(["merge", ROUND, bad, "-o", tmp_path / "m.safetensors", "--method", "soup"], capsys, "int64", KEY, str(bad))


def test_09_float8_inputs_are_upcast(tmp_path, capsys):
    def edit(state):
        state.update({k: v.to(torch.float8_e4m3fn) for k, v in state.items()})

    fp8 = edited(DARK, tmp_path / "fp8.safetensors", edit)
    out = tmp_path / "m.safetensors"
    assert run(["merge", ROUND, fp8, "-o", out, "--method", "soup", "--dtype", "fp32"], capsys)[0] == 0
    expected = (load_file(ROUND)[KEY].float() + load_file(fp8)[KEY].float()) / 2
    assert torch.allclose(load_file(out)[KEY], expected)


# ---- 10. soup weights are finite with a finite sum ---------------------------------------------------------
@pytest.mark.parametrize("weights", [["1e308", "1e308"], ["nan", "1"], ["inf", "1"]])
def test_10_soup_weights(tmp_path, capsys, weights):
    argv = ["soup", ROUND, DARK, "--weights", *weights, "-o", tmp_path / "s.safetensors"]
    fails(argv, capsys, "soup", "weights", "finite")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", [["--method", "task-arithmetic", "--scale", "nan"], ["--threshold", "inf"]])
def test_10_number_options_are_finite_for_every_method(tmp_path, capsys, option):
    fails(["merge", ROUND, DARK, *option, "-o", tmp_path / "m.safetensors"], capsys, "must be a finite number")
    assert list(tmp_path.iterdir()) == []


# ---- 11. remove writes what the merge recorded -------------------------------------------------------------
def test_11_remove_keeps_the_recorded_format_and_dtype(tmp_path, capsys):
    merged, removed = tmp_path / "m.safetensors", tmp_path / "r.safetensors"
    argv = ["merge", BASE, ROUND, DARK, "-o", merged, "--format", "ldm", "--dtype", "fp16", "--nan", "skip"]
    assert run(argv, capsys)[0] == 0
    assert run(["remove", merged, "2", "-o", removed], capsys)[0] == 0
    with open_checkpoint(removed) as checkpoint:
        assert checkpoint.layout == "ldm"
        assert checkpoint.ref("unet.conv_in.weight").dtype == torch.float16
    assert run(["recipe", removed], capsys)[1].count("nan_policy: skip") == 1


# ---- 12. single-file outputs are safetensors ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["merged.ckpt", "merged.bin", "merged"])
def test_12_single_file_output_names(tmp_path, capsys, name):
    fails(["merge", ROUND, DARK, "-o", tmp_path / name], capsys, ".safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- 13. unknown methods are errors; duplicates are warned about ------------------------------------------
def test_13_unknown_method_in_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"operation: merge\nmethod: frankenmerge\nmodels:\n- path: {ROUND}\n- path: {DARK}\n")
    fails(["merge", "--recipe", recipe, "-o", tmp_path / "m.safetensors"], capsys, "frankenmerge")
    recipe.write_text(f"operation: unlearn\nmethod: soup\nmodels:\n- path: {ROUND}\n- path: {DARK}\n")
    fails(["merge", "--recipe", recipe, "-o", tmp_path / "m.safetensors"], capsys, "unlearn")


def test_13_duplicates_are_warned_about(tmp_path, capsys, caplog):
    soup = tmp_path / "s.safetensors"
    assert run(["soup", ROUND, DARK, ROUND, "-o", soup], capsys)[0] == 0
    assert "same model" in caplog.text
    caplog.clear()
    assert run(["add", soup, DARK, "-o", tmp_path / "a.safetensors"], capsys)[0] == 0
    assert "already a member" in caplog.text


# ---- 14. one line, exit 2, nothing left -------------------------------------------------------------------
def test_14_output_is_a_folder_fails_before_merging(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails(["merge", ROUND, DARK, "-o", tmp_path], capsys, "is a folder")
    fails(["merge", ROUND, DARK, "-o", "."], capsys, "is a folder")
    assert list(tmp_path.iterdir()) == []


def test_14_os_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails(["merge", ROUND, DARK, "-o", blocker / "m.safetensors"], capsys, "not a folder", str(blocker))
    fails(["merge", ROUND, DARK, "-o", "/proc/m.safetensors"], capsys, "/proc")  # no space, read-only
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_14_disk_full_while_writing(tmp_path, capsys, monkeypatch):
    """write(2) fails with ENOSPC and no file name: the error still names the output, and nothing is left."""
    from featurefusion.io import atomic

    opened = atomic.StagedFile.__init__

    def on_a_full_disk(self, target):
        opened(self, target)
        self.file.close()
        self.file = open("/dev/full", "wb")  # noqa: SIM115 - closed by the staged file

    monkeypatch.setattr(atomic.StagedFile, "__init__", on_a_full_disk)
    out = tmp_path / "m.safetensors"
    fails(["merge", ROUND, DARK, "-o", out, "--method", "soup"], capsys, "No space left on device", str(out))
    assert list(tmp_path.iterdir()) == []


def test_14_not_enough_free_space(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    fails(["merge", ROUND, DARK, "-o", tmp_path / "m.safetensors"], capsys, "free space", "MiB")
    assert list(tmp_path.iterdir()) == []


def test_14_corrupt_metadata_and_recipes(tmp_path, capsys):
    merged = tmp_path / "m.safetensors"
    assert run(["merge", ROUND, DARK, STRIPED, "-o", merged], capsys)[0] == 0
    header, data = header_of(merged)
    header["__metadata__"]["featurefusion.recipe"] = "{not json"
    broken = with_header(tmp_path / "broken.safetensors", json.dumps(header).encode(), data)
    fails(["recipe", broken], capsys, "corrupt recipe", str(broken))
    # statistics whose metadata or indices are corrupt
    stats = statistics_path(merged)
    header, data = header_of(stats)
    saved = stats.read_bytes()
    header["__metadata__"]["options"] = "{"
    with_header(stats, json.dumps(header).encode(), data)
    fails(["remove", merged, "2", "-o", tmp_path / "r.safetensors"], capsys, "corrupt statistics", str(stats))
    stats.write_bytes(saved)
    state = load_file(stats)
    index_key = next(k for k in state if k.endswith("::p_index"))
    state[index_key] = state[index_key] + 10**6
    save_file(state, stats, metadata=header_of(Path(stats))[0]["__metadata__"])
    fails(["remove", merged, "2", "-o", tmp_path / "r.safetensors"], capsys, "corrupt statistics", str(stats))
    assert not (tmp_path / "r.safetensors").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(dtype="fp64"), "dtype"),
        (lambda r: r.pop("operation"), "'operation' is missing"),
        (lambda r: r["options"].pop("members"), "members"),
        (lambda r: r.update(models="not a list"), "malformed"),
    ],
)
def test_14_bad_recipes(tmp_path, capsys, edit, message):
    import yaml

    soup = tmp_path / "s.safetensors"
    assert run(["soup", ROUND, DARK, "-o", soup], capsys)[0] == 0
    recipe = yaml.safe_load(run(["recipe", soup], capsys)[1])
    edit(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fails(["merge", "--recipe", path, "-o", tmp_path / "again.safetensors"], capsys, message)
    assert not (tmp_path / "again.safetensors").exists()


def test_14_huge_sample_count(tmp_path, capsys):
    argv = ["merge", ROUND, DARK, "-o", tmp_path / "m.safetensors", "--mode", "sampled", "--samples", "100000000000"]
    fails(argv, capsys, "samples must lie")


# ---- 15. messages say what is wrong ------------------------------------------------------------------------
def test_15_messages(tmp_path, capsys):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    fails(["inspect", fifo], capsys, "FIFO", str(fifo))
    fails(["inspect", "/dev/null"], capsys, "device", "/dev/null")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    fails(["inspect", empty], capsys, "empty file", str(empty))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    argv = ["sample", ROUND, "--prompts", prompts, "--out", tmp_path / "img", "--template", tmp_path / "missing"]
    fails(argv, capsys, "template not found", "missing")


# ---- 16. recipes replay from any working directory --------------------------------------------------------
def test_16_recipe_paths_are_relative_to_the_merged_file(tmp_path, capsys, monkeypatch):
    models, merges = tmp_path / "models", tmp_path / "merges"
    models.mkdir()
    for src in (ROUND, DARK):
        shutil.copy(src, models / src.name)
    monkeypatch.chdir(models)
    merged = merges / "m.safetensors"
    assert run(["merge", ROUND.name, DARK.name, "-o", merged, "--method", "soup"], capsys)[0] == 0
    assert "../models/objects-round.safetensors" in run(["recipe", merged], capsys)[1]
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "models", moved / "models") if moved.mkdir() is None else None
    shutil.move(merges, moved / "merges")
    monkeypatch.chdir(tmp_path)
    again = tmp_path / "again.safetensors"
    assert run(["merge", "--recipe", moved / "merges" / "m.safetensors", "-o", again], capsys)[0] == 0
    assert load_file(again).keys() == load_file(moved / "merges" / "m.safetensors").keys()
