"""README.md's Python snippets run as written: each ```python block, fresh, in its own process.

A reader copies a block into a new interpreter, so each one runs alone in an empty
directory (files it writes, such as a checkpoint or a picture, land there) and must exit
with status 0.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
BLOCKS = [m.group(2) for m in FENCE.finditer(README) if m.group(1) == "python"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def test_readme_has_python_snippets_and_its_commands_first():
    fences = [m.group(1) for m in FENCE.finditer(README)]
    assert fences[:2] == ["bash", "bash"], fences  # install + demo, install + tests
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("i", range(len(BLOCKS)),
                         ids=[b.strip().splitlines()[-1][:40] for b in BLOCKS])
def test_readme_snippet_runs(i, tmp_path):
    code = BLOCKS[i]
    for module, word in (("matplotlib", "plot_"), ("sklearn", "sklearn")):
        if word in code:  # an optional extra ([plot], [demo]) the snippet says it needs
            pytest.importorskip(module)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert p.returncode == 0, f"README block {i} failed:\n{code}\n--- stderr\n{p.stderr}"
    assert "Traceback" not in p.stderr
