"""Calibrated grids for ``solver_accuracy.py``: fit them on pilot draws, then run sdediff and the peers on them.

``sdediff.calibrate_grid`` fits a grid per solver and step count on a pilot batch of prior draws
(another seed than the benchmark's batch), so the benchmark measures how it generalizes to new
draws. The same grids are then handed to the peers whose samplers make one model call per step
and take any grid: k-diffusion's (sigmas) and diffusers' multistep schedulers (their sigmas set
directly, the exact eps evaluated at them as for a continuous-time model). Those runs are
labelled ``transferred``: they show how much of the gain is the grid rather than the solver.
"""

from __future__ import annotations

import time

import torch

import sdediff

import peers
import problems as sa

# solver: the NFEs it is calibrated at (above 20 the standard grids already reach the target): sample_ode's
# default, and at 20 the solver that is best there on a standard grid
SOLVERS = {"unipc": (5, 10, 20), "unipc_4_t": (20,)}
PILOT = {"ring2d": 1024, "mix64d": 256}  # draws; 256 on ring2d gave a grid 5x worse on one held-out batch
MAX_RUNS = 1000  # per calibration, below calibrate_grid's default above 6 steps (mix64d's score is slow)
PILOT_SEED_OFFSET = 1000
KD_SAMPLERS = ("euler", "lms", "dpmpp_2m")  # one model call per step


def label(solver: str) -> str:
    return f"calibrated for {solver}"


def calibrate(problem, score_fn, seed: int, solvers=None, log=print):
    """``({solver: {steps: grid}}, [record])``: one grid per solver and NFE (``solvers``: as ``SOLVERS``), fitted
    on pilot draws."""
    pilot = sa.SDE.prior_sample((PILOT[problem["name"]], problem["dim"]),
                                generator=torch.Generator().manual_seed(seed + PILOT_SEED_OFFSET), dtype=sa.F64)
    reference, _ = sa.reference(score_fn, pilot, sa.REF_TOL)  # exact, not calibrate_grid's default high-order solve
    grids, records = {}, []
    for solver, nfes in (SOLVERS if solvers is None else solvers).items():
        per_step = sdediff.available_solvers("ode")[solver].evals_per_step
        for nfe in nfes:
            steps = nfe // per_step
            if steps < 2:
                continue
            t0 = time.perf_counter()
            cal = sdediff.calibrate_grid(score_fn, sa.SDE, pilot, steps, solver=solver, reference=reference,
                                         t_start=sa.T_START, t_end=sa.T_END,
                                         max_runs=min(MAX_RUNS, sdediff.calibration.RUNS_PER_STEP * steps))
            seconds = time.perf_counter() - t0
            grids.setdefault(solver, {})[steps] = cal.grid
            records.append(dict(solver=solver, steps=steps, pilot=len(pilot), runs=cal.runs, nfe=cal.nfe,
                                seconds=round(seconds, 1), pilot_rmse_initial=cal.initial_rmse, pilot_rmse=cal.rmse,
                                grid=cal.grid.tolist()))
            log(f"  calibrated {solver} at {steps} steps on {len(pilot)} pilot draws: pilot RMSE "
                f"{cal.initial_rmse:.2e} -> {cal.rmse:.2e} ({cal.runs} runs, {cal.nfe} NFE, {seconds:.0f} s)")
    return grids, records


def sdediff_configs(counter, x_T, grids):
    """The solver each grid was fitted for on it, and the other multistep solvers of as many calls per step."""
    solvers = sdediff.available_solvers("ode")
    for solver, by_steps in grids.items():
        per_step = solvers[solver].evals_per_step
        for other, info in solvers.items():
            if info.adaptive or info.evals_per_step != per_step or (other != solver and other not in
                                                                     ("dpmpp_2m", "dpmpp_3m", "lms", "unipc_3")):
                continue

            def run(steps, other=other, by_steps=by_steps):
                return sdediff.sample_ode(counter, sa.SDE, x_T, grid=by_steps[steps], solver=other).x
            yield dict(library="sdediff", solver=other, grid=label(solver), options="", evals_per_step=per_step,
                       nfes=tuple(s * per_step for s in by_steps)), run


def _one_call_grids(grids):
    """The grids fitted for solvers of one score call per step: a peer with one call per step runs ``steps``
    steps of them at ``steps`` NFE (the others would need a grid of another length)."""
    solvers = sdediff.available_solvers("ode")
    return {solver: by_steps for solver, by_steps in grids.items() if solvers[solver].evals_per_step == 1}


def kdiffusion_configs(kd, counter, x_T, grids):
    x_ve = x_T / sa._alpha(sa.T_START)
    a_end = sa._alpha(sa.T_END)
    for solver, by_steps in _one_call_grids(grids).items():
        for sampler_name in KD_SAMPLERS:
            sampler = getattr(kd, f"sample_{sampler_name}")

            def run(steps, sampler=sampler, by_steps=by_steps):
                return a_end * sampler(counter, x_ve, sa.sigma_ve(by_steps[steps]).clone(), disable=True)
            yield dict(library="k-diffusion", solver=sampler_name, grid=f"{label(solver)} (transferred)", options="",
                       evals_per_step=1, nfes=tuple(by_steps)), run


def diffusers_configs(dif, counter, score_fn, x_T, grids, dpm_configs, unipc_configs):
    """DPMSolverMultistep and UniPCMultistep on the calibrated sigmas, run as ``solver_accuracy``'s continuous loop."""
    abar = torch.cumprod(1.0 - sa.BETAS, 0)
    sigma_min = peers.ve_sigma(abar[0])

    def loop(sched, sigmas):
        steps = len(sigmas) - 1
        sched.set_timesteps(steps + 1)  # steps + 1 distinct timesteps, then our sigmas and the final one
        sched.sigmas = torch.cat([sigmas, sigma_min.reshape(1)])
        return peers.run_continuous(sched, counter, score_fn, sa.SDE, x_T, steps)

    for solver, by_steps in _one_call_grids(grids).items():
        grid = f"{label(solver)} (transferred)"
        nfes = tuple(by_steps)
        for algo, order, kind, lof in dpm_configs:
            opts = f"{algo}, order {order}, {kind}" + ("" if lof else ", lower_order_final=False")

            def run(steps, algo=algo, order=order, kind=kind, lof=lof, by_steps=by_steps):
                sched = dif.DPMSolverMultistepScheduler(**sa.SCHEDULE, solver_order=order, algorithm_type=algo,
                                                        solver_type=kind, final_sigmas_type="sigma_min",
                                                        lower_order_final=lof, use_karras_sigmas=True)
                peers.float64_scheduler(sched, sa.BETAS)
                return loop(sched, sa.sigma_ve(by_steps[steps]))
            yield dict(library="diffusers", solver="DPMSolverMultistep", grid=grid, options=opts, evals_per_step=1,
                       nfes=nfes), run
        for order, kind, lof in unipc_configs:
            opts = f"order {order}, {kind}" + ("" if lof else ", lower_order_final=False")

            def run(steps, order=order, kind=kind, lof=lof, by_steps=by_steps):
                sched = dif.UniPCMultistepScheduler(**sa.SCHEDULE, solver_order=order, solver_type=kind,
                                                    final_sigmas_type="sigma_min", lower_order_final=lof,
                                                    use_karras_sigmas=True)
                peers.float64_scheduler(sched, sa.BETAS)
                return loop(sched, sa.sigma_ve(by_steps[steps]))
            yield dict(library="diffusers", solver="UniPCMultistep", grid=grid, options=opts, evals_per_step=1,
                       nfes=nfes), run
