"""The adversarial corpus (tests/adversarial.py) through every reader: one-line error, exit 2, bounded memory and time.

In this process (fast): ``valueloss inspect`` (its ``main``) on each file, under tracemalloc, which sees every
buffer NumPy and zipfile allocate; ``load_batch_bytes`` (the upload explorer's reader) on each file's bytes.
Through a real ``python -m valueloss`` process: the issue's zero-rows bomb (exit code 2 and the peak resident
memory of the process, from ``os.wait4``); the slow tier runs every case that way.
"""

import contextlib
import io
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from adversarial import CASES, write_case

from valueloss.batch import BatchError, load_batch_bytes
from valueloss.batch import io as batch_io
from valueloss.batch.cli import main

GB = 2**30
TIME_LIMIT = 30.0
"""Seconds a case may take (the issue's bound); in-process cases take milliseconds."""
TRACED_LIMIT = 64 * 2**20
"""Bytes NumPy/zipfile/Python may allocate in-process for a case (the files' valid parts are tiny)."""

REFUSED = [name for name in CASES if CASES[name].message]
OLD_TORCH = torch.__version__ < batch_io.PT_MIN_TORCH


def expected(name):
    """The message of case ``name``; below torch 2.10 every .pt file's content is refused unread instead."""
    if OLD_TORCH and name.startswith("pt:") and CASES[name].bytes_ok:
        return "save the batch as .npz"
    return CASES[name].message


