"""Smoke test of the examples: ``examples/compare_solvers.py --quick`` runs and its numbers are sane."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import sdediff

pytest.importorskip("matplotlib")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def compare_solvers(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_solvers") / "x.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "compare_solvers.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, json.loads(out.with_suffix(".json").read_text())


def by_solver(rows, name):
    return sorted((r for r in rows if r["solver"] == name), key=lambda r: r["nfe"] or 0)


def test_writes_plot_and_table(compare_solvers):
    out, stdout, table = compare_solvers
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "solver" in stdout and "NFE" in stdout and "noise floor" in stdout
    assert {r["solver"] for r in table["rows"]} == set(sdediff.available_solvers())
    for row in table["rows"]:
        assert row["solver"] in stdout


def test_ode_errors_are_sane(compare_solvers):
    _, _, table = compare_solvers
    assert table["reference"]["check_rmse"] < 1e-7
    ode = [r for r in table["rows"] if r["kind"] == "ode"]
    assert all(r["error"] is not None and math.isfinite(r["error"]) and r["nfe"] > 0 for r in ode)
    euler, rk4 = by_solver(ode, "euler")[-1], by_solver(ode, "rk4")[-1]
    assert rk4["nfe"] == euler["nfe"] and rk4["error"] < euler["error"] / 10
    for name in sdediff.available_solvers("ode"):  # more work, smaller error
        runs = by_solver(ode, name)
        assert runs[-1]["nfe"] > runs[0]["nfe"] and runs[-1]["error"] < runs[0]["error"]
    assert by_solver(ode, "dopri8")[-1]["error"] < 1e-3


def test_sde_errors_are_sane(compare_solvers):
    _, _, table = compare_solvers
    floor = table["noise_floor"]["sliced_w1"]
    assert 0 < floor < 0.2 and 0 <= table["noise_floor"]["mode_tv"] < 0.1
    em = by_solver(table["rows"], "euler_maruyama")
    assert em[0]["error"] > 3 * em[-1]["error"] and em[-1]["error"] < 3 * floor
    for name in ("euler_maruyama", "milstein", "srk"):
        assert all(r["mode_error"] < 0.1 for r in by_solver(table["rows"], name))
