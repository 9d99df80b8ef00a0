"""Pathwise accuracy of probability-flow ODE samplers at equal NFE: sdediff against its peers.

Problems (exact Gaussian mixtures: the score of every diffused marginal is known in closed form,
so the only error left is the solver's):

* ``ring2d``: a stiff 2-D mixture, 8 equal components on a circle of radius 2, std 0.03.
* ``mix64d``: a 64-D mixture of 8 components with unequal weights (0.30 ... 0.03), random means of
  norm 3 to 5 and isotropic stds 0.1 to 0.5 (seeded).

Process: ``VPSDE.from_betas(linspace(1e-4, 0.02, 1000))`` (DDPM's linear schedule, N = 1000), so
that diffusers' schedulers share the discretization: timestep ``n`` sits at ``t = (n + 1) / N``.
Every sampler goes from ``t_start = 1`` (timestep 999) to ``t_end = 1 / N`` (timestep 0,
``sigma_VE = sigma / alpha = 0.0100005``), from the same prior draws ``x_T``.

Error: ``RMSE = sqrt(mean over the batch and the coordinates of (x - x_ref)^2)`` at ``t_end``,
against a float64 reference from the same ``x_T`` (below). NFE is counted by a call counter
around the function each library calls (score, denoiser or eps model): a run is listed at an
NFE budget when it used at most that many calls.

Reference: the probability-flow ODE in the VE variables ``x / alpha`` against ``u = log sigma_VE``,
``d(x/alpha)/du = x/alpha - D``, solved by sdediff's ``dopri5`` at rtol = atol = 1e-10. In ``u``
the field is smooth. In ``t`` it is not: the discrete schedule makes ``beta(t)`` piecewise
constant (1000 jumps), so an adaptive solve in ``t`` needs about 1e5 evaluations and still
carries the jumps' error. The check is the same solve at half the tolerance. With ``--t-check``,
the solve of ``sample_ode(..., solver="dopri5", rtol=atol=1e-10)`` in ``t`` is run too, and its
distance from the reference is reported. Measured: 9.9e4 NFE and 7.0e-7 on ring2d, 1.1e5 NFE and
4.5e-6 on mix64d. The halving check gives about 4e-11 for the reference.

Solvers, each at NFE 5, 10, 20, 50, 100 (steps = NFE // evaluations per step):

* sdediff: every registered fixed-step ODE solver (``available_solvers("ode")``, adaptive ones
  skipped) on the grids ``uniform``, ``log_snr``, ``karras``, ``quadratic``.
  At 5, 10 and 20 NFE also on grids calibrated by ``sdediff.calibrate_grid`` on pilot draws of
  another seed, and the peers again on those grids (``calibrated_grids.py``; ``--no-calibrate``
  skips them).
* k-diffusion: euler, heun, dpm_2, lms, dpmpp_2m, dpm_fast, run in the VE variables
  (``x / alpha``, ``sigma / alpha``) with the exact denoiser ``D = (x + sigma^2 score) / alpha``,
  and sigmas ending at ``sigma_VE(t_end)``. k-diffusion's ``get_sigmas_*`` append a final 0; it is
  dropped (``get_sigmas_*(steps + 1)[:-1]``). Grids: karras and exponential (= uniform log-SNR),
  and sdediff's uniform and quadratic times mapped to sigma. dpm_fast sets its own grid.
* torchdiffeq: the fixed-grid methods (euler, midpoint, heun2, heun3, rk4, explicit_adams with
  its default ``max_order`` = 12 and with 4 and 5) on ``sde.probability_flow(score)`` in ``t``,
  on sdediff's four grids. The NFE of explicit_adams, which starts with RK4 steps, is fitted to
  the budget by lowering the number of steps.
* diffusers: DPMSolverMultistep (dpmsolver++ / dpmsolver, orders 2 and 3, midpoint / heun),
  UniPCMultistep (orders 2 and 3, bh1 / bh2), both with ``lower_order_final`` on (default) and
  off, DDIM and LMSDiscrete, with
  ``final_sigmas_type="sigma_min"`` where available and the exact eps of the mixture at integer
  timesteps (the model ``sdediff.discrete_score_fn`` wraps). Grids: sdediff's four grids
  rounded to integer timesteps (duplicates merged, so the NFE can be lower), passed as
  ``set_timesteps(timesteps=...)`` (DPMSolver) or set as the schedule (UniPC and LMS have no
  custom-timestep argument). The native ``trailing`` spacing is run too. DDIM aligns only with
  ``trailing`` spacing and ``set_alpha_to_one=False``. DPMSolver's and UniPC's Karras, Lu and
  exponential sigmas fall between timesteps. They are run with the exact eps at the scheduler's
  own sigma, as for a continuous-time model, on a schedule of ``steps + 1`` sigmas stopped
  after ``steps`` steps at sigma_min. Their own final step is a zero-length step, from sigma_min
  to sigma_min, that would cost one more evaluation. Stopping early also means that the step
  ``lower_order_final`` lowers is never run. All in float64: the scheduler tables are rebuilt in float64 from
  the same betas, and DPMSolver's cast of the state to float32 inside ``step`` is suppressed
  (``peers.KeepFloat64``).

Outputs (``--out-dir``, default ``benchmarks/results``): ``solver_accuracy.json`` (every run),
``solver_accuracy.md`` (best sdediff vs best peer per problem and NFE, then the full tables),
``solver_accuracy.png`` (RMSE against NFE, log-log, one panel per problem).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import sdediff

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrated_grids  # noqa: E402
import peers  # noqa: E402
from problems import (BETAS, F64, N_TRAIN, REF_TOL, SCHEDULE, SDE, T_END, T_START,  # noqa: E402
                      _alpha, make_problem, reference, rmse, sigma_ve)

NFES = (5, 10, 20, 50, 100)
GRIDS = tuple(getattr(sdediff.grids, "GRIDS", ("uniform", "log_snr", "karras", "quadratic")))  # sdediff's named grids
RMSE_DEFINITION = ("RMSE = sqrt(mean over the batch and all coordinates of (x - x_ref)^2), x at t_end in the "
                   "VP variables")

TORCHDIFFEQ_METHODS = [("euler", {}), ("midpoint", {}), ("heun2", {}), ("heun3", {}), ("rk4", {}),
                       ("explicit_adams", {}), ("explicit_adams", {"max_order": 4}), ("explicit_adams", {"max_order": 5})]
KD_SAMPLERS = {"euler": 1, "heun": 2, "dpm_2": 2, "lms": 1, "dpmpp_2m": 1}  # name: evaluations per step
KD_GRIDS = ("karras", "exponential", "uniform", "quadratic")
DPM_CONFIGS = [(algo, order, kind, lof) for algo in ("dpmsolver++", "dpmsolver") for order in (2, 3)
               for kind in ("midpoint", "heun") for lof in (True, False)]
UNIPC_CONFIGS = [(order, kind, lof) for order in (2, 3) for kind in ("bh1", "bh2") for lof in (True, False)]


# --------------------------------------------------------------------------------------------
# runners: each yields (config, run) with run(steps) -> x at t_end; counting is done by the caller
# --------------------------------------------------------------------------------------------

def fit_budget(run, counter, budget, steps):
    """Run with ``steps`` steps, fewer if the count exceeds ``budget``; ``(x, nfe, steps)`` or None."""
    while steps >= 1:
        counter.reset()
        x = run(steps)
        nfe = counter.calls
        if nfe <= budget:
            return x, nfe, steps
        steps = max(1, steps - max(1, math.ceil((nfe - budget) * steps / nfe))) if steps > 1 else 0
    return None


def sdediff_configs(counter, x_T, grids):
    for name, info in sdediff.available_solvers("ode").items():
        if info.adaptive or not info.evals_per_step:
            continue
        for grid in grids:
            def run(steps, name=name, grid=grid):
                return sdediff.sample_ode(counter, SDE, x_T, steps=steps, solver=name, grid=grid, t_start=T_START,
                                          t_end=T_END).x
            yield dict(library="sdediff", solver=name, grid=grid, options="", evals_per_step=info.evals_per_step), run


def torchdiffeq_configs(counter, x_T, grids, methods):
    import torchdiffeq

    flow = SDE.probability_flow(counter)
    for method, options in methods:
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        for grid in grids:
            def run(steps, method=method, options=options, grid=grid):
                ts = sdediff.time_grid(SDE, steps, grid=grid, t_start=T_START, t_end=T_END)
                return torchdiffeq.odeint(flow, x_T, ts, method=method, options=options)[-1]
            yield dict(library="torchdiffeq", solver=method, grid=grid, options=opts, evals_per_step=None), run


def _kd_sigmas(kd, grid, steps):
    s_max, s_min = float(sigma_ve(T_START)), float(sigma_ve(T_END))
    if grid == "karras":
        sigmas = kd.get_sigmas_karras(steps + 1, s_min, s_max, rho=7.0)[:-1]
    elif grid == "exponential":
        sigmas = kd.get_sigmas_exponential(steps + 1, s_min, s_max)[:-1]
    else:
        sigmas = sigma_ve(sdediff.time_grid(SDE, steps, grid=grid, t_start=T_START, t_end=T_END))
    sigmas = sigmas.to(F64).clone()
    sigmas[0], sigmas[-1] = s_max, s_min  # exact end points (the ramps round them)
    return sigmas


def kdiffusion_configs(kd, counter, x_T, grids, samplers):
    x_ve = x_T / _alpha(T_START)
    a_end = _alpha(T_END)
    for name, per_step in samplers.items():
        sampler = getattr(kd, f"sample_{name}")
        for grid in grids:
            def run(steps, sampler=sampler, grid=grid):
                return a_end * sampler(counter, x_ve, _kd_sigmas(kd, grid, steps), disable=True)
            yield dict(library="k-diffusion", solver=name, grid=grid, options="", evals_per_step=per_step), run

    def run_fast(nfe):
        s_max, s_min = float(sigma_ve(T_START)), float(sigma_ve(T_END))
        return a_end * kd.sample_dpm_fast(counter, x_ve, s_min, s_max, nfe, disable=True)
    yield dict(library="k-diffusion", solver="dpm_fast", grid="own (log-SNR)", options="", evals_per_step=1), run_fast


def integer_timesteps(grid, steps):
    """sdediff's grid rounded to integer timesteps ``n = round(N t - 1)``, without duplicates, without the end (0)."""
    ts = sdediff.time_grid(SDE, steps, grid=grid, t_start=T_START, t_end=T_END)
    n = torch.unique((ts * N_TRAIN - 1.0).round().long(), sorted=True).flip(0)
    assert int(n[0]) == N_TRAIN - 1 and int(n[-1]) == 0
    return n[:-1].tolist()


