"""Keyword-scored shards: scoring, ranking, splits, the local-folder and datasets paths, errors, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from datasets import Dataset, Features, Value, load_dataset
from datasets import Image as ImageFeature
from PIL import Image

from featurefusion.cli import main
from featurefusion.errors import DataError
from featurefusion.train.keywords import KeywordScorer, load_categories
from featurefusion.train.shard import ShardOptions, shard_folder, shard_hf_dataset, split_rows
from featurefusion.train.sources import read_captioned_folder

CATEGORIES = {"animals": ["cat", "dog", "bird"], "food": ["pizza", "cake", "ice cream"]}


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def png_bytes(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), colour(i)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def categories(tmp_path) -> Path:
    path = tmp_path / "categories.yaml"
    path.write_text("\n".join(f"{name}: [{', '.join(words)}]" for name, words in CATEGORIES.items()))
    return path


def make_folder(root: Path, captions: list[str], sidecar: set[int] = frozenset()) -> Path:
    """Image i has colour(i); its caption is in metadata.jsonl, or in a .txt sidecar for i in `sidecar`."""
    root.mkdir(parents=True)
    rows = []
    for i, caption in enumerate(captions):
        (root / f"img{i:02d}.png").write_bytes(png_bytes(i))
        if i in sidecar:
            (root / f"img{i:02d}.txt").write_text(caption)
        else:
            rows.append(json.dumps({"file_name": f"img{i:02d}.png", "caption": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def options(**overrides) -> ShardOptions:
    return ShardOptions(**{"k": 3, "test_fraction": 0.0, "progress": False, **overrides})


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def ids(out: Path, category: str, split: str) -> list[str]:
    lines = (out / category / split / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line)["source_id"] for line in lines]


# ---- scoring -------------------------------------------------------------------------------------------


def test_score_counts_distinct_whole_word_keywords_with_plurals():
    scorer = KeywordScorer(load_categories(None))
    names = [c.name for c in load_categories(None)]
    assert names == ["food", "electronics", "body_parts", "animals", "text", "vehicles", "clothing"]
    scores = dict(zip(names, scorer.score("Two CATS and a dog, a cat, eating Pizza"), strict=True))
    assert (scores["animals"].score, scores["animals"].occurrences) == (2, 3)
    assert scores["animals"].hits == ("cat", "dog")
    assert scores["food"].score == 1 and scores["vehicles"] is None
    assert all(s is None for s in scorer.score("a catalogue of cathedrals and carpets"))
    vehicles = scorer.score("a red sports car next to buses")[names.index("vehicles")]
    assert set(vehicles.hits) == {"sports car", "car", "bus"}


def test_categories_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("food: []\n")
    with pytest.raises(DataError, match="no keywords.*bad.yaml"):
        load_categories(bad)
    bad.write_text("'has space': [x]\n")
    with pytest.raises(DataError, match="folder name"):
        load_categories(bad)
    as_json = tmp_path / "cats.json"
    as_json.write_text(json.dumps({"categories": {"Vehicles": ["Sports Car", "sports-car"]}}))
    assert load_categories(as_json)[0].keywords == ("sports car",)
    with pytest.raises(DataError, match="not found"):
        load_categories(tmp_path / "missing.yaml")


# ---- ranking, overlap, splits --------------------------------------------------------------------------

CAPTIONS = [
    "a cat",  # 0 animals 1
    "a cat and a dog",  # 1 animals 2
    "a cat, a dog and a bird",  # 2 animals 3
    "a dog and a dog",  # 3 animals 1 (2 hits)
    "pizza",  # 4 food 1
    "a cat eating pizza",  # 5 tie 1-1: the first listed category (animals)
    "a dog eating pizza and cake",  # 6 food 2 > animals 1
    "a landscape",  # 7 nothing
    "A Cat.",  # 8 the same prompt as 0 once normalised
    "ice cream and cake",  # 9 food 2
]


def test_top_k_ranking_and_best_category(tmp_path, categories):
    folder = make_folder(tmp_path / "src", CAPTIONS, sidecar={3, 9})
    out = tmp_path / "out"
    result = shard_folder(folder, out, categories, options=options(k=3))
    # animals: 2 (3 kw) > 1 (2 kw) > 3 (1 kw, 2 hits) > 0 > 5 (1 kw, 1 hit, later row); 8 is a duplicate of 0
    assert ids(out, "animals", "train") == ["img02.png", "img01.png", "img03.png"]
    # food: 6 and 9 have 2 keywords (6 first in source order), then 4; 5 went to animals (tie)
    assert ids(out, "food", "train") == ["img06.png", "img09.png", "img04.png"]
    assert result.counts["animals"] == {"candidates": 5, "train": 3, "test": 0, "skipped_images": 0}
    assert result.rows_scanned == len(CAPTIONS)
    data = manifest(out)
    first = next(item for item in data["items"] if item["file"] == "animals/train/00000.png")
    assert first["score"] == 3 and first["hits"] == ["cat", "dog", "bird"] and first["source_id"] == "img02.png"
    assert data["categories"] == CATEGORIES and data["k"] == 3 and data["overlap"] == "best"
    # The copied image is the source image, byte for byte.
    assert (out / "animals" / "train" / "00000.png").read_bytes() == (folder / "img02.png").read_bytes()


def test_overlap_all_and_duplicates_kept(tmp_path, categories):
    folder = make_folder(tmp_path / "src", CAPTIONS)
    out = tmp_path / "out"
    shard_folder(folder, out, categories, options=options(k=10, overlap="all", dedupe_captions=False))
    animals, food = ids(out, "animals", "train"), ids(out, "food", "train")
    assert "img05.png" in animals and "img05.png" in food and "img06.png" in animals
    assert animals.index("img00.png") < animals.index("img08.png")  # equal scores: source order
    assert len(animals) == 7 and len(food) == 4


def test_limit_scans_only_the_first_rows(tmp_path, categories):
    folder = make_folder(tmp_path / "src", CAPTIONS)
    result = shard_folder(folder, tmp_path / "out", categories, options=options(k=10, limit=5))
    assert result.rows_scanned == 5
    assert ids(tmp_path / "out", "food", "train") == ["img04.png"]  # rows 6 and 9 were not read


def test_split_is_deterministic_disjoint_and_sized():
    train, test = split_rows(10, 0.3, seed=0, category="food")
    assert len(test) == 3 and sorted(train + test) == list(range(10))
    assert split_rows(10, 0.3, seed=0, category="food") == (train, test)
    assert split_rows(10, 0.3, seed=1, category="food") != (train, test)
    assert split_rows(1, 0.5, 0, "x") == ([0], [])  # train keeps at least one item


def test_shards_are_deterministic_and_loadable(tmp_path, categories):
    captions = [f"a cat number {i}" for i in range(8)] + [f"pizza {i}" for i in range(4)]
    folder = make_folder(tmp_path / "src", captions)
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        shard_folder(folder, out, categories, options=options(k=8, test_fraction=0.25, seed=3))
    assert manifest(first) == manifest(second)
    assert manifest(first)["counts"]["animals"] == {"candidates": 8, "train": 6, "test": 2, "skipped_images": 0}
    files = sorted(p.relative_to(first) for p in first.rglob("*"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files if (first / f).is_file())
    train_ids = set(ids(first, "animals", "train"))
    assert not train_ids & set(ids(first, "animals", "test"))
    # A split folder is itself a captioned folder.
    items = read_captioned_folder(first / "animals" / "test")
    assert len(items) == 2 and all(item.caption.startswith("a cat number") for item in items)
    loaded = load_dataset("imagefolder", data_dir=str(first / "animals" / "test"), cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded["train"]["text"]) == sorted(item.caption for item in items)


# ---- the datasets path ---------------------------------------------------------------------------------


def test_hf_dataset_map_style_and_streaming_agree(tmp_path, categories):
    captions = ["a cat", "a dog and a cat", "pizza and cake", "nothing here", "cake"]
    images = [Image.new("RGB", (4, 4), colour(i)) for i in range(len(captions))]
    dataset = Dataset.from_dict(
        {"caption": captions, "image": images}, features=Features({"caption": Value("string"), "image": ImageFeature()})
    )
    outs = {}
    for name, ds in (("map", dataset), ("stream", dataset.to_iterable_dataset())):
        outs[name] = tmp_path / name
        shard_hf_dataset(
            ds, outs[name], "local", image_columns=("image",), categories_file=categories, options=options(k=2)
        )
    assert ids(outs["map"], "animals", "train") == ["1", "0"]
    assert ids(outs["map"], "food", "train") == ["2", "4"]
    assert manifest(outs["map"])["items"] == manifest(outs["stream"])["items"]
    assert manifest(outs["stream"])["source"]["streaming"] is True
    with Image.open(outs["map"] / "animals" / "train" / "00000.png") as image:
        assert image.getpixel((0, 0)) == colour(1)


def test_pickapic_layout_takes_the_preferred_image(tmp_path, categories):
    dataset = Dataset.from_dict(
        {
            "caption": ["a cat", "a dog", "pizza"],
            "jpg_0": [png_bytes(0), png_bytes(1), png_bytes(2)],
            "jpg_1": [png_bytes(10), png_bytes(11), png_bytes(12)],
            "label_0": [0.0, 1.0, 0.5],
            "label_1": [1.0, 0.0, 0.5],
        }
    )
    out = tmp_path / "out"
    shard_hf_dataset(
        dataset,
        out,
        name="pickapic-like",
        image_columns=("jpg_0", "jpg_1"),
        label_columns=("label_0", "label_1"),
        categories_file=categories,
        options=options(k=5),
    )
    expected = {"animals": [10, 1], "food": [2]}  # row 0 prefers jpg_1; row 1 jpg_0; a tie takes jpg_0
    for category, colours in expected.items():
        for number, i in enumerate(colours):
            with Image.open(out / category / "train" / f"{number:05d}.png") as image:
                assert image.getpixel((0, 0)) == colour(i)
    with pytest.raises(DataError, match="no column jpg_9"):
        shard_hf_dataset(dataset, tmp_path / "x", name="p", image_columns=("jpg_9",), categories_file=categories)


# ---- errors and atomic output --------------------------------------------------------------------------


def test_missing_folder_and_bad_metadata(tmp_path, categories):
    with pytest.raises(DataError, match="no such folder.*nowhere"):
        shard_folder(tmp_path / "nowhere", tmp_path / "out", categories)
    folder = make_folder(tmp_path / "src", ["a cat"])
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "caption": "a dog"}) + "\n")
    with pytest.raises(DataError, match="gone.png.*metadata.jsonl"):
        read_captioned_folder(folder)
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text\nimg00.png,a bird\n")
    assert [i.caption for i in read_captioned_folder(folder)] == ["a bird"]


def test_unreadable_image_errors_leave_nothing_or_are_skipped(tmp_path, categories):
    folder = make_folder(tmp_path / "src", ["a cat and a dog", "a cat", "a dog", "pizza"])
    (folder / "img00.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="unreadable image.*img00.png"):
        shard_folder(folder, out, categories, options=options(k=2))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    result = shard_folder(folder, out, categories, options=options(k=2, on_bad_image="skip"))
    assert ids(out, "animals", "train") == ["img01.png", "img02.png"]  # the next candidate filled the gap
    assert result.counts["animals"]["skipped_images"] == 1


def test_empty_category_and_existing_output(tmp_path, categories):
    folder = make_folder(tmp_path / "src", ["a cat", "a dog"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="food.*categories.yaml"):
        shard_folder(folder, out, categories, options=options())
    assert not out.exists()
    (folder / "img01.txt").write_text("pizza")  # metadata wins over a sidecar: still no food
    with pytest.raises(DataError, match="no caption matched category food"):
        shard_folder(folder, out, categories, options=options())
    folder = make_folder(tmp_path / "src2", ["a cat", "pizza"])
    shard_folder(folder, out, categories, options=options())
    with pytest.raises(DataError, match="already exists"):
        shard_folder(folder, out, categories, options=options())
    shard_folder(folder, out, categories, options=options(k=1, overwrite=True))
    assert manifest(out)["k"] == 1
    with pytest.raises(DataError, match="outside the source"):
        shard_folder(folder, folder / "shards", categories, options=options())


def test_cli_shard(tmp_path, categories, capsys):
    folder = make_folder(tmp_path / "src", CAPTIONS)
    out = tmp_path / "out"
    argv = ["shard", "--folder", str(folder), "-o", str(out), "--categories", str(categories), "-k", "4"]
    assert main([*argv, "--test-fraction", "0.25", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "animals: 3 train, 1 test" in printed
    assert main([*argv, "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
