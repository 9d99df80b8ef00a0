"""Smoke tests of the examples: ``compare_solvers.py --quick`` and ``classic_samplers.py --quick`` run and their
numbers are sane."""

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


def run_quick(example: str, tmp_path_factory):
    """Run ``examples/<example>.py --quick --out <tmp>/x.png``; return the figure path and stdout."""
    out = tmp_path_factory.mktemp(example) / "x.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{example}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


@pytest.fixture(scope="module")
def compare_solvers(tmp_path_factory):
    out, stdout = run_quick("compare_solvers", tmp_path_factory)
    return out, stdout, json.loads(out.with_suffix(".json").read_text())


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


CLASSIC_SAMPLERS = ("ddpm", "ddim_eta0", "ddim_eta1", "ald", "pc", "sde", "ode", "exact")


@pytest.fixture(scope="module")
def classic_samplers(tmp_path_factory):
    out, stdout = run_quick("classic_samplers", tmp_path_factory)
    rows = {}  # sampler -> (NFE, mode err, mean err, logp gap): the columns before the last of the printed table
    for line in stdout.splitlines():
        words = line.split()
        if words and words[0] in CLASSIC_SAMPLERS:
            rows[words[0]] = (int(words[-5]), float(words[-4]), float(words[-3]), float(words[-2]))
    return out, stdout, rows


def test_classic_samplers_plot_and_table(classic_samplers):
    out, stdout, rows = classic_samplers
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert set(rows) == set(CLASSIC_SAMPLERS), stdout
    assert rows["exact"][0] == 0 and all(rows[k][0] > 0 for k in CLASSIC_SAMPLERS if k != "exact")
    assert rows["ddim_eta0"][0] == rows["ddim_eta1"][0]  # one score call per DDIM step, whatever eta
    assert rows["pc"][0] == 2 * 100  # quick: 100 steps of one predictor and one corrector call each


def test_classic_samplers_reproduce_the_mixture(classic_samplers):
    """Quick mode draws 1000 samples. For exact draws the mode-weight error is about 0.016 (sd 0.009), the
    mean's standard error is sqrt(trace(cov) / 1000) = 0.062 and the logp gap's is 1 / sqrt(1000) = 0.03.
    The coarse quick-mode samplers are biased in the spread (logp gap up to about 0.4: DDIM with eta = 1
    and 20 steps is too concentrated, the 10-step ODE too spread out), not in the weights or the mean.
    Returning the prior draws unchanged gives a mode error of 0.09, a mean error of 0.24 and a logp gap
    of 10: the mean and weight bounds alone would not catch it, the logp bound does."""
    _, stdout, rows = classic_samplers
    se = float(stdout.split("mean se (standard error of the mean, sqrt(trace(cov) / n)):")[1].split()[0])
    assert 0.05 < se < 0.07
    for name, (nfe, mode_err, mean_err, logp_gap) in rows.items():
        assert 0 <= mode_err < 0.1 and 0 <= mean_err < 5 * se and abs(logp_gap) < 1.0, (name, rows[name])
    assert abs(rows["exact"][3]) < 5 * 0.03 and abs(rows["sde"][3]) < 5 * 0.03  # 100 Euler-Maruyama steps


DIGITS_ROWS = {"model, exact divergence": "exact", "model, Hutchinson": "hutchinson",
               "full-covariance Gaussian": "gaussian", "uniform (log2 17)": "uniform"}