def _diffusers_loop(sched, model, x_T):
    x = x_T.clone().as_subclass(peers.KeepFloat64)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
    return x.as_subclass(torch.Tensor)


def diffusers_configs(dif, counter, score_fn, x_T, grids, dpm_configs, unipc_configs, lms=True, ddim=True,
                      continuous=("karras", "lu", "exponential")):
    """``counter``: a :class:`peers.CallCounter` whose function each run sets to its eps model."""
    abar = torch.cumprod(1.0 - BETAS, 0)
    sigma_min, sigma_max = peers.ve_sigma(abar[0]), peers.ve_sigma(abar[-1])

    def discrete_model():
        counter.fn = peers.discrete_eps_model(score_fn, SDE, N_TRAIN)
        return counter

    def continuous_loop(sched, steps):
        sched.set_timesteps(steps + 1)
        peers.float64_sigmas(sched, at_timesteps=False)
        sched.sigmas[0], sched.sigmas[steps:] = sigma_max, sigma_min  # exact end points (float32 in diffusers)
        return peers.run_continuous(sched, counter, score_fn, SDE, x_T, steps)

    def aligned(sched, grid, steps):
        """Integer timesteps from ``grid`` (or the native spacing), exact float64 sigmas, final sigma_min."""
        if grid == "trailing":
            sched.set_timesteps(steps)
        else:
            ts = integer_timesteps(grid, steps)
            if isinstance(sched, dif.DPMSolverMultistepScheduler):
                sched.set_timesteps(timesteps=ts)
            else:  # no custom-timestep argument: set the schedule as DPMSolver's set_timesteps(timesteps=) would
                sched.set_timesteps(len(ts))
                sched.timesteps = torch.tensor(ts, dtype=sched.timesteps.dtype)
                sched.num_inference_steps = len(ts)
        peers.float64_sigmas(sched, final_sigma=sigma_min)
        return sched

    native = ("trailing",)
    for algo, order, kind, lof in dpm_configs:
        opts = f"{algo}, order {order}, {kind}" + ("" if lof else ", lower_order_final=False")
        for grid in tuple(grids) + native:
            def run(steps, algo=algo, order=order, kind=kind, grid=grid, lof=lof):
                sched = dif.DPMSolverMultistepScheduler(**SCHEDULE, solver_order=order, algorithm_type=algo,
                                                        solver_type=kind, final_sigmas_type="sigma_min",
                                                        timestep_spacing="trailing", lower_order_final=lof)
                peers.float64_scheduler(sched, BETAS)
                return _diffusers_loop(aligned(sched, grid, steps), discrete_model(), x_T)
            yield dict(library="diffusers", solver="DPMSolverMultistep", grid=grid, options=opts,
                       evals_per_step=1), run
        for grid in continuous:
            flag = {"karras": "use_karras_sigmas", "lu": "use_lu_lambdas", "exponential": "use_exponential_sigmas"}[grid]

            def run(steps, algo=algo, order=order, kind=kind, flag=flag, lof=lof):
                sched = dif.DPMSolverMultistepScheduler(**SCHEDULE, solver_order=order, algorithm_type=algo,
                                                        solver_type=kind, final_sigmas_type="sigma_min",
                                                        lower_order_final=lof, **{flag: True})
                peers.float64_scheduler(sched, BETAS)
                return continuous_loop(sched, steps)
            yield dict(library="diffusers", solver="DPMSolverMultistep", grid=f"{grid} (continuous)", options=opts,
                       evals_per_step=1), run

    for order, kind, lof in unipc_configs:
        opts = f"order {order}, {kind}" + ("" if lof else ", lower_order_final=False")
        for grid in tuple(grids) + native:
            def run(steps, order=order, kind=kind, grid=grid, lof=lof):
                sched = dif.UniPCMultistepScheduler(**SCHEDULE, solver_order=order, solver_type=kind,
                                                    final_sigmas_type="sigma_min", timestep_spacing="trailing",
                                                    lower_order_final=lof)
                peers.float64_scheduler(sched, BETAS)
                return _diffusers_loop(aligned(sched, grid, steps), discrete_model(), x_T)
            yield dict(library="diffusers", solver="UniPCMultistep", grid=grid, options=opts, evals_per_step=1), run
        for grid in continuous:
            if grid == "lu":
                continue  # UniPC has no Lu lambdas
            flag = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}[grid]

            def run(steps, order=order, kind=kind, flag=flag, lof=lof):
                sched = dif.UniPCMultistepScheduler(**SCHEDULE, solver_order=order, solver_type=kind,
                                                    final_sigmas_type="sigma_min", lower_order_final=lof,
                                                    **{flag: True})
                peers.float64_scheduler(sched, BETAS)
                return continuous_loop(sched, steps)
            yield dict(library="diffusers", solver="UniPCMultistep", grid=f"{grid} (continuous)", options=opts,
                       evals_per_step=1), run

    if ddim:
        def run(steps):
            sched = dif.DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                                      timestep_spacing="trailing")
            peers.float64_scheduler(sched, BETAS)
            sched.set_timesteps(steps)
            return _diffusers_loop(sched, discrete_model(), x_T)
        yield dict(library="diffusers", solver="DDIM", grid="trailing", options="eta 0", evals_per_step=1), run

    if lms:
        for grid in grids:
            def run(steps, grid=grid):
                sched = dif.LMSDiscreteScheduler(**SCHEDULE)
                peers.float64_scheduler(sched, BETAS)
                aligned(sched, grid, steps)
                s0, s1 = sched.sigmas[0], sched.sigmas[-1]
                x = x_T * (s0**2 + 1).sqrt()  # LMS works in the VE variables x / alpha
                model = discrete_model()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # quad's accuracy warnings on tiny steps
                    for t in sched.timesteps:
                        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, return_dict=False)[0]
                return x / (s1**2 + 1).sqrt()
            yield dict(library="diffusers", solver="LMSDiscrete", grid=grid, options="order 4", evals_per_step=1), run


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------

