"""The README's code runs as written."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_blocks_run():
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python block"
    scope: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)
    nest, sub, small = scope["nest"], scope["sub"], scope["small"]
    assert len(nest.submodels) == 16
    assert nest.cost(sub, "params") <= 20_000
    assert sum(p.numel() for p in small.parameters()) == nest.cost(sub, "params")
