"""What `featurefusion methods` prints and docs/methods.md holds: every registered merge method, its options
with their defaults, its cost and its source, written from the registry so the docs cannot drift from the code.
"""

from __future__ import annotations

from featurefusion.merge import registry
from featurefusion.merge.registry import MergeMethodPlugin, cli_fields, default_of

HEADER = """# Merge methods

Written by `featurefusion methods --markdown` from the method registry (`featurefusion/merge/methods/`); a test
keeps this page and the code in step. Every method is one module there; `featurefusion merge --method NAME`
runs it with the flags below, the merged file records the method and its options in its recipe, and
`featurefusion merge --recipe FILE` replays it bit for bit. Task-vector methods work on the differences
delta_m = specialist_m − base and write base + scale · combine(delta).
"""


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _default(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _options_inline(plugin: MergeMethodPlugin) -> str:
    shown = [f"`{_flag(f.name)}` {_default(default_of(f))}" for f in cli_fields(plugin.Options)]
    return ", ".join(shown) or "–"


def methods_markdown() -> str:
    plugins = registry.plugins()
    lines = [HEADER, "| method | what it does | options (default) | source |", "|---|---|---|---|"]
    for p in plugins:
        lines.append(f"| `{p.name}` | {p.summary} | {_options_inline(p)} | {p.source} |")
    for p in plugins:
        lines += ["", f"## {p.name}", "", p.description, ""]
        for f in cli_fields(p.Options):
            lines.append(f"- `{_flag(f.name)}` (default {_default(default_of(f))}): {f.metadata['help']}")
        if p.search_space:
            tried = "; ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in p.search_space.items())
            lines.append(f"- searched by the demo and `featurefusion search`: {tried}")
        lines += [f"- cost: {p.cost}", f"- source: {p.source}"]
    return "\n".join(lines) + "\n"


def methods_text() -> str:
    lines = []
    for p in registry.plugins():
        lines.append(f"{p.name:<16} {p.summary}")
        lines.append(f"{'':<16} options: {_options_inline(p).replace('`', '')}")
    return "\n".join(lines) + "\n"