def sweep(problem, args, log):
    gm, x_T = problem["gm"], problem["x_T"]
    exact_score = gm.score_fn(SDE)
    counter = peers.CallCounter(exact_score)
    rows = []
    quick = args.quick
    nfes = (10, 20) if quick else NFES
    grids = ("log_snr", "karras") if quick else GRIDS

    t0 = time.perf_counter()
    ref, ref_nfe = reference(exact_score, x_T, REF_TOL)
    t_ref = time.perf_counter() - t0
    half, half_nfe = reference(exact_score, x_T, REF_TOL / 2)
    check = {"tol": REF_TOL, "nfe": ref_nfe, "seconds": round(t_ref, 2), "half_tol_nfe": half_nfe,
             "rmse_vs_half_tol": rmse(ref, half), "rms_of_reference": float((ref**2).mean().sqrt())}
    log(f"  reference: dopri5 in log sigma, tol {REF_TOL:g}: {ref_nfe} NFE, {t_ref:.1f} s; "
        f"RMSE to tol {REF_TOL / 2:g}: {check['rmse_vs_half_tol']:.2e}")
    if args.t_check:
        # sample_ode(solver="dopri5")'s computation, through integrate: sample_ode's score monitor keeps one
        # tensor per score call, and over the ~1e5 calls of this solve the process grows by gigabytes.
        t0 = time.perf_counter()
        term = sdediff.ReverseProcess(SDE, exact_score, 0.0).ode_term()
        sol = sdediff.integrate(term, x_T, torch.tensor([T_START, T_END], dtype=F64), solver="dopri5", rtol=REF_TOL,
                                atol=REF_TOL)
        check["dopri5_in_t"] = {"nfe": sol.nfe, "seconds": round(time.perf_counter() - t0, 1),
                                "rmse_vs_reference": rmse(sol.x, ref)}
        log(f"  check: dopri5 in t (as sample_ode), tol {REF_TOL:g}: {sol.nfe} NFE, RMSE to the reference "
            f"{rmse(sol.x, ref):.2e}")

    calibrated, check["calibration"] = {}, []
    if args.calibrate:
        calibrated, check["calibration"] = calibrated_grids.calibrate(problem, exact_score, args.seed, log=log)
    sources = [("sdediff", lambda: sdediff_configs(counter, x_T, grids), counter),
               ("sdediff", lambda: calibrated_grids.sdediff_configs(counter, x_T, calibrated), counter)]
    try:
        import torchdiffeq  # noqa: F401
        methods = [("euler", {}), ("rk4", {})] if quick else TORCHDIFFEQ_METHODS
        sources.append(("torchdiffeq", lambda: torchdiffeq_configs(counter, x_T, grids, methods), counter))
    except ImportError:
        log("  note: torchdiffeq missing, skipped")
    kd = peers.load_k_diffusion()
    if kd is None:
        log(f"  note: k-diffusion skipped: {peers.why_missing('k-diffusion')}")
    else:
        kgrids = ("karras", "exponential") if quick else KD_GRIDS
        counted_denoiser = peers.CallCounter(peers.ve_denoiser(exact_score, SDE))
        sources.append(("k-diffusion", lambda: kdiffusion_configs(kd, counted_denoiser, x_T, kgrids, KD_SAMPLERS),
                        counted_denoiser))
        sources.append(("k-diffusion", lambda: calibrated_grids.kdiffusion_configs(kd, counted_denoiser, x_T,
                                                                                   calibrated), counted_denoiser))
    dif = peers.load_diffusers()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")  # algorithm_type="dpmsolver"
    if dif is None:
        log(f"  note: diffusers skipped: {peers.why_missing('diffusers')}")
    else:
        eps_counter = peers.CallCounter(None)
        dpm = DPM_CONFIGS[:1] if quick else DPM_CONFIGS
        unipc = UNIPC_CONFIGS[2:3] if quick else UNIPC_CONFIGS
        continuous = ("karras",) if quick else ("karras", "lu", "exponential")
        sources.append(("diffusers", lambda: diffusers_configs(dif, eps_counter, exact_score, x_T, grids, dpm, unipc,
                                                               continuous=continuous), eps_counter))
        sources.append(("diffusers", lambda: calibrated_grids.diffusers_configs(dif, eps_counter, exact_score, x_T,
                                                                                calibrated, dpm, unipc), eps_counter))

    for lib, make, cnt in sources:
        t_lib, n_runs = time.perf_counter(), 0
        for config, run in make():
            for budget in nfes:
                if "nfes" in config and budget not in config["nfes"]:  # a calibrated grid exists at these only
                    continue
                per_step = config["evals_per_step"] or 1
                steps = budget // per_step if config["solver"] != "dpm_fast" else budget
                row = dict(problem=problem["name"], **{k: v for k, v in config.items()
                                                       if k not in ("evals_per_step", "nfes")},
                           nfe_budget=budget)
                if steps < 1:
                    continue
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        fitted = fit_budget(run, cnt, budget, steps)
                except Exception as err:  # a peer or solver refusing a setting is recorded, not fatal
                    row.update(error=f"{type(err).__name__}: {err}"[:300])
                    rows.append(row)
                    continue
                if fitted is None:
                    continue
                x, nfe, steps = fitted
                err = rmse(x, ref)
                row.update(steps=steps, nfe=nfe, rmse=err if math.isfinite(err) else None,
                           seconds=round(time.perf_counter() - t0, 4))
                rows.append(row)
                n_runs += 1
        log(f"  {lib}: {n_runs} runs, {time.perf_counter() - t_lib:.1f} s")
    return rows, check


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------

