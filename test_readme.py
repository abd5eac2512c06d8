"""The README's python blocks: each is complete and runs as written here, or
is visibly a fragment ("# ..." first). The quick start's LAN half runs in
test_netns.py, where the LAN is made of network namespaces."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from conftest import HERE

README = (HERE / "README.md").read_text()
BLOCKS = [
    textwrap.dedent(block)
    for block in re.findall(r"^( *)```python\n(.*?)^\1```", README, re.S | re.M)
    for block in [block[1]]
]
NOTEBOOK = "# In Jupyter or IPython"
COMPLETE = [b for b in BLOCKS if not b.startswith("# ...")]
LOCAL = [b for b in COMPLETE if "LanDiscoveryService" not in b]


def test_every_block_is_complete_or_visibly_a_fragment():
    assert len(BLOCKS) >= 15
    for block in COMPLETE:
        assert block.startswith(("import", NOTEBOOK)), block
        assert "asyncio.run(main())" in block or "__main__" in block or (
            block.startswith(NOTEBOOK)
        ), block


# A notebook runs each cell's top-level awaits on its own loop; so does this.
AS_A_NOTEBOOK = """
import ast, asyncio, sys
code = compile(sys.stdin.read(), "<cell>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
async def cell():
    await eval(code, {"__name__": "__main__"})
asyncio.run(cell())
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", LOCAL, ids=[b.splitlines()[-1][:40] for b in LOCAL])
def test_each_complete_block_runs_as_written(block):
    notebook = block.startswith(NOTEBOOK)
    result = subprocess.run(
        [sys.executable, "-c", AS_A_NOTEBOOK if notebook else block],
        input=block if notebook else None, capture_output=True, text=True,
        timeout=100, cwd=HERE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), result.stderr  # each prints what it did
    assert "Traceback" not in result.stderr, result.stderr
