"""Smoke test of an INSTALLED sortednet (a wheel in a clean venv, not the source tree).

Runs the README's python blocks and checks the package came from site-packages.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import sortednet as sn

here = Path(sn.__file__).resolve()
assert "site-packages" in here.parts, f"sortednet imported from {here}, not from the installed wheel"
readme = Path(sys.argv[1]).read_text()
scope: dict = {}
for code in re.findall(r"```python\n(.*?)```", readme, re.S):
    exec(compile(code, "README.md", "exec"), scope)
print(f"wheel smoke test: sortednet {sn.__version__} from {here.parent}, README blocks ran, "
      f"{len(scope['nest'].submodels)} sub-models")