def label(row) -> str:
    opts = f" [{row['options']}]" if row.get("options") else ""
    return f"{row['library']}:{row['solver']}{opts} @ {row['grid']}"


def best(rows, budget, libraries=None, exclude=None):
    ok = [r for r in rows if r.get("rmse") is not None and r["nfe"] <= budget
          and (libraries is None or r["library"] in libraries) and (exclude is None or r["library"] != exclude)]
    return min(ok, key=lambda r: r["rmse"]) if ok else None


def _sample_ode_default():
    """``(solver, grid)`` that ``sample_ode(score_fn, sde, x, steps=n)`` uses."""
    params = inspect.signature(sdediff.sample_ode).parameters
    solver = params["solver"].default
    grid = params["grid"].default
    if grid is None:
        grid = getattr(sdediff.get_solver(solver, "ode"), "default_grid", "uniform")
    return {"solver": solver, "grid": grid}


def _calibrated(row) -> bool:
    return row["grid"].startswith("calibrated")


def summary(rows, problems, nfes):
    """Per problem and NFE: the best sdediff run and the best peer run on the peers' own and sdediff's standard
    grids (``ratio``, the target's); the best sdediff run without calibrated grids (``ratio_standard``); and the
    best peer on sdediff's calibrated grids, transferred (``ratio_transferred``: how much is the grid's)."""
    def entry(r):
        return None if r is None else {"config": label(r), "rmse": r["rmse"], "nfe": r["nfe"]}

    def ratio(a, b):
        return None if a is None or b is None else a["rmse"] / b["rmse"]

    out = []
    for p in problems:
        pr = [r for r in rows if r["problem"] == p]
        sdediff_rows = [r for r in pr if r["library"] == "sdediff"]
        peer_rows = [r for r in pr if r["library"] != "sdediff"]
        for budget in nfes:
            s, q = best(sdediff_rows, budget), best([r for r in peer_rows if not _calibrated(r)], budget)
            s_std = best([r for r in sdediff_rows if not _calibrated(r)], budget)
            q_cal = best([r for r in peer_rows if _calibrated(r) and r["nfe_budget"] == budget], budget)
            out.append({"problem": p, "nfe": budget, "sdediff": entry(s), "peer": entry(q), "ratio": ratio(s, q),
                        "sdediff_standard": entry(s_std), "ratio_standard": ratio(s_std, q),
                        "peer_transferred": entry(q_cal), "ratio_transferred": ratio(s, q_cal)})
    return out