def digits_table(stdout):
    """``{exact, hutchinson, gaussian, uniform} -> (bits/dim, stderr)`` from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        for prefix, key in DIGITS_ROWS.items():
            if line.startswith(prefix):
                words = line.split()
                rows[key] = (float(words[-3]), float(words[-2]))
    return rows


def test_digits_likelihood_quick(tmp_path):
    """``digits_likelihood.py --quick`` trains for 300 steps, scores 20 test images and saves the model and the figure;
    ``--load`` reuses the saved model. The bits/dim (17 levels) are finite, positive and below a loose ceiling, and
    exact and Hutchinson divergence agree (quick mode gives about 3.7 bits/dim for both, with standard errors of
    about 0.05 over images; the Gaussian about 2.8; the uniform distribution log2(17) = 4.09)."""
    pytest.importorskip("sklearn")
    out, model = tmp_path / "digits.png", tmp_path / "digits.pt"
    env = dict(os.environ, MPLBACKEND="Agg")
    script = str(EXAMPLES / "digits_likelihood.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(out), "--model", str(model)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000
    assert model.stat().st_size > 0
    rows = digits_table(proc.stdout)
    assert set(rows) == set(DIGITS_ROWS.values()), proc.stdout
    for key, (bpd, se) in rows.items():
        assert math.isfinite(bpd) and math.isfinite(se) and se >= 0, (key, rows)
    assert abs(rows["uniform"][0] - math.log2(17)) < 1e-3
    assert 0 < rows["gaussian"][0] < rows["uniform"][0]
    assert 0 < rows["exact"][0] < 6 and 0 < rows["hutchinson"][0] < 6
    assert abs(rows["exact"][0] - rows["hutchinson"][0]) < 0.2, rows

    again = subprocess.run([sys.executable, script, "--quick", "--load", "--model", str(model), "--out",
                            str(tmp_path / "again.png"), "--test-images", "4", "--samples", "4"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "loaded the model" in again.stdout and "trained" not in again.stdout
    reloaded = digits_table(again.stdout)
    assert math.isfinite(reloaded["exact"][0]) and 0 < reloaded["exact"][0] < 6


GUIDANCE_ROWS = ("uncond", "exact", "cg_w1", "cfg_w0", "target_3", "cg_w3", "cg_w3_sde", "target_4", "cfg_w3",
                 "target_10", "cg_w10", "cg_w10_sde")
INPAINT_ROWS = ("inpaint_r1", "inpaint_r10", "exact_cond")


@pytest.fixture(scope="module")
def guidance(tmp_path_factory):
    out, stdout = run_quick("guidance", tmp_path_factory)
    head, _, tail = stdout.partition("\ninpainting:")
    rows, inpaint = {}, {}  # key -> (power, NFE, class-0 frac, p(0|x), mean x, mean y); key -> (NFE, P(y > 0))
    for line in head.splitlines():
        words = line.split()
        if words and words[0] in GUIDANCE_ROWS:
            rows[words[0]] = (int(words[-7]), int(words[-6])) + tuple(float(w) for w in words[-5:-1])
    for line in tail.splitlines():
        words = line.split()
        if words and words[0] in INPAINT_ROWS:
            inpaint[words[0]] = (int(words[-5]), float(words[-4]))
    return out, stdout, rows, inpaint


def test_guidance_plot_and_table(guidance):
    out, stdout, rows, inpaint = guidance
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    assert set(rows) == set(GUIDANCE_ROWS) and set(inpaint) == set(INPAINT_ROWS), stdout
    check = float(stdout.split("on 1000 noisy points:")[1].split()[0])
    assert check < 1e-12  # CFG at w is classifier guidance at 1 + w, to round-off
    assert rows["cg_w1"][0] == rows["cfg_w0"][0] == 1 and rows["cfg_w3"][0] == 4  # the power of p(y | x)


def test_guidance_samples_the_conditional_and_sharpens(guidance):
    """Quick mode: 1000 samples per setting. Exact draws of p(x | y = 0) put about 0.99 of them in class 0 (standard
    error 0.003) with a mean confidence p(0 | x) of about 0.98, and mean (-1.05, 1.42) (standard error about 0.033 per
    coordinate); unconditional samples put 0.35 in class 0, with mean (0.0, 0.1). At w = 1 classifier guidance and at
    w = 0 classifier-free guidance match the exact draws; larger scales sharpen, and the guided ODE overshoots the
    sharpened target p(x) p(y | x)^10 (mean x -2.3 against -1.09; the reverse SDE -1.5)."""
    _, _, rows, _ = guidance
    exact = rows["exact"]
    assert 0.97 < exact[2] <= 1.0 and 0.25 < rows["uncond"][2] < 0.45
    for key in ("cg_w1", "cfg_w0"):
        frac, conf, mx, my = rows[key][2:]
        assert abs(frac - exact[2]) < 0.02 and abs(conf - exact[3]) < 0.02, (key, rows[key], exact)
        assert abs(mx - exact[4]) < 0.2 and abs(my - exact[5]) < 0.2, (key, rows[key], exact)
    assert rows["cg_w3"][2] >= rows["cg_w1"][2] and rows["cg_w3"][3] > rows["cg_w1"][3] + 0.01
    assert rows["cg_w10"][3] >= rows["cg_w3"][3] and rows["target_10"][3] > rows["target_3"][3]
    assert rows["cg_w10"][4] < rows["cg_w10_sde"][4] - 0.3 and rows["cg_w10_sde"][4] < rows["target_10"][4] - 0.2


def test_guidance_inpainting_numbers(guidance):
    """Quick mode: 50 steps, jump length 10. The exact conditional puts 0.2336 on y > 0; replacement gives about 0.49
    and 10 resamplings about 0.43 (standard errors 0.016): the bias is the method's, resampling reduces it a little."""
    _, _, _, inpaint = guidance
    assert inpaint["inpaint_r1"][0] == 50 and inpaint["inpaint_r10"][0] == 500
    exact = inpaint["exact_cond"][1]
    assert abs(exact - 0.2336) < 1e-3
    assert exact + 0.1 < inpaint["inpaint_r1"][1] < 0.6 and exact < inpaint["inpaint_r10"][1] < 0.6
    assert inpaint["inpaint_r10"][1] < inpaint["inpaint_r1"][1] + 0.05


