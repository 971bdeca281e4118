"""The README's first command runs examples/fit_history_free.py: keep it working."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fit_history_free.py"


def test_example_fits_the_history_free_distribution():
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "60"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    before, after = map(float, re.search(r"JS divergence: ([\d.]+) before, ([\d.]+) after", out).groups())
    assert before > 0.05 and after < before / 100


def test_readme_example_runs():
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