def write_markdown(path, result):
    lines = ["# Solver accuracy: sdediff vs peers at equal NFE", "",
             f"Generated by `python benchmarks/solver_accuracy.py` ({result['meta']['date']}). "
             f"{result['meta']['rmse_definition']}; against a float64 reference (see the JSON for its check). "
             "NFE = score (denoiser, eps-model) calls counted around the function; a run counts at a budget when it "
             "used at most that many. Ratio = best sdediff RMSE / best peer RMSE (target: <= 0.5).", ""]
    for name, p in result["problems"].items():
        c = p["reference_check"]
        extra = ""
        if "dopri5_in_t" in c:
            extra = (f"; dopri5 in t (as `sample_ode`) at the same tolerance: {c['dopri5_in_t']['nfe']} NFE, "
                     f"RMSE {c['dopri5_in_t']['rmse_vs_reference']:.1e} from it")
        default = result["meta"]["sample_ode_default"]
        d_rows = {r["nfe_budget"]: r for r in result["runs"] if r["problem"] == name and r["library"] == "sdediff"
                  and r["solver"] == default["solver"] and r["grid"] == default["grid"] and r.get("rmse") is not None}
        d_line = ", ".join(f"NFE {n}: {d_rows[n]['rmse']:.2e}" for n in result["meta"]["nfes"] if n in d_rows)
        lines += [f"## {name}: {p['description']}", "",
                  f"Batch {p['batch']}. Reference: dopri5 in log sigma_VE, rtol = atol = {c['tol']:g}, {c['nfe']} NFE; "
                  f"RMSE to the half-tolerance solve {c['rmse_vs_half_tol']:.1e}{extra}. "
                  f"RMS of the reference samples: {c['rms_of_reference']:.2f}.", "",
                  f"`sample_ode`'s default (`solver={default['solver']!r}`, its default grid "
                  f"`{default['grid']!r}`): {d_line}.", "",
                  "Columns: the best sdediff run (calibrated grids included) against the best peer on its own and "
                  "sdediff's standard grids (ratio: the target's); the best sdediff run on a standard grid (ratio "
                  "std); the best peer run on sdediff's calibrated grids, transferred (ratio cal: sdediff over it).",
                  "",
                  "| NFE | best sdediff | RMSE | best peer | RMSE | ratio | best sdediff, standard grid | RMSE "
                  "| ratio std | best peer on a calibrated grid | RMSE | ratio cal |",
                  "|---:|---|---:|---|---:|---:|---|---:|---:|---|---:|---:|"]
        for s in result["summary"]:
            if s["problem"] != name:
                continue
            def fmt(e, nfe=s["nfe"]):
                if e is None:
                    return ["-", "-"]
                return [f"`{e['config']}`" + (f" ({e['nfe']} NFE)" if e["nfe"] != nfe else ""), f"{e['rmse']:.2e}"]

            def rat(v):
                return "-" if v is None else f"{v:.2f}"
            cells = [str(s["nfe"])] + fmt(s["sdediff"]) + fmt(s["peer"]) + [rat(s["ratio"])] \
                + fmt(s["sdediff_standard"]) + [rat(s["ratio_standard"])] + fmt(s["peer_transferred"]) \
                + [rat(s["ratio_transferred"])]
            lines.append("| " + " | ".join(cells) + " |")
        cal = p["reference_check"].get("calibration") or []
        if cal:
            lines += ["", "Calibrations (`sdediff.calibrate_grid` on pilot draws of another seed):", ""]
            lines += [f"- `{c['solver']}`, {c['steps']} steps, {c['pilot']} pilot draws: pilot RMSE "
                      f"{c['pilot_rmse_initial']:.2e} -> {c['pilot_rmse']:.2e}, {c['runs']} runs, {c['nfe']} NFE, "
                      f"{c['seconds']} s" for c in cal]
        lines.append("")
    nfes = result["meta"]["nfes"]
    for name in result["problems"]:
        lines += [f"### All runs: {name}", "", "RMSE at each NFE budget (actual NFE in parentheses when lower).", "",
                  "| library | solver | options | grid | " + " | ".join(str(n) for n in nfes) + " |",
                  "|---|---|---|---|" + "---:|" * len(nfes)]
        table = {}
        for r in result["runs"]:
            if r["problem"] != name:
                continue
            key = (r["library"], r["solver"], r.get("options", ""), r["grid"])
            if r.get("error"):
                cell = "error"
            elif r.get("rmse") is None:
                cell = "nan"
            else:
                cell = f"{r['rmse']:.2e}" + (f" ({r['nfe']})" if r["nfe"] != r["nfe_budget"] else "")
            table.setdefault(key, {})[r["nfe_budget"]] = cell
        for key, cells in table.items():
            lines.append("| " + " | ".join(key) + " | " + " | ".join(cells.get(n, "") for n in nfes) + " |")
        lines.append("")
    errors = [r for r in result["runs"] if r.get("error")]
    if errors:
        lines += ["### Errors", ""] + [f"- {label(r)}, NFE {r['nfe_budget']}: {r['error']}" for r in errors[:50]] + [""]
    Path(path).write_text("\n".join(lines))


