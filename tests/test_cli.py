"""Tests of the command line ``valueloss inspect``: exit codes, text, JSON, PNG.

Most run ``main()`` in this process (a subprocess costs torch's import, ~2 s, each); the tests of the
entry point itself, of what gets imported and of the documented example run ``python -m valueloss``.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fresh
import numpy as np
import pytest
import torch

from valueloss.batch.cli import build_parser, main
from valueloss.batch.io import PT_MIN_TORCH

reads_pt = pytest.mark.skipif(torch.__version__ < PT_MIN_TORCH, reason=f".pt files are refused below torch "
                              f"{PT_MIN_TORCH} (tests/test_adversarial.py checks the refusal)")

SAMPLE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "sample_batch.npz"


def run_process(*args):
    """Run ``python -m valueloss ARGS`` and return the completed process."""
    return subprocess.run([sys.executable, "-m", "valueloss", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def run(*args):
    """Run the command line's ``main(ARGS)`` here: ``(returncode, stdout, stderr)`` as a subprocess would give."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def _batch(**change):
    g = torch.Generator().manual_seed(0)
    data = {k: torch.randn(3, 5, generator=g) for k in ("values", "old_values", "returns")}
    data["action_mask"] = torch.ones(3, 5, dtype=torch.bool)
    data.update(change)
    return {k: v for k, v in data.items() if v is not None}


def test_text_report_on_the_sample():
    """`python -m valueloss inspect` on the sample prints a readable report with exit code 0 (run as `-m` does,
    in the fresh interpreter of tests/fresh.py)."""
    out = fresh.stage("valueloss inspect sample")
    assert out["exit"] == 0, out["stderr"]
    assert "valueloss inspect:" in out["stdout"] and "have zero gradient (clip fraction)" in out["stdout"]
    assert "suggestion  clip_eps in [" in out["stdout"] and out["stderr"] == ""


def test_inspect_without_plot_never_imports_matplotlib():
    """`python -m valueloss inspect sample.npz` (text and --json) never imports matplotlib or valueloss.viz (in a
    fresh interpreter, tests/fresh.py, where only the core and valueloss.distributed were imported before)."""
    for name in ("valueloss inspect sample", "valueloss inspect sample --json"):
        out = fresh.stage(name)
        assert out["exit"] == 0 and "783" in out["stdout"]
        imported = out["modules"]
        assert "valueloss.functional" in imported and "valueloss.batch.report" in imported
        assert [name for name in imported if name.split(".")[0] == "matplotlib" or name.startswith("valueloss.viz")] \
            == []


@reads_pt
def test_inspect_on_pt_still_works(tmp_path):
    """A .pt copy of the sample (read with torch.load(weights_only=True)) gives the same report as the .npz."""
    path = tmp_path / "sample.pt"
    torch.save({k: torch.from_numpy(v) for k, v in np.load(SAMPLE).items()}, path)
    from_pt, from_npz = run("inspect", path, "--json"), run("inspect", SAMPLE, "--json")
    assert from_pt.returncode == 0, from_pt.stderr
    report_pt, report_npz = json.loads(from_pt.stdout), json.loads(from_npz.stdout)
    assert report_pt.pop("source") == str(path) and report_npz.pop("source") == str(SAMPLE)
    assert report_pt == report_npz


def test_json_report_and_plot(tmp_path):
    """--json prints parseable JSON with the chosen settings and the top 8 sequences; --plot writes a PNG."""
    png = tmp_path / "out.png"
    out = run("inspect", SAMPLE, "--json", "--clip-eps", "0.1", "--mode", "seq-mean-token-mean", "--plot", png)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["clip_eps"] == 0.1 and data["mode"] == "seq-mean-token-mean"
    assert data["num_tokens"] == 783 and data["num_sequences"] == 24 and len(data["sequences"]) == 8
    fractions = [s["clip_fraction"] for s in data["sequences"]]
    assert fractions == sorted(fractions, reverse=True)
    assert png.read_bytes()[:4] == b"\x89PNG"
    every = json.loads(run("inspect", SAMPLE, "--json", "--top", "all").stdout)["sequences"]
    assert sorted(s["index"] for s in every) == list(range(24))
    assert len(json.loads(run("inspect", SAMPLE, "--json", "--top", "3").stdout)["sequences"]) == 3


def _reject_constants(text):
    raise ValueError(f"not strict JSON: {text}")


def test_json_is_strict_with_null_for_non_finite_numbers(tmp_path):
    """A batch whose loss overflows to inf prints strict JSON (a parser refusing NaN/Infinity reads it): null."""
    path = tmp_path / "huge.npz"
    np.savez(path, values=np.array([1e200, 0.0]), old_values=np.zeros(2), returns=np.array([-1e200, 0.0]))
    out = run("inspect", path, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout, parse_constant=_reject_constants)
    assert data["loss"] is None and data["loss_unclipped"] is None and data["num_tokens"] == 2


