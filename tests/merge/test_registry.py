"""The method registry: one source for the CLI, recipes, replay and docs."""

import json
from pathlib import Path

import pytest

from featurefusion.cli import main
from featurefusion.errors import RecipeError
from featurefusion.io.checkpoint import open_checkpoint
from featurefusion.io.recipe import Recipe, recipe_of
from featurefusion.merge import operations, registry
from featurefusion.merge.catalogue import methods_markdown

DOCS = Path(__file__).parents[2] / "docs" / "methods.md"


def test_every_method_of_the_issue_is_registered():
    expected = {"featurefusion", "soup", "task-arithmetic", "ties", "dare", "dare-ties", "tsv", "iso-c", "iso-cts",
                "block-weighted"}  # fmt: skip
    assert expected <= set(registry.names())


def test_docs_methods_page_is_the_registry_s_own_description():
    assert DOCS.read_text() == methods_markdown(), "run `featurefusion methods --markdown > docs/methods.md`"


def test_cli_flags_come_from_the_registry_and_reach_the_recipe(tiny, tmp_path, capsys):
    out = tmp_path / "ties.safetensors"
    argv = ["merge", *map(str, tiny.models), "-o", str(out), "--method", "ties", "--density", "0.3", "--scale", "0.8"]
    assert main(argv) == 0
    with open_checkpoint(out) as ckpt:
        recipe = recipe_of(ckpt.metadata, out)
    assert (recipe.method, recipe.options) == ("ties", {"density": 0.3, "scale": 0.8})
    capsys.readouterr()
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in registry.names())


def test_a_flag_of_another_method_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "soup.safetensors"
    assert main(["merge", *map(str, tiny.models), "-o", str(out), "--method", "soup", "--density", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--density is not an option of soup (it applies to ties, dare, dare-ties)" in err
    assert not out.exists()


def test_a_recipe_with_an_unknown_method_is_refused_not_replayed_as_another(tiny, tmp_path):
    first = tmp_path / "soup.safetensors"
    operations.merge(tiny.models, first, "soup")
    with open_checkpoint(first) as ckpt:
        data = json.loads(ckpt.metadata["featurefusion.recipe"])
    data["method"] = "frankenmerge"
    with pytest.raises(RecipeError, match="unknown merge method 'frankenmerge'"):
        operations.replay(Recipe.from_dict(data), tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()


def test_every_method_describes_itself():
    for plugin in registry.plugins():
        for attribute in ("name", "title", "summary", "source", "cost"):
            assert getattr(plugin, attribute), f"{plugin.name}: {attribute}"
        assert plugin.description, plugin.name