def run_train_toy(objective: str, tmp_path):
    """``train_toy.py --quick --objective <objective>`` (run_quick passes no extra arguments); the PNG and stdout."""
    out = tmp_path / f"{objective}.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_toy.py"), "--quick", "--objective", objective,
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def train_toy_row(stdout, name):
    """The printed row of ``name``: ``(score err, zero err, mode weights (3,), max dev)``; ``None`` for a '-'."""
    for line in stdout.splitlines():
        words = line.split()
        if line.startswith(name + " "):
            value = lambda w: None if w == "-" else float(w)  # noqa: E731
            return value(words[-7]), value(words[-6]), [float(w) for w in words[-4:-1]], float(words[-1])
    raise AssertionError(f"no row {name!r} in:\n{stdout}")


def test_train_toy_quick_dsm(tmp_path):
    """500 DSM steps (eps, simple): measured score error 0.017 against the zero score's 0.82 (1500 steps: 0.0023);
    the mode weights are off by up to 0.045 (exact draws of the same size: 0.022)."""
    out, stdout = run_train_toy("dsm-eps", tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    err, base, weights, dev = train_toy_row(stdout, "dsm-eps")
    assert 0.7 < base < 0.95 and 0 < err < base / 10, (err, base)
    assert abs(sum(weights) - 1) < 0.01 and dev < 0.15, (weights, dev)
    assert train_toy_row(stdout, "exact draws")[3] < 0.05


def test_train_toy_quick_consistency_training(tmp_path):
    """500 CT steps: no score, so the row shows '-' and the one-step map is checked instead: measured error 0.017 and
    0.22 at t = 0.5 and 2, against 0.097 and 2.13 for the identity map; two-step samples' weights off by 0.033."""
    out, stdout = run_train_toy("ct", tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
    err, base, weights, dev = train_toy_row(stdout, "ct")
    assert err is None and base is None and dev < 0.15, (weights, dev)
    maps = stdout.split("identity map f = x):")[1].split("\n")[0]  # "t = 0.5: e (b), t = 2: e (b)"
    pairs = [(float(part.split(":")[1].split()[0]), float(part.split("(")[1].rstrip(")"))) for part in maps.split(",")]
    assert len(pairs) == 2 and all(0 < e < b / 3 for e, b in pairs), pairs


def test_calibrated_grid_quick(tmp_path_factory):
    """``calibrated_grid.py --quick`` fits grids at 5 and 10 steps on 256 pilot draws (300 runs each) and checks them on
    256 other draws: the calibrated grid beats the default one at both (measured gains: about 10x and 5x)."""
    out, stdout = run_quick("calibrated_grid", tmp_path_factory)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [5, 10]
    for r in rows:
        assert r["calibrated_rmse"] < r["default_rmse"] / 2, r
        assert r["pilot_rmse"] < r["pilot_rmse_initial"] and r["runs"] <= 300
        assert len(r["grid"]) == r["steps"] + 1 and r["grid"][0] == 1.0 and abs(r["grid"][-1] - 1e-3) < 1e-15
    assert "held-out" in stdout
