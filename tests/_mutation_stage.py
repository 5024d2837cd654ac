"""Stage the project for ``make mutation`` (mutmut), so that decorated functions get mutated too.

mutmut 3 skips every function with a decorator (other than ``staticmethod`` / ``classmethod``), and
most of the result-critical code is decorated: the metrics and ``evaluate_request`` carry
``@torch.no_grad()``, the protocols' ``_wrapped`` (which holds the final hash check) is a
``@contextlib.contextmanager``, ``AdapterSnapshot.restore`` is ``@torch.no_grad()``. This script
copies ``src/``, ``kernels/``, ``tests/`` and ``pyproject.toml`` into a staging folder and, in the
files ``[tool.mutmut] only_mutate`` lists, rewrites each decorated top-level function or method

    @torch.no_grad()                        def f(...): ...
    def f(...): ...              ->         f = torch.no_grad()(f)

which binds the same object to the same name (decorators are applied after the def, innermost
first), so the tests see the same behaviour and mutmut sees an undecorated function. Property
setters/getters/deleters (``@x.setter``) are left as they are.

Usage: ``python tests/_mutation_stage.py OUT_DIR`` (run from the repository root); then run mutmut
inside ``OUT_DIR``. The staging folder's ``mutants/`` (mutmut's results cache) is kept between runs.
"""

from __future__ import annotations

import fnmatch
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "kernels", "tests", "pyproject.toml")


def _only_mutate() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError as exc:  # Python 3.10
        raise SystemExit("mutation staging needs Python >= 3.11 (tomllib)") from exc
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["tool"]["mutmut"]["only_mutate"])


def undecorate(source: str) -> str:
    """``source`` with each decorated top-level function / method turned into a plain def + rebinding."""
    import libcst as cst

    def skip(function: cst.FunctionDef) -> bool:
        for decorator in function.decorators:
            d = decorator.decorator
            if isinstance(d, cst.Name) and d.value in ("staticmethod", "classmethod"):
                return True
            if isinstance(d, cst.Attribute) and d.attr.value in ("setter", "getter", "deleter"):
                return True
        return False

    def rewrite(body: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
        out: list[cst.BaseStatement] = []
        for statement in body:
            if isinstance(statement, cst.FunctionDef) and statement.decorators and not skip(statement):
                name = statement.name.value
                value: cst.BaseExpression = cst.Name(name)
                for decorator in reversed(statement.decorators):
                    value = cst.Call(func=decorator.decorator, args=[cst.Arg(value)])
                out.append(statement.with_changes(decorators=[]))
                out.append(
                    cst.SimpleStatementLine(
                        [cst.Assign(targets=[cst.AssignTarget(cst.Name(name))], value=value)]
                    )
                )
            elif isinstance(statement, cst.ClassDef):
                out.append(
                    statement.with_changes(
                        body=statement.body.with_changes(body=rewrite(list(statement.body.body)))
                    )
                )
            else:
                out.append(statement)
        return out

    module = cst.parse_module(source)
    return module.with_changes(body=rewrite(list(module.body))).code


def stage(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        else:
            shutil.copy2(ROOT / name, target)
    rewritten = []
    patterns = _only_mutate()
    for path in sorted((out / "src").rglob("*.py")):
        relative = path.relative_to(out).as_posix()
        if any(fnmatch.fnmatch(relative, p) for p in patterns):
            source = path.read_text()
            new = undecorate(source)
            if new != source:
                path.write_text(new)
                rewritten.append(path)
    return rewritten


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("Usage: ")[1].split("\n")[0])
        return 2
    out = Path(argv[0]).resolve()
    if out == ROOT or ROOT in out.parents and out.parts[len(ROOT.parts)] in COPIED:
        print(f"refusing to stage into {out}: choose a folder outside the copied ones (e.g. build/mutation)")
        return 2
    for path in stage(out):
        print(f"undecorated {path.relative_to(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
