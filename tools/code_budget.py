"""Size budgets of the house: lines per module, longest functions and longest parameter lists.

    python tools/code_budget.py              # table of the worst offenders; exit 1 when over budget
    python tools/code_budget.py --top 20

Budgets (docs/architecture.md): scripts ~200 (preprocess.py) and ~300 (dss_train.py) lines,
library modules ~400 lines, functions ~60 lines (the visible epoch loop in dss_train.py's
``train_member`` aside), parameter lists ~8 (``self``/``cls`` not counted).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_LINES = {"preprocess.py": 200, "dss_train.py": 300}
DEFAULT_MODULE_LINES = 400
FUNCTION_LINES = 60
# The training script's epoch loop is written out on purpose (a recipe, as torchvision's reference).
FUNCTION_EXCEPTIONS = {("dss_train.py", "train_member"): 120}
PARAMETERS = 8
# Tolerance of the "~" in the budgets: a file or function this much over is still within budget.
SLACK = 1.05


def code_files() -> list[Path]:
    return [REPO_ROOT / "preprocess.py", REPO_ROOT / "dss_train.py", *sorted((REPO_ROOT / "dss").rglob("*.py"))]


def functions(path: Path):
    """(qualified name, lines, parameter count) of every function and method in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = child.args
                names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
                count = len([n for n in names if n not in ("self", "cls")])
                count += bool(arguments.vararg) + bool(arguments.kwarg)
                yield prefix + child.name, child.end_lineno - child.lineno + 1, count
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")

    yield from walk(tree, "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=10, help="rows per table")
    args = parser.parse_args(argv)
    over = []
    modules, all_functions = [], []
    for path in code_files():
        name = str(path.relative_to(REPO_ROOT))
        lines = len(path.read_text().splitlines())
        budget = MODULE_LINES.get(name, DEFAULT_MODULE_LINES)
        modules.append((lines, budget, name))
        if lines > budget * SLACK:
            over.append(f"module {name}: {lines} lines > {budget}")
        for function, length, parameters in functions(path):
            limit = FUNCTION_EXCEPTIONS.get((name, function), FUNCTION_LINES)
            all_functions.append((length, limit, parameters, f"{name}:{function}"))
            if length > limit * SLACK:
                over.append(f"function {name}:{function}: {length} lines > {limit}")
            if parameters > PARAMETERS:
                over.append(f"function {name}:{function}: {parameters} parameters > {PARAMETERS}")
    print(f"{'lines':>6} {'budget':>6}  module")
    for lines, budget, name in sorted(modules, reverse=True)[:args.top]:
        print(f"{lines:>6} {budget:>6}  {name}")
    print(f"\n{'lines':>6} {'budget':>6}  longest functions")
    for length, limit, _, name in sorted(all_functions, reverse=True)[:args.top]:
        print(f"{length:>6} {limit:>6}  {name}")
    print(f"\n{'params':>6} {'budget':>6}  longest parameter lists")
    for _, _, parameters, name in sorted(all_functions, key=lambda row: -row[2])[:args.top]:
        print(f"{parameters:>6} {PARAMETERS:>6}  {name}")
    print("\n" + ("\n".join(f"OVER: {line}" for line in over) if over else "all within budget"))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
