"""Sampler overhead: wall time of a sampling loop divided by a bare loop of the same model calls.

The model is a small MLP (64 dims + 16 sinusoidal time features -> 256 -> 256 -> 64, SiLU,
float32, batch 512) under ``torch.no_grad()``. Each library gets it in its native form, so no
adapter arithmetic is timed. It is the score for sdediff and torchdiffeq, the denoiser
``D(x, sigma)`` for k-diffusion, and the eps-prediction ``eps(x, timestep)`` for diffusers. Each
sampler makes 50 steps, i.e. ``50 x evaluations per step`` model calls.

The baseline ("bare loop") is ``for c in cs: out = model(x, c)`` with the same number of calls.
``x`` is fixed (not updated), and the ``(batch,)`` time tensors ``cs`` are made before the clock
starts. So the baseline is the model's cost alone. A second baseline, "bare Euler loop"
(``x = x + h * model(x, c)``), adds the one update that any sampler has to make. A third, "bare
2-history multistep loop", makes the four tensor operations a DPM-Solver++(2M) / UniPC step needs
at the least in eager PyTorch (the history entry ``x + sigma^2 score``, then ``a x + b0 H0 + b1 H1``):
what their straightforward eager implementation cannot avoid. What a sampler
costs beyond the bare loop is its overhead: time grid, coefficients, state updates, Python.

The timed region covers everything a sampling call does given ``x_T``: sdediff's ``sample_ode``
(grid included); torchdiffeq's ``odeint`` (on the sampler's own grid via ``grid_constructor``,
returning only the end state); k-diffusion's ``get_sigmas_karras`` and ``sample_*`` (progress bar
disabled); diffusers' ``set_timesteps`` and the ``scale_model_input`` / model / ``step`` loop.
Constructing the scheduler is not timed.

A second baseline per sampler, the replay, calls the model on exactly the inputs that sampler gave
it, recorded in an untimed run: a sampler's time over its replay is its own work, and the
replay's time over the bare loop is the model's, which costs more on some inputs than on others.

Method: after warm-up runs, each round times every sampler, the bare loop with the same number of
calls and the sampler's replay, one after another (the order of the three rotates between rounds;
so does the order of the samplers), for ``--repeats`` rounds, all in one process. The ratio is the
median over rounds of sampler time / bare-loop time, so all three see the same load on a shared
machine; ``ratio_to_replay`` likewise. The ratios of the medians and of the minima are recorded
too, the overhead in microseconds per model call (median over rounds of sampler time minus
bare-loop time, divided by the calls), and the minor page faults per run. glibc is asked to keep
freed heap memory, so no loop pays for page faults after heap trimming, which hit some processes
and not others (``--allocator default`` leaves glibc's trimming on).
Subnormal floats are flushed to zero (``--denormals keep`` keeps them): the untrained MLP drives
the probability-flow states to |x| ~ 800, where SiLU underflows through subnormals and the model
alone costs 10-14% more than on the fixed ``x`` of the bare loop, a cost of the test model that a
trained one, whose states stay in the data's range, does not have.
``torch.set_num_threads(--threads)`` (default 1) is fixed and recorded. ``--device cuda``
synchronizes once after each timed run. Results go to ``benchmarks/results/overhead.json``
(``overhead_glibc_trim.json`` with ``--allocator default``, ``overhead_subnormals_kept.json`` with
``--denormals keep``).
"""

from __future__ import annotations

import argparse
import inspect
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sdediff

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402
import timing  # noqa: E402

DIM, HIDDEN, TIME_FEATURES = 64, 256, 16


class MLP(nn.Module):
    """``model(x, c)``: x ``(batch, 64)``; c a time / sigma / timestep, 0-d or ``(batch,)``."""

    def __init__(self, dim=DIM, hidden=HIDDEN, time_features=TIME_FEATURES):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), time_features // 2)))
        self.net = nn.Sequential(nn.Linear(dim + time_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, c):
        c = c.to(x.dtype).reshape(-1).expand(x.shape[0])
        angles = c[:, None] * self.freqs
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


def _quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return [q[0], q[2]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=31, help="timed rounds (median over them)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--solvers", default="default",
                   help="sdediff solvers: 'default' (sample_ode's default, euler, dpmpp_2m if registered), "
                        "'all' (every fixed-step ODE solver) or a comma-separated list")
    p.add_argument("--denormals", choices=timing.DENORMALS, default="flush",
                   help="'flush' (default): subnormal floats flushed to zero, so the test model costs the same at "
                        "every state; 'keep': IEEE subnormals (the untrained MLP's large states then slow SiLU)")
    p.add_argument("--allocator", choices=("default", "keep"), default="keep",
                   help="'keep' (default): glibc mallopt so freed heap memory is kept (no page faults from heap "
                        "trimming); 'default': glibc's own settings")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/overhead.json; overhead_glibc_trim.json with "
                        "--allocator default, overhead_subnormals_kept.json with --denormals keep)")
    return p.parse_args(argv)