def run_inspect(*args):
    """``main(["inspect", *args])`` here: (exit code, stdout, stderr, traced peak bytes, seconds)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["inspect", *map(str, args)])
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return code, stdout.getvalue(), stderr.getvalue(), peak, elapsed


def assert_one_line_error(code, stdout, stderr, message):
    assert code == 2, (code, stderr)
    assert stdout == "" and stderr.startswith("valueloss inspect: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("name", REFUSED)
def test_every_case_exits_2_with_one_line_in_bounded_memory(tmp_path, name):
    """Each hostile file: exit 2, one line naming the problem, little memory allocated, well within 30 s."""
    path = write_case(tmp_path, name)
    code, stdout, stderr, peak, elapsed = run_inspect(path)
    assert_one_line_error(code, stdout, stderr, expected(name))
    assert str(path) in stderr
    assert peak < TRACED_LIMIT and elapsed < TIME_LIMIT, (peak, elapsed)


def test_an_ignored_bomb_member_is_never_read(tmp_path):
    """An .npz whose extra member inflates to 2.1 GB loads and reports the batch; the member is only named."""
    path = write_case(tmp_path, "npz: ignored 2.1 GB member")
    code, stdout, stderr, peak, elapsed = run_inspect(path)
    assert code == 0 and stderr == "", stderr
    assert "ignored keys: extra" in stdout and "15 tokens" in stdout
    assert peak < TRACED_LIMIT and elapsed < TIME_LIMIT, (peak, elapsed)


@pytest.mark.parametrize("name", [name for name in REFUSED if CASES[name].bytes_ok])
def test_uploaded_bytes_are_refused_alike(tmp_path, name):
    """The upload explorer's reader, load_batch_bytes, refuses each file's bytes with the same message."""
    path = write_case(tmp_path, name)
    tracemalloc.start()
    try:
        with pytest.raises(BatchError) as error:
            load_batch_bytes(path.read_bytes(), path.name)
        peak = tracemalloc.get_traced_memory()[1] - path.stat().st_size  # the upload itself is in memory
    finally:
        tracemalloc.stop()
    assert expected(name) in str(error.value) and "\n" not in str(error.value)
    assert peak < TRACED_LIMIT


def test_limits_are_exact_and_raised_by_their_flags(tmp_path):
    """The sample (24 x 64 float32) passes at limits equal to its size and is refused one below, naming the flag."""
    sample = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "sample_batch.npz"
    code, _, stderr, _, _ = run_inspect(sample, "--max-tokens", "1536", "--max-sequences", "24",
                                        "--max-bytes", str(4 * 1536 * 3 + 1536))
    assert code == 0, stderr
    for flag, limit, message in (("--max-tokens", "1535", "1536 tokens, more than the limit of 1535"),
                                 ("--max-sequences", "23", "24 sequences, more than the limit of 23"),
                                 ("--max-bytes", "6K", "hold 12288 bytes, more than the limit of 6144")):
        code, stdout, stderr, _, _ = run_inspect(sample, flag, limit)
        assert_one_line_error(code, stdout, stderr, message)
        assert f"(raise it with {flag} N" in stderr
    path = write_case(tmp_path, "npz: 3 x (2**22, 1) zeros, compressed")
    code, stdout, stderr, _, _ = run_inspect(path, "--max-sequences", "8M", "--max-tokens", "1M")
    assert_one_line_error(code, stdout, stderr, "4194304 tokens, more than the limit of 1048576")
    for bad in ("0", "-5", "lots"):
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
            main(["inspect", str(path), "--max-tokens", bad])
        assert exit_info.value.code == 2


def test_pt_is_refused_below_torch_2_10(tmp_path, monkeypatch):
    """With a torch older than PT_MIN_TORCH (simulated), a .pt is refused unread, suggesting .npz; .npz still loads."""
    pt = write_case(tmp_path, "pt: meta tensors")
    monkeypatch.setattr(batch_io, "PT_MIN_TORCH", "99.0")
    code, stdout, stderr, _, _ = run_inspect(pt)
    assert_one_line_error(code, stdout, stderr, "published bypasses before torch 99.0")
    assert "save the batch as .npz" in stderr
    with pytest.raises(BatchError, match="save the batch as .npz"):
        load_batch_bytes(b"anything", "upload.pth")


def _run_measured(args, timeout=120):
    """Run a process; return (exit code, stdout, stderr, peak resident bytes, seconds), from os.wait4."""
    def limit_address_space():  # a safety net: a regression fails with MemoryError instead of filling the machine
        resource.setrlimit(resource.RLIMIT_AS, (4 * GB, 4 * GB))

    start = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit_address_space)
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - start > timeout:
            process.kill()
            pytest.fail(f"{args} ran longer than {timeout} s")
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = process.stdout.read().decode(), process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    return process.returncode, stdout, stderr, usage.ru_maxrss * 1024, elapsed


def _check_in_a_process(tmp_path, name):
    path = write_case(tmp_path, name)
    code, stdout, stderr, peak, elapsed = _run_measured([sys.executable, "-m", "valueloss", "inspect", str(path)])
    if CASES[name].message:
        assert_one_line_error(code, stdout, stderr, expected(name))
    else:
        assert code == 0, stderr
    assert peak < 1 * GB and elapsed < TIME_LIMIT, (peak, elapsed)


def test_the_zero_rows_bomb_in_a_real_process(tmp_path):
    """`python -m valueloss inspect rows.npz` (96 MiB of zeros in 98 KB): exit code 2, under 1 GB, under 30 s."""
    _check_in_a_process(tmp_path, "npz: 3 x (2**22, 1) zeros, compressed")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_every_case_in_a_real_process(tmp_path, name):
    """Every case through `python -m valueloss inspect`: exit code 2 (0 for the ignored bomb), under 1 GB and 30 s."""
    _check_in_a_process(tmp_path, name)


def test_zip64_end_records_are_read_as_zipfile_reads_them(monkeypatch):
    """A genuine zip64 .npz loads; the same file with a 1 TB directory in its zip64 end record is refused unread."""
    import struct
    import zipfile

    import numpy as np

    buffer = io.BytesIO()
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)  # makes zipfile write the zip64 end records
    with zipfile.ZipFile(buffer, "w") as archive:
        for key in ("values", "old_values", "returns"):
            member = io.BytesIO()
            np.save(member, np.full((2, 3), 0.5))
            archive.writestr(f"{key}.npy", member.getvalue())
    monkeypatch.undo()
    data = buffer.getvalue()
    locator = data.rindex(b"PK\x06\x07")
    assert data[locator - 56:locator - 52] == b"PK\x06\x06"
    assert load_batch_bytes(data, "zip64.npz").values.shape == (2, 3)
    record = locator - 56
    lying = data[:record + 40] + struct.pack("<Q", 2**40) + data[record + 48:]
    with pytest.raises(BatchError, match="its zip directory takes 1099511627776 bytes"):
        load_batch_bytes(lying, "zip64.npz")