def plot(path, result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["problems"])
    fig, axes = plt.subplots(1, len(names), figsize=(7.5 * len(names), 6.0), squeeze=False)
    colors = {"sdediff": "black", "k-diffusion": "tab:red", "torchdiffeq": "tab:blue", "diffusers": "tab:green"}
    nfes = result["meta"]["nfes"]
    for ax, name in zip(axes[0], names):
        rows = [r for r in result["runs"] if r["problem"] == name and r.get("rmse") is not None]
        solvers = sorted({r["solver"] for r in rows if r["library"] == "sdediff"})
        cmap = plt.get_cmap("tab20")
        for i, solver in enumerate(solvers):  # each sdediff solver, best over grids
            pts = [(n, b["rmse"]) for n in nfes if (b := best([r for r in rows if r["solver"] == solver
                                                                and r["library"] == "sdediff"], n))]
            if pts:
                ax.loglog(*zip(*pts), "-", color=cmap(i % 20), lw=1.0, alpha=0.8, label=f"sdediff {solver}")
        for lib, color in colors.items():  # envelope of each library (peers on their own and standard grids)
            pts = [(n, b["rmse"]) for n in nfes if (b := best([r for r in rows if lib == "sdediff"
                                                               or not _calibrated(r)], n, libraries=(lib,)))]
            if pts:
                ax.loglog(*zip(*pts), "o-" if lib == "sdediff" else "s--", color=color, lw=2.5,
                          label=f"best {lib}", zorder=5)
        pts = [(n, b["rmse"]) for n in nfes if (b := best([r for r in rows if not _calibrated(r)], n,
                                                           libraries=("sdediff",)))]
        if pts and any(_calibrated(r) for r in rows):
            ax.loglog(*zip(*pts), "o:", color="black", lw=1.5, label="best sdediff, standard grids", zorder=4)
        ax.set_title(f"{name}: {result['problems'][name]['description']}", fontsize=9)
        ax.set_xlabel("NFE (score evaluations)")
        ax.set_ylabel("pathwise RMSE at t_end")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------