def multistep_floor(model, x, cs):
    """The least a two-history exponential multistep step (DPM-Solver++(2M), UniPC) must do in eager
    PyTorch, one step per time in ``cs``: the history entry ``alpha x0 = x + sigma^2 score``, then the
    combination ``a x + b0 H0 + b1 H1`` (coefficients arbitrary but contracting, Python floats)."""
    def fn():
        y, previous = x, x
        for c in cs:
            h = torch.add(y, model(y, c), alpha=-0.01)
            y_next = torch.mul(y, 0.99)
            y_next.add_(h, alpha=0.005)
            y_next.add_(previous, alpha=-0.002)
            y, previous = y_next, h
        return y
    return fn


def build_loops(args, model, x):
    """``[(name, library, calls, fn)]``; ``fn()`` runs one sampling call."""
    device, batch, steps = x.device, x.shape[0], args.steps
    sde = sdediff.VPSDE()  # linear, beta 0.1 .. 20
    t_end = 1e-3
    loops = []

    # baselines
    def bare(calls):
        cs = [torch.full((batch,), 1.0 - i / calls, device=device) for i in range(calls)]

        def fn():
            for c in cs:
                out = model(x, c)
            return out
        return fn

    def bare_euler(calls):
        cs = [torch.full((batch,), 1.0 - i / calls, device=device) for i in range(calls)]
        h = -1.0 / calls

        def fn():
            y = x
            for c in cs:
                y = y + h * model(y, c)
            return y
        return fn

    def bare_multistep(calls):
        cs = [torch.full((batch,), 1.0 - i / calls, device=device) for i in range(calls)]
        return multistep_floor(model, x, cs)

    # sdediff
    default = inspect.signature(sdediff.sample_ode).parameters["solver"].default
    registered = {k: v for k, v in sdediff.available_solvers("ode").items() if not v.adaptive}
    if args.solvers == "default":
        names = [default] + [n for n in ("euler", "dpmpp_2m") if n != default and n in registered]
    elif args.solvers == "all":
        names = list(registered)
    else:
        names = [n.strip() for n in args.solvers.split(",")]
    for name in names:
        calls = steps * registered[name].evals_per_step
        label = f"sdediff sample_ode({name!r})" + (" [default]" if name == default else "")
        loops.append((label, "sdediff", calls,
                      lambda name=name: sdediff.sample_ode(model, sde, x, steps=steps, solver=name, t_end=t_end).x))

    # torchdiffeq: Euler on the same uniform grid, through grid_constructor, returning only x(t_end)
    try:
        import torchdiffeq
    except ImportError:
        print("note: torchdiffeq missing, skipped")
    else:
        b0, b1 = 0.1, 20.0

        def field(t, y):
            beta = b0 + t * (b1 - b0)
            return -0.5 * beta * (y + model(y, t.expand(batch)))

        def run_torchdiffeq():
            grid = torch.linspace(1.0, t_end, steps + 1, device=device)
            return torchdiffeq.odeint(field, x, grid[[0, -1]], method="euler",
                                      options=dict(grid_constructor=lambda f, y0, t: grid))[-1]
        loops.append(("torchdiffeq odeint(euler)", "torchdiffeq", steps, run_torchdiffeq))

    # k-diffusion
    kd = peers.load_k_diffusion()
    if kd is None:
        print(f"note: k-diffusion skipped: {peers.why_missing('k-diffusion')}")
    else:
        def kd_run(sampler):
            def fn():
                sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0, device=device)  # 50 sigmas + the final 0
                return sampler(model, x, sigmas, disable=True)
            return fn
        loops.append(("k-diffusion sample_euler", "k-diffusion", steps, kd_run(kd.sample_euler)))
        loops.append(("k-diffusion sample_dpmpp_2m", "k-diffusion", steps, kd_run(kd.sample_dpmpp_2m)))

    # diffusers
    dif = peers.load_diffusers()
    if dif is None:
        print(f"note: diffusers skipped: {peers.why_missing('diffusers')}")
    else:
        def dif_run(sched):
            def fn():
                sched.set_timesteps(steps, device=device)
                y = x * sched.init_noise_sigma
                for t in sched.timesteps:
                    out = model(sched.scale_model_input(y, t), t)
                    y = sched.step(out, t, y, return_dict=False)[0]
                return y
            return fn
        loops.append(("diffusers EulerDiscreteScheduler loop", "diffusers", steps,
                      dif_run(dif.EulerDiscreteScheduler())))
        loops.append(("diffusers DPMSolverMultistepScheduler loop", "diffusers", steps,
                      dif_run(dif.DPMSolverMultistepScheduler())))

    baselines = {}
    for calls in sorted({c for _, _, c, _ in loops}):
        baselines[calls] = (f"bare loop, {calls} calls", "baseline", calls, bare(calls))
    extra = [(f"bare Euler loop, {steps} calls", "baseline", steps, bare_euler(steps)),
             (f"bare 2-history multistep loop, {steps} calls", "baseline", steps, bare_multistep(steps))]
    return list(baselines.values()) + extra + loops, {c: v[0] for c, v in baselines.items()}


