"""The sweep's dimensions: ``--vary NODE.INPUT=v1,v2,...`` read against the workflow, and the values
checked against the ranges and choices a server declares."""

from __future__ import annotations

import json
import math
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote

from . import SweepError


@dataclass(frozen=True)
class Axis:
    node: str  # the node's id in the prompt
    input: str
    values: tuple
    label: str  # what the grid, the CSV and the plot call it

    def key(self, value) -> str:
        return f"{self.node}.{self.input}={value}"


def node_names(prompt: dict) -> str:
    return ", ".join(f"{i} ({n.get('_meta', {}).get('title') or n['class_type']})" for i, n in prompt.items())


def find_node(prompt: dict, name: str, spec: str) -> str:
    """The id of the node called ``name``: its id, else its title, else its class type (when unique)."""
    if name in prompt:
        return name
    for what in (lambda n: n.get("_meta", {}).get("title"), lambda n: n.get("class_type")):
        hits = [i for i, n in prompt.items() if what(n) == name]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise SweepError(f"--vary {spec}: {len(hits)} nodes are called {name!r} (ids {', '.join(hits)}); "
                             "name the node by its id instead.")
    raise SweepError(f"--vary {spec}: the workflow has no node {name!r}; its nodes (id and title): "
                     f"{node_names(prompt)}.")


def _range(text: str, cast):
    """``a..b`` (inclusive, step 1) or ``a..b:step``."""
    bounds, _, step = text.partition(":")
    lo, hi = (cast(x) for x in bounds.split(".."))
    step = cast(step) if step else cast(1)
    if step <= 0:
        raise ValueError(f"step {step} must be positive")
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    return [cast(lo + i * step) for i in range(max(n, 0))]


def _cast_for(current):
    if isinstance(current, bool):
        return lambda s: {"true": True, "false": False, "1": True, "0": False}[s.strip().lower()]
    if isinstance(current, int):
        return lambda s: int(s)
    if isinstance(current, float):
        return lambda s: float(s)
    return lambda s: s


def parse_values(text: str, current) -> tuple:
    """``v1,v2,...`` (each may be a range ``a..b`` or ``a..b:step``), typed like the current value."""
    cast = _cast_for(current)
    values = []
    for part in text.split(","):
        if ".." in part and isinstance(current, (int, float)) and not isinstance(current, bool):
            values += _range(part, cast)
        else:
            values.append(cast(part))
    return tuple(values)


def parse_axes(prompt: dict, specs: list[str]) -> list[Axis]:
    """The sweep's dimensions, checked against the workflow before any server is asked for anything."""
    axes: list[Axis] = []
    for spec in specs:
        target, eq, text = spec.partition("=")
        if not eq or not target or not text:
            raise SweepError(f"--vary {spec}: write NODE.INPUT=v1,v2,... (NODE is the node's id or title).")
        if "." in target:
            name, input_name = target.rsplit(".", 1)
            node_id = find_node(prompt, name, spec)
        else:  # a bare input name: the one node with that widget input
            input_name = target
            hits = [i for i, n in prompt.items() if input_name in n.get("inputs", {})
                    and not isinstance(n["inputs"][input_name], list)]
            if len(hits) != 1:
                raise SweepError(f"--vary {spec}: {len(hits) or 'no'} node(s) have a widget input {input_name!r}"
                                 + (f" (ids {', '.join(hits)})" if hits else "") + "; write NODE.INPUT=v1,v2,... "
                                 "(NODE is the node's id or title).")
            node_id = hits[0]
        node = prompt[node_id]
        inputs = node.get("inputs", {})
        if input_name not in inputs:
            widgets = ", ".join(k for k, v in inputs.items() if not isinstance(v, list))
            raise SweepError(f"--vary {spec}: node {node_id} ({node['class_type']}) has no input {input_name!r}; "
                             f"its widget inputs: {widgets or 'none'}.")
        if isinstance(inputs[input_name], list):
            raise SweepError(f"--vary {spec}: input {input_name!r} of node {node_id} ({node['class_type']}) is a "
                             "link from another node, not a widget value; vary a widget input.")
        try:
            values = parse_values(text, inputs[input_name])
        except (ValueError, KeyError) as e:
            raise SweepError(f"--vary {spec}: cannot read the values {text!r} as "
                             f"{type(inputs[input_name]).__name__} ({e}).") from None
        if not values:
            raise SweepError(f"--vary {spec}: no values.")
        if len(set(values)) != len(values):
            raise SweepError(f"--vary {spec}: a value is given twice.")
        if any(a.node == node_id and a.input == input_name for a in axes):
            raise SweepError(f"--vary {spec}: node {node_id} input {input_name!r} is varied twice.")
        axes.append(Axis(node_id, input_name, values, input_name))
    labels = [a.input for a in axes]
    return [a if labels.count(a.input) == 1 else Axis(a.node, a.input, a.values, f"{a.node}.{a.input}")
            for a in axes]


def check_against_server(url: str, prompt: dict, axes: list[Axis]) -> None:
    """Each varied value within the input's range or choices, as the server's /object_info declares them."""
    for axis in axes:
        class_type = prompt[axis.node]["class_type"]
        with urllib.request.urlopen(f"{url.rstrip('/')}/object_info/{quote(class_type)}", timeout=60) as r:
            info = json.loads(r.read()).get(class_type)
        if info is None:
            raise SweepError(f"the server at {url} has no node type {class_type} (node {axis.node}); "
                             "is the pack installed there?")
        declared = {**info.get("input", {}).get("required", {}), **info.get("input", {}).get("optional", {})}
        spec = declared.get(axis.input)
        if spec is None:
            raise SweepError(f"--vary {axis.node}.{axis.input}: {class_type} on {url} has no input {axis.input!r}.")
        kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        for v in axis.values:
            if choices is not None and v not in choices:
                raise SweepError(f"--vary {axis.node}.{axis.input}: {v!r} is not one of {choices}.")
            if kind in ("INT", "FLOAT") and (("min" in options and v < options["min"])
                                             or ("max" in options and v > options["max"])):
                raise SweepError(f"--vary {axis.node}.{axis.input}: {v} is outside "
                                 f"[{options.get('min')}, {options.get('max')}].")