def _dump(result) -> str:
    """JSON with one run per line (the file stays readable and diffable)."""
    head = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1)
    runs = ",\n".join("  " + json.dumps(r) for r in result["runs"])
    return head[:-2] + ',\n "runs": [\n' + runs + "\n ]\n}\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: NFE 10 and 20, fewer grids and peers, batch 32")
    p.add_argument("--problems", nargs="+", default=["ring2d", "mix64d"], choices=["ring2d", "mix64d"])
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--batch", type=int, default=None, help="samples per problem (default 256 / 128; 32 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior draws x_T")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip the calibrated grids (sdediff.calibrate_grid; about 5 min; also skipped with --quick)")
    p.add_argument("--t-check", action="store_true",
                   help="also solve in t with dopri5 at the same tolerance, as sample_ode(solver='dopri5') does, "
                        "and report its distance from the reference (about 1e5 NFE: minutes per problem)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.calibrate = args.calibrate and not args.quick
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(F64)  # peers build their grids with the default dtype (k-diffusion's linspace, ...)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = 32 if args.quick and args.batch is None else args.batch
    t_all = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    result = {"meta": {
        "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "nfes": [10, 20] if args.quick else list(NFES),
        "rmse_definition": RMSE_DEFINITION, "threads": args.threads, "seed": args.seed,
        "sde": "VPSDE.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=float64))",
        "t_start": T_START, "t_end": T_END, "sigma_ve_start": float(sigma_ve(T_START)),
        "sigma_ve_end": float(sigma_ve(T_END)),
        "sdediff_ode_solvers": {k: {"evals_per_step": v.evals_per_step, "order": v.order,
                                    "default_grid": getattr(sdediff.get_solver(k, "ode"), "default_grid", None)}
                                for k, v in sdediff.available_solvers("ode").items() if not v.adaptive},
        "sample_ode_default": _sample_ode_default(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{d: peers.version(d) for d in ("sdediff", "k-diffusion", "diffusers", "torchdiffeq", "scipy")}},
    }, "problems": {}, "runs": []}
    for name in args.problems:
        problem = make_problem(name, batch, args.seed)
        log(f"{name}: {problem['description']}, batch {problem['batch']}")
        rows, check = sweep(problem, args, log)
        result["problems"][name] = {"description": problem["description"], "batch": problem["batch"],
                                    "dim": problem["dim"], "reference_check": check, "mixture": problem["params"]}
        result["runs"] += rows
    result["summary"] = summary(result["runs"], args.problems, result["meta"]["nfes"])
    result["meta"]["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "solver_accuracy.json").write_text(_dump(result))
    write_markdown(out / "solver_accuracy.md", result)
    plot(out / "solver_accuracy.png", result)
    log("")
    log(f"{'problem':8s} {'NFE':>4s}  {'best sdediff':58s} {'RMSE':>9s}  {'best peer':58s} {'RMSE':>9s} {'ratio':>6s} "
        f"{'std':>6s} {'cal':>6s}")
    nan = {"config": "-", "rmse": float("nan")}
    for s in result["summary"]:
        a, b = s["sdediff"] or nan, s["peer"] or nan
        r = [float("nan") if s[k] is None else s[k] for k in ("ratio", "ratio_standard", "ratio_transferred")]
        log(f"{s['problem']:8s} {s['nfe']:4d}  {a['config'][:58]:58s} {a['rmse']:9.2e}  {b['config'][:58]:58s} "
            f"{b['rmse']:9.2e} {r[0]:6.2f} {r[1]:6.2f} {r[2]:6.2f}")
    log(f"\nwrote {out}/solver_accuracy.{{json,md,png}} in {result['meta']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