class Recorder:
    """``model`` that keeps a copy of every input it is called with (for the replay baselines)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, c):
        self.calls.append((x.clone(), c.clone()))
        return self.model(x, c)


def replay(model, calls):
    """The bare loop over the very inputs a sampler gave the model: its model work and nothing else."""
    def fn():
        for x, c in calls:
            out = model(x, c)
        return out
    return fn


def main(argv=None):
    args = parse_args(argv)
    heap_kept = timing.keep_heap() if args.allocator == "keep" else False
    if args.allocator == "keep" and not heap_kept:
        print("note: --allocator keep needs glibc; glibc's settings may be partly or not at all changed")
    flushed = timing.set_denormals(args.denormals)
    if args.denormals == "flush" and not flushed:
        print("note: this CPU cannot flush subnormals (torch.set_flush_denormal); they are kept")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = MLP().to(device).eval()
    x = torch.randn(args.batch, DIM, device=device)

    with torch.no_grad():
        loops, baseline_of = build_loops(args, model, x)
        samplers = [loop for loop in loops if loop[0] not in baseline_of.values()]
        bare_fn = {name: fn for name, _, _, fn in loops if name in baseline_of.values()}
        # The same loops around a recording model, run once each: the inputs every sampler gives the model.
        recorder = Recorder(model)
        replay_fn = {}
        recording = {name: fn for name, _, _, fn in build_loops(args, recorder, x)[0]}
        for name, _, calls, _ in samplers:
            recorder.calls = []
            recording[name]()
            if len(recorder.calls) != calls:
                raise RuntimeError(f"{name} made {len(recorder.calls)} model calls, expected {calls}")
            replay_fn[name] = replay(model, recorder.calls)

        def timed(fn):
            faults = timing.minor_faults()
            dt, out = timing.timed(fn, device)
            faults = timing.minor_faults() - faults
            if not bool(torch.isfinite(out).all()):
                raise FloatingPointError("a loop produced non-finite values")
            return dt, faults

        for _ in range(args.warmup):
            for name, _, _, fn in samplers:
                timed(fn), timed(replay_fn[name])
            for fn in bare_fn.values():
                timed(fn)
        # Each sampler is timed right next to its bare loop and its replay (the order of the three
        # rotates between rounds), so all see the same load; the order of the samplers rotates too.
        runs = {name: [] for name, _, _, _ in samplers}  # per round: ((t, faults) of sampler, bare, replay)
        for r in range(args.repeats):
            k = r % len(samplers)
            for name, _, calls, fn in samplers[k:] + samplers[:k]:
                trio = [fn, bare_fn[baseline_of[calls]], replay_fn[name]]
                order = [(i + r) % 3 for i in range(3)]
                measured = {i: timed(trio[i]) for i in order}
                runs[name].append(tuple(measured[i] for i in range(3)))

    results = []
    for name, library, calls, _ in loops:
        base = baseline_of[calls]
        if name == base:
            rows = [(m[1], m[1], m[1]) for n, _, c, _ in samplers if c == calls for m in runs[n]]
        else:
            rows = runs[name]
        t_m, t_b, t_r = ([row[j][0] for row in rows] for j in range(3))
        ratios = [a / b for a, b in zip(t_m, t_b)]
        replayed = [a / b for a, b in zip(t_m, t_r)]
        results.append({"name": name, "library": library, "model_calls": calls,
                        "median_ms": 1e3 * statistics.median(t_m), "min_ms": 1e3 * min(t_m),
                        "ms_per_model_call": 1e3 * statistics.median(t_m) / calls, "baseline": base,
                        "ratio": statistics.median(ratios),
                        "ratio_quartiles": _quartiles(ratios),
                        "overhead_us_per_call": 1e6 * statistics.median(a - b for a, b in zip(t_m, t_b)) / calls,
                        "ratio_of_medians": statistics.median(t_m) / statistics.median(t_b),
                        "ratio_of_minima": min(t_m) / min(t_b),
                        "ratio_to_replay": statistics.median(replayed),
                        "ratio_to_replay_quartiles": _quartiles(replayed),
                        "replay_over_bare": statistics.median(r / b for r, b in zip(t_r, t_b)),
                        "page_faults_per_run": statistics.median(row[0][1] for row in rows),
                        "replay_page_faults_per_run": statistics.median(row[2][1] for row in rows)})
    by_name = {row["name"]: row for row in results}

    per_call = by_name[baseline_of[args.steps]]["ms_per_model_call"] if args.steps in baseline_of else float("nan")
    print(f"device {device}, torch.set_num_threads({args.threads}), batch {args.batch}, {args.steps} steps, "
          f"median of {args.repeats} rounds, allocator {'heap kept' if heap_kept else 'default'}, "
          f"subnormals {'flushed' if flushed else 'kept'}; "
          f"bare model call: {per_call:.3f} ms")
    print(f"{'loop':44s} {'calls':>5s} {'ms/call':>7s} {'ratio':>6s} {'quartiles':>13s} {'of minima':>9s} "
          f"{'+us/call':>8s} {'/replay':>7s} {'replay/bare':>11s} {'faults':>6s}")
    for row in results:
        q = row["ratio_quartiles"]
        print(f"{row['name']:44s} {row['model_calls']:5d} {row['ms_per_model_call']:7.3f} "
              f"{row['ratio']:6.3f} {q[0]:6.3f}-{q[1]:6.3f} {row['ratio_of_minima']:9.3f} "
              f"{row['overhead_us_per_call']:8.1f} {row['ratio_to_replay']:7.3f} {row['replay_over_bare']:11.3f} "
              f"{row['page_faults_per_run']:6.0f}")

    results_dir = Path(__file__).resolve().parent / "results"
    default_name = "overhead" + ("" if heap_kept else "_glibc_trim") + ("" if flushed else "_subnormals_kept")
    out = Path(args.out) if args.out else results_dir / f"{default_name}.json"
    meta = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "threads": torch.get_num_threads(),
            "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
            "model": f"MLP {DIM}+{TIME_FEATURES} time features -> {HIDDEN} -> {HIDDEN} -> {DIM}, SiLU, float32, "
                     "torch.no_grad",
            "bare_loop": "for c in cs: out = model(x, c); x fixed, the (batch,) time tensors cs made before timing",
            "ratio": "median over rounds of (time of the loop / time of the bare loop with the same number of model "
                     "calls, timed in the same round); ratio_of_medians and ratio_of_minima over the same runs",
            "replay": "for x, c in calls: out = model(x, c), over the inputs the loop gave the model in an untimed "
                      "recording run; ratio_to_replay is the median of (loop time / replay time) over the same "
                      "rounds, replay_over_bare the model's cost on those inputs over its cost on the fixed x",
            "page_faults": "median minor page faults (getrusage ru_minflt) per timed run",
            "allocator": "heap kept (glibc mallopt: no trimming)" if heap_kept else "default",
            "subnormals": "flushed to zero (torch.set_flush_denormal)" if flushed else "kept (IEEE)",
            "ms_per_bare_model_call": per_call,
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         **{d: peers.version(d) for d in ("sdediff", "k-diffusion", "diffusers", "torchdiffeq")}}}
    timing.write_results(out, meta, results)


if __name__ == "__main__":
    main()
