"""docs/compatibility.md stays true: every host name our code uses is in its table.

The pack's own source (every .py outside tests/ and the test helpers in testing/) is parsed; each name it takes from a host module
(``import comfy.sample`` then ``comfy.sample.prepare_noise``, ``from comfy_api.latest import io``
then ``io.Int.Input``, ...) must be covered by a table row: the row's ``module.name`` equal to the
used name or a dotted prefix of it. No ComfyUI is needed: this reads text.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "compatibility.md"

# Top-level modules that belong to the ComfyUI host (not to torch or to this pack).
HOST_MODULES = {"comfy", "comfy_api", "comfy_api_nodes", "comfy_extras", "comfy_execution", "comfy_config",
                "folder_paths", "latent_preview", "nodes", "node_helpers", "server", "execution", "main",
                "comfyui_version", "app", "protocol", "cuda_malloc", "hook_breaker_ac10a0", "new_updater"}
SKIP_DIRS = {"tests", "testing", ".git", "__pycache__", ".venv", ".gpu-host", ".whl", "node_modules", "test-artifacts"}


def our_sources() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def host_names(path: Path) -> set[str]:
    """Dotted host names ``path`` uses (longest attribute chains off a host import)."""
    tree = ast.parse(path.read_text(), str(path))
    bound: dict[str, str] = {}  # local name -> dotted host name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in HOST_MODULES:
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        root = alias.name.split(".")[0]
                        bound[root] = root
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in HOST_MODULES:
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    used, probed = set(), set()
    for node in ast.walk(tree):  # hasattr(module, "name") / getattr(module, "name", ...) use module.name
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            chain = _chain(node.args[0])
            if chain and chain[0] in bound:
                used.add(".".join([bound[chain[0]]] + chain[1:] + [node.args[1].value]))
                probed.add(node.args[0])
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Attribute, ast.Name)) or node in probed:
            continue
        if isinstance(parents.get(node), ast.Attribute):
            continue  # only the longest chain
        chain = _chain(node)
        if chain and chain[0] in bound:
            used.add(".".join([bound[chain[0]]] + chain[1:]))
    # a module imported but used only through from-imports or not at all is not a use of a name
    return {name for name in used if name.split(".")[0] in HOST_MODULES}


def name_rows() -> list[list[str]]:
    """The cells of the table rows that name a host API: ``module | name | ...``."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and re.fullmatch(r"[\w.]+", cells[0] or "-") \
                and cells[0].split(".")[0] in HOST_MODULES and re.fullmatch(r"[\w.]+", cells[1]):
            rows.append(cells)
    return rows


def documented() -> set[str]:
    return {f"{cells[0]}.{cells[1]}" for cells in name_rows()}


def covered(name: str, rows: set[str]) -> bool:
    return any(name == row or name.startswith(row + ".") for row in rows)


def test_every_host_name_the_pack_uses_is_in_the_compatibility_table():
    rows = documented()
    missing = {}
    for path in our_sources():
        for name in host_names(path):
            if not covered(name, rows):
                missing.setdefault(name, []).append(str(path.relative_to(REPO)))
    assert not missing, ("host names used but not in docs/compatibility.md (add a row: module, name, how we call "
                         "it, versions checked): " + "; ".join(f"{n} ({', '.join(p)})" for n, p in sorted(missing.items())))


def test_the_scanner_sees_the_kinds_of_use_the_pack_has(tmp_path):
    """The check can fail: a module-level import, a from-import, an alias and a lazy import are all seen."""
    source = tmp_path / "example.py"
    source.write_text(
        "import comfy.sample\nimport comfy.patcher_extension as pe\nfrom comfy_api.latest import io\n"
        "import torch\n"
        "def f(model):\n"
        "    import folder_paths\n"
        "    comfy.sample.prepare_noise(model, 1)\n"
        "    x = pe.WrappersMP.APPLY_MODEL\n"
        "    folder_paths.get_full_path('a', 'b')\n"
        "    hasattr(comfy.sample, 'newer_function')\n"
        "    torch.zeros(1)\n"
        "    return io.Int.Input('x')\n")
    assert host_names(source) == {"comfy.sample.prepare_noise", "comfy.patcher_extension.WrappersMP.APPLY_MODEL",
                                  "comfy_api.latest.io.Int.Input", "folder_paths.get_full_path",
                                  "comfy.sample.newer_function"}
    assert covered("comfy_api.latest.io.Int.Input", {"comfy_api.latest.io"})
    assert not covered("comfy.sample.prepare_noise", {"comfy.sample.prepare"})


def test_the_table_names_versions_for_every_row():
    rows = name_rows()
    assert len(rows) > 20
    for cells in rows:
        assert len(cells) >= 6 and all(cells[:6]), cells
        assert "0.3.64" in cells[3], cells


def _versions_paragraph() -> str:
    text = DOC.read_text()
    start = text.index("**Versions.**")
    return text[start:text.index("\n\n", start)]


def test_the_newest_host_read_is_named_with_its_version_number():
    """'the 0.38 line' is not enough: the doc gives the newest host's full version, newer than the oldest."""
    paragraph = _versions_paragraph()
    newest = paragraph[paragraph.index("*Newest*"):]
    versions = [tuple(int(part) for part in found) for found in re.findall(r"\bv?(\d+)\.(\d+)\.(\d+)\b", newest)]
    assert versions, "the *Newest* sentence names no version number (e.g. v0.38.1)"
    assert max(versions) > (0, 3, 64), versions
    assert re.search(r"@ `[0-9a-f]{8}`", newest), "the newest version names the commit it was read at"
