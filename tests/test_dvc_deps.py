"""dvc.yaml's code deps are exact: every project module a stage's flow imports, directly or through others (imports
inside functions included), is a dep of that stage, and no listed module is one it does not import. A changed loss,
network or loop must rerun the stages it feeds; `dvc repro` saying "up to date" over stale checkpoints is a bug.

`python -m tests.test_dvc_deps` prints the lists dvc.yaml should hold.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "components", "flows")
# Lineage and metric logging only: they never change what a stage computes, and every stage imports them, so a
# change there would rerun the whole pipeline for nothing. (The registry is the register stage's own work: listed.)
TRACKING_ONLY = {"components/track/tracking.py"}


def module_file(name: str, root: Path = ROOT) -> str | None:
    """The project file of a dotted module name (package __init__ included), or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def direct_imports(file: str, root: Path = ROOT) -> set[str]:
    """Project files that `file` imports anywhere in its body (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse((root / file).read_text(), file)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from components.data import oracle` imports a module; `from model.llama import Transformer` a name.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                if (f := module_file(".".join(parts[:i]), root)) is not None:
                    found.add(f)
    return found


def stage_modules(entry: str, root: Path = ROOT) -> set[str]:
    """Every project file the entry file imports transitively, itself included; empty package __init__ files and
    tracking-only modules (and what only they import) left out."""
    seen, todo = set(), [entry]
    while todo:
        file = todo.pop()
        if file in seen or file in TRACKING_ONLY:
            continue
        seen.add(file)
        todo += direct_imports(file, root)
    return {f for f in seen if not (f.endswith("__init__.py") and not (root / f).read_text().strip())}


def stage_code_deps(root: Path = ROOT) -> dict[str, tuple[set[str], set[str]]]:
    """stage -> (the .py deps dvc.yaml lists, the project modules its command imports)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    result = {}
    for name, spec in stages.items():
        spec = spec.get("do", spec)  # a foreach stage (one per round): its template, as written
        module = spec["cmd"].removeprefix("python -m ").split()[0]
        entry = module_file(module, root)
        assert entry, f"stage {name}: cannot find the module of {spec['cmd']!r}"
        listed = {d for d in spec.get("deps", []) if d.endswith(".py")}
        result[name] = (listed, stage_modules(entry, root))
    return result


def test_every_imported_module_is_a_dep():
    problems = []
    for stage, (listed, imported) in stage_code_deps().items():
        if missing := sorted(imported - listed):
            problems.append(f"{stage}: missing {missing}")
        if extra := sorted(listed - imported):
            problems.append(f"{stage}: lists modules it does not import {extra}")
    assert not problems, "dvc.yaml deps are out of date (python -m tests.test_dvc_deps prints them):\n" + \
        "\n".join(problems)


def test_foreach_stages_are_checked_and_rewritten(tmp_path):
    """A per-round stage (DVC foreach) keeps cmd and deps under `do:`: its deps are checked and --write regenerates
    them, templated data deps (quoted: `${` is not a plain YAML scalar in a flow list) kept."""
    for folder in ("flows", "components"):
        (tmp_path / folder).mkdir()
    (tmp_path / "components/common.py").write_text("X = 1\n")
    (tmp_path / "flows/prefs.py").write_text("from components.common import X\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  prefs:\n    foreach: ${rlhf.rounds}\n    do:\n      cmd: python -m flows.prefs ${key}\n"
        "      deps: [flows/prefs.py, \"${item.policy}\", data/raw]\n      outs: [\"data/rounds/${key}/p.parquet\"]\n")
    assert stage_code_deps(tmp_path)["prefs"] == ({"flows/prefs.py"}, {"flows/prefs.py", "components/common.py"})
    write_deps(tmp_path)
    text = (tmp_path / "dvc.yaml").read_text()
    assert '      deps: [flows/prefs.py, components/common.py, "${item.policy}", data/raw]\n' in text
    spec = yaml.safe_load(text)["stages"]["prefs"]
    assert spec["do"]["deps"] == ["flows/prefs.py", "components/common.py", "${item.policy}", "data/raw"]
    assert spec["foreach"] == "${rlhf.rounds}"


def test_the_analysis_sees_function_level_and_transitive_imports():
    """A stage that imports a loop inside a function still depends on the network that loop builds."""
    sft = stage_modules("flows/sft.py")
    assert {"model/llama.py", "model/loss.py", "components/train/lm.py", "components/data/datasets.py"} <= sft
    assert "components/track/tracking.py" not in sft


def write_deps(root: Path = ROOT, width: int = 118) -> None:
    """Rewrite each stage's `deps: [...]` in dvc.yaml: its flows/ files, then the other modules it imports (sorted),
    then its data deps as they were. Comments and everything else stay as they are."""
    import re

    text = (root / "dvc.yaml").read_text()
    stages = yaml.safe_load(text)["stages"]
    code = stage_code_deps(root)
    out, stage = [], None
    lines = iter(text.splitlines())
    for line in lines:
        if m := re.match(r"^  (\w+):\s*$", line):
            stage = m.group(1)
        if stage in stages and (m := re.match(r"^( {4}| {6})deps: \[", line)):  # a stage's, or a foreach's `do:`
            while not line.rstrip().endswith("]"):
                line = next(lines)
            modules = sorted(code[stage][1], key=lambda f: (not f.startswith("flows/"), f))
            data = [d for d in stages[stage].get("do", stages[stage])["deps"] if not d.endswith(".py")]
            out += _wrapped(f"{m.group(1)}deps: [", modules + [f'"{d}"' if "${" in d else d for d in data], width)
            continue
        out.append(line)
    (root / "dvc.yaml").write_text("\n".join(out) + "\n")


def _wrapped(head: str, items: list[str], width: int) -> list[str]:
    lines, line = [], head
    for i, item in enumerate(items):
        piece = item + ("]" if i == len(items) - 1 else ",")
        if len(line) + len(piece) + 1 > width and line.strip() not in (head.strip(),):
            lines.append(line.rstrip())
            line = " " * len(head) + piece
        else:
            line += ("" if line.endswith("[") else " ") + piece
    return lines + [line]


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        write_deps()
    for stage, (_, imported) in stage_code_deps().items():
        print(f"{stage}: {sorted(imported)}")
