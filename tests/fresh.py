"""One fresh interpreter shared by the tests that check what an import, or a command, loads into a new process.

Each of those tests used to start ``python`` (and import torch) of its own. Here one process runs their
stages in the order of :data:`STAGES` and reports, after each stage, its output and every module then in
``sys.modules``; a test asserts on its stage with :func:`stage`. The modules are cumulative, so a test sees
a module its stage loads whichever stage loaded it first: it cannot pass while its own import loads a
forbidden module, but it can fail for an earlier stage's. The order puts the stages that forbid most first
to keep the blame where it belongs: the core forbids everything the CLI, valueloss.batch and
valueloss.distributed may not load, and every stage before valueloss.viz forbids matplotlib, of which
pyplot is part (scipy, forbidden to the last stage, valueloss.experiments, is an extra none of the others
needs).
The "--plot without matplotlib" stage hides matplotlib (a ``None`` entry in ``sys.modules``) and removes that
entry when done, before the valueloss.viz stage imports it. A stage that raises stops the run: later stages
report that they did not run.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "notebooks" / "data" / "sample_batch.npz"

# ``python -m valueloss ARGS`` inside the process: runpy runs valueloss/__main__.py as ``-m`` does.
_COMMAND = ("import runpy, sys\nsys.argv = ['valueloss', *{args!r}]\n"
            "runpy.run_module('valueloss', run_name='__main__')\n")

#: (name, code) in the order they run; stdout and stderr of each are captured, SystemExit gives the exit code.
STAGES = [
    ("import valueloss",
     "import valueloss\n"
     "from valueloss import ValueLoss, ValueLossDiagnostics, Region, diagnose, functional\n"
     "ValueLoss(0.2)\n"
     "print(sorted(valueloss.__all__))\n"),
    ("import valueloss.distributed", "import valueloss.distributed\n"),
    ("valueloss inspect sample", _COMMAND.format(args=["inspect", str(SAMPLE)])),
    ("valueloss inspect sample --json", _COMMAND.format(args=["inspect", str(SAMPLE), "--json"])),
    ("docs/inspect.md's example",
     f"import os\nos.chdir({str(ROOT)!r})\n"
     + _COMMAND.format(args=["inspect", "notebooks/data/sample_batch.npz", "--top", "4"])),
    ("import valueloss.batch",
     "import valueloss.batch, valueloss.batch.io, valueloss.batch.synthetic, valueloss.batch.report\n"
     "import valueloss.batch.cli, valueloss.peers\n"),
    ("--plot without matplotlib",
     "import os, sys, tempfile\n"
     "sys.modules['matplotlib'] = None  # as if it were not installed (removed again below)\n"
     "try:\n"
     "    from valueloss.batch.cli import main\n"
     f"    print(main(['inspect', {str(SAMPLE)!r}, '--json']) == 0, file=sys.stderr)\n"
     "    figure = os.path.join(tempfile.mkdtemp(), 'out.png')\n"
     f"    code = main(['inspect', {str(SAMPLE)!r}, '--plot', figure])\n"
     "    print('figure written:', os.path.exists(figure))\n"
     "finally:\n"
     "    del sys.modules['matplotlib']\n"
     "sys.exit(code)\n"),
    ("import valueloss.viz",
     "import matplotlib\n"
     "def snapshot():\n"
     "    return {k: matplotlib.rcParams[k] for k in matplotlib.rcParams.keys() if k != 'backend'}\n"
     "before = snapshot()\n"
     "import valueloss.viz.plotting, valueloss.viz.widgets\n"
     "print('rcParams unchanged' if snapshot() == before else 'rcParams changed')\n"),
    ("import valueloss.experiments",
     "import valueloss.experiments, valueloss.experiments.cli, valueloss.experiments.figures\n"
     "from valueloss.experiments import ToyCriticConfig, run_ppo, run_toy_critic\n"),
]

_RUNNER = r"""
import contextlib, io, json, os, sys, traceback
stages, report, failed = json.loads(sys.argv[1]), {}, None
real_stdout = sys.stdout
for name, code in stages:
    if failed is not None:
        report[name] = {"error": f"not run: stage {failed!r} failed"}
        continue
    out, err, exit_code, error = io.StringIO(), io.StringIO(), None, None
    cwd = os.getcwd()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(code, f"<stage {name}>", "exec"), {"__name__": "__stage__"})
            except SystemExit as exit_:
                exit_code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        error, failed = traceback.format_exc(), name
    finally:
        os.chdir(cwd)
    report[name] = {"stdout": out.getvalue(), "stderr": err.getvalue(), "exit": exit_code, "error": error,
                    "modules": sorted(sys.modules)}
real_stdout.write(json.dumps(report))
"""


@functools.cache
def _report() -> dict:
    """Run every stage in one new interpreter (once per test session); its report by stage name."""
    stages = json.dumps(STAGES)
    result = subprocess.run([sys.executable, "-c", _RUNNER, stages], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def stage(name: str) -> dict:
    """What stage ``name`` printed (``stdout``, ``stderr``), its ``exit`` code (None: no SystemExit) and the
    ``modules`` loaded once it had run; an ``error`` (traceback) fails here, naming the stage."""
    record = _report()[name]
    assert record["error"] is None, f"stage {name!r} of tests/fresh.py:\n{record['error']}"
    return record
