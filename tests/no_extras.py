"""Run pytest in an interpreter that cannot see the packages of valueloss's extras: the core's tests must
pass with torch, numpy and the test tools alone, as after ``pip install valueloss`` with no extras.

``python tests/no_extras.py <pytest args>`` builds a temporary site directory of links to this environment's
site-packages minus the blocked distributions, then runs ``python -S -m pytest`` on it (``-S``: the real
site-packages is not on the path), so a blocked package is simply absent (``find_spec`` returns None).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

BLOCKED = frozenset({
    "matplotlib", "ipywidgets", "anywidget", "jupyterlab", "IPython", "ipykernel", "scipy", "tqdm", "gymnasium",
    "safetensors", "voila", "PIL", "pillow", "nbval", "nbformat", "playwright",
})


def _top_name(entry: str) -> str:
    """The package or distribution name of a site-packages entry (``tqdm``, ``tqdm-4.70.1.dist-info``)."""
    return re.split(r"[-.]", entry, maxsplit=1)[0]


def site_without_extras(target: Path) -> Path:
    """Fill ``target`` with links to every site-packages entry except the blocked ones; return it."""
    site = Path(sysconfig.get_paths()["purelib"])
    blocked = {name.lower() for name in BLOCKED}
    for entry in site.iterdir():
        if _top_name(entry.name).lower() not in blocked and not entry.name.endswith(".pth"):
            (target / entry.name).symlink_to(entry)
    return target


def run(argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -S *argv`` with the current directory and the site without extras on its path (and ``env``'s
    variables added to this process's environment)."""
    with tempfile.TemporaryDirectory(prefix="valueloss-no-extras-") as tmp:
        path = os.pathsep.join([os.getcwd(), str(site_without_extras(Path(tmp)))])
        return subprocess.run([sys.executable, "-S", *argv], env=dict(os.environ, **(env or {}), PYTHONPATH=path),
                              **kwargs)


if __name__ == "__main__":
    sys.exit(run(["-m", "pytest", "-p", "no:nbval", *sys.argv[1:]]).returncode)