BAD = {
    "bad file": (lambda p: p.write_bytes(b"not a batch"), "weights_only=True"),
    "missing key": (lambda p: torch.save(_batch(returns=None), p), "missing key(s) returns"),
    "mismatched shapes": (lambda p: torch.save(_batch(old_values=torch.zeros(3, 4)), p),
                          "values and old_values must have the same shape; got (3, 5) and (3, 4)"),
    "nan": (lambda p: torch.save(_batch(values=torch.full((3, 5), float("nan"))), p),
            "values has 15 NaN/inf value(s) at unmasked positions"),
    "empty mask": (lambda p: torch.save(_batch(action_mask=torch.zeros(3, 5, dtype=torch.bool)), p),
                   "selects no token"),
}


@reads_pt
@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_exit_2_with_a_clear_message(tmp_path, case):
    """Each kind of bad file exits with code 2 and says what is wrong on stderr, nothing on stdout."""
    write, message = BAD[case]
    path = tmp_path / "batch.pt"
    write(path)
    out = run("inspect", path)
    assert out.returncode == 2
    assert out.stderr.startswith("valueloss inspect: error: ") and message in out.stderr
    assert out.stdout == "" and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_a_figure_that_cannot_be_written_exits_2(tmp_path):
    """--plot into a missing folder or with a suffix matplotlib cannot write: exit 2, one line, no traceback."""
    cases = {tmp_path / "missing" / "out.png": "FileNotFoundError", tmp_path / "out.txt": "Format 'txt' is not"}
    for path, message in cases.items():
        out = run("inspect", SAMPLE, "--plot", path)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.startswith(f"valueloss inspect: error: --plot could not write {path} (")
        assert message in out.stderr and out.stderr.count("\n") == 1


def test_plot_without_matplotlib_exits_2():
    """Without matplotlib, --plot exits 2 naming the extra to install (and nothing else needs matplotlib); run in
    the fresh interpreter of tests/fresh.py with matplotlib blocked, before any stage imports it."""
    out = fresh.stage("--plot without matplotlib")
    assert out["exit"] == 2 and out["stdout"].endswith("figure written: False\n")
    assert out["stderr"] == ("True\nvalueloss inspect: error: --plot needs matplotlib; "
                             "pip install 'valueloss[notebooks]' (or leave out --plot)\n")


def test_bad_arguments_exit_2(capsys):
    """Unknown mode, non-positive clip_eps, negative --top, inverted target and a missing file all exit with 2."""
    for argv in (["inspect", str(SAMPLE), "--mode", "mean"], ["inspect", str(SAMPLE), "--clip-eps", "0"],
                 ["inspect", str(SAMPLE), "--clip-eps", "abc"], ["inspect", str(SAMPLE), "--top", "-1"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert main(["inspect", str(SAMPLE), "--target-clip-fraction", "0.3", "0.1"]) == 2
    assert "LOW must be <= HIGH" in capsys.readouterr().err
    assert main(["inspect", "/nonexistent/batch.pt"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_parser_defaults():
    """Defaults: clip_eps 0.2, token-mean, target 5-15%, text output."""
    args = build_parser().parse_args(["inspect", "b.pt"])
    assert (args.clip_eps, args.mode, tuple(args.target_clip_fraction), args.json) == (0.2, "token-mean",
                                                                                       (0.05, 0.15), False)


def test_docs_example_is_the_commands_output():
    """docs/inspect.md's example block is exactly what `valueloss inspect notebooks/data/sample_batch.npz --top 4`
    prints (run from the repository's root as `-m` does, in the fresh interpreter of tests/fresh.py)."""
    root = SAMPLE.parents[2]
    command = "valueloss inspect notebooks/data/sample_batch.npz --top 4"
    readme = (root / "docs" / "inspect.md").read_text()
    block = readme.split(f"$ {command}\n", 1)[1].split("```", 1)[0]
    out = fresh.stage("docs/inspect.md's example")
    assert repr(command.split()[1:]) in dict(fresh.STAGES)["docs/inspect.md's example"]  # runs this very command
    assert out["exit"] == 0 and out["stdout"] == block


def test_names_that_are_not_utf8(tmp_path):
    """A batch path that is not UTF-8 is printed escaped (\\xff); a --plot name that is not UTF-8 exits 2, one line."""
    path = tmp_path / os.fsdecode(b"s\xff.npz")
    shutil.copy(SAMPLE, path)
    out = run("inspect", path, "--top", "1")
    assert out.returncode == 0 and "s\\xff.npz" in out.stdout
    out.stdout.encode("utf-8")  # printable to any UTF-8 stream: no lone surrogate left
    out = run("inspect", SAMPLE, "--plot", tmp_path / os.fsdecode(b"p\xfe.png"))
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert "the name is not valid UTF-8" in out.stderr and not list(tmp_path.glob("p*"))
