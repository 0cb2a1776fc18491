"""The dependency direction is one way: commands -> engine -> ops. The engine (every module of the
package outside jakiro/commands and the CLI) imports nothing from the commands."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jakiro"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_engine_modules_import_nothing_from_the_commands():
    engine = [p for p in PACKAGE.rglob("*.py") if "commands" not in p.relative_to(PACKAGE).parts
              and p.name != "cli.py"]
    assert len(engine) > 10
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imported_modules(p)
                                                     if m == "jakiro.commands" or m.startswith("jakiro.commands.")
                                                     or m == "jakiro.cli")
                 for p in engine}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_ops_import_no_model_code():
    allowed = {"jakiro", "jakiro._C", "jakiro.native"}
    imports = {m for m in imported_modules(PACKAGE / "ops.py") if m.startswith("jakiro")}
    assert imports <= allowed, imports
