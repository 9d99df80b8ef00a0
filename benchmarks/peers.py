"""Optional peer libraries for the benchmarks, and small adapters that feed them an sdediff score.

Peers (``pip install -e ".[bench]"`` plus k-diffusion without its dependencies, see
``benchmarks/README.md``):

* **k-diffusion** (``k_diffusion/sampling.py`` only). Its package ``__init__`` imports modules with
  heavy optional dependencies (torchvision, clip, ...), so the package is never imported. Only
  ``sampling.py`` is loaded, by file path, as a submodule of a private package whose ``utils``
  submodule is a stub written here. ``sampling.py``'s own imports are torch, scipy, torchdiffeq,
  torchsde and tqdm, plus ``from . import utils``. Of ``utils`` it uses ``append_dims`` (checked
  below by scanning the source for ``utils.<name>``).
* **diffusers**: imported normally. Its schedulers keep their tables in float32, and some cast
  the state to float32 inside ``step``. :func:`float64_scheduler` and :class:`KeepFloat64` give
  a float64 run of the scheduler's own arithmetic (see there).

Each loader returns ``None`` (and ``why_missing`` says why) when the peer is not installed; the
benchmarks then skip that peer with a printed note.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
import types
from pathlib import Path

import torch

_KD_PACKAGE = "_sdediff_bench_kdiffusion"  # private name: never clashes with a real ``k_diffusion``
_missing: dict[str, str] = {}


def why_missing(name: str) -> str:
    return _missing.get(name, "")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# k-diffusion: sampling.py alone
# --------------------------------------------------------------------------------------------

def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """``x`` with trailing singleton dimensions up to ``target_dims`` dimensions."""
    extra = target_dims - x.dim()
    if extra < 0:
        raise ValueError(f"x has {x.dim()} dimensions, more than target_dims = {target_dims}")
    return x.reshape(tuple(x.shape) + (1,) * extra)


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` (1-D) with a 0 appended."""
    return torch.cat([x, x.new_zeros(1)])


_STUB_HELPERS = {"append_dims": _append_dims, "append_zero": _append_zero}


def _find_kdiffusion_sampling() -> Path | None:
    """The installed ``k_diffusion/sampling.py``, found without importing the package."""
    try:
        dist = importlib.metadata.distribution("k-diffusion")
        path = Path(dist.locate_file("k_diffusion/sampling.py"))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    for entry in sys.path:  # e.g. a source checkout on PYTHONPATH
        path = Path(entry or ".") / "k_diffusion" / "sampling.py"
        if path.is_file():
            return path
    return None


_kd_cache: list = []


def load_k_diffusion():
    """k-diffusion's ``sampling`` module (loaded once), or ``None`` if k-diffusion is not installed."""
    if _kd_cache:
        return _kd_cache[0]
    module = None
    path = _find_kdiffusion_sampling()
    if path is None:
        _missing["k-diffusion"] = ("k-diffusion is not installed "
                                   "(pip install --no-deps k-diffusion==0.1.1.post1; see benchmarks/README.md)")
    else:
        used = set(re.findall(r"\butils\.(\w+)", path.read_text()))
        unknown = used - set(_STUB_HELPERS)
        if unknown:
            _missing["k-diffusion"] = f"{path} uses k_diffusion.utils helpers the stub lacks: {sorted(unknown)}"
        else:
            package = types.ModuleType(_KD_PACKAGE)
            package.__path__ = []  # a package with no search path: nothing else of k_diffusion is found
            utils = types.ModuleType(f"{_KD_PACKAGE}.utils", "Stub of k_diffusion.utils (sdediff benchmarks).")
            for name in used:
                setattr(utils, name, _STUB_HELPERS[name])
            package.utils = utils
            sys.modules[_KD_PACKAGE] = package
            sys.modules[utils.__name__] = utils
            spec = importlib.util.spec_from_file_location(f"{_KD_PACKAGE}.sampling", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            try:
                spec.loader.exec_module(module)
            except ImportError as err:  # one of sampling.py's own dependencies is missing
                del sys.modules[spec.name]
                _missing["k-diffusion"] = f"loading {path} failed: {err}"
                module = None
            else:
                package.sampling = module
                module.__version__ = version("k-diffusion")
    _kd_cache.append(module)
    return module


def ve_denoiser(score_fn, sde):
    """k-diffusion's ``model(x, sigma)`` (a denoiser in VE variables) from an sdediff score on a VP ``sde``.

    With ``x = alpha x_ve`` and ``sigma_ve = sigma / alpha`` (so ``alpha = (1 + sigma_ve^2)^-1/2``),
    the denoiser is the posterior mean ``D = E[x_0 | x] = (x + sigma^2 score(x, t)) / alpha`` at the
    time ``t`` with ``log-SNR = -2 log sigma_ve``.
    """

    def model(x_ve, sigma_ve):
        sigma_ve = sigma_ve.to(x_ve.dtype)
        t = sde.t_from_log_snr(-2.0 * torch.log(sigma_ve))
        alpha = torch.rsqrt(1.0 + sigma_ve**2)
        alpha, sigma = _bcast(alpha, x_ve), _bcast(sigma_ve * alpha, x_ve)
        x = alpha * x_ve
        return (x + sigma**2 * score_fn(x, t)) / alpha

    return model


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


# --------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------

_diffusers_cache: list = []


def load_diffusers():
    """The ``diffusers`` module, or ``None`` if it is not installed."""
    if not _diffusers_cache:
        try:
            import diffusers
        except ImportError as err:
            _missing["diffusers"] = f"diffusers is not importable ({err}); pip install 'diffusers>=0.30'"
            diffusers = None
        _diffusers_cache.append(diffusers)
    return _diffusers_cache[0]


def float64_scheduler(scheduler, betas: torch.Tensor):
    """Replace a diffusers scheduler's float32 tables by float64 ones from ``betas`` (the same numbers).

    diffusers builds ``betas`` (and from them ``alphas_cumprod``, ...) in float32. Here every
    table the constructor made is rebuilt in float64 from the float64 ``betas`` that sdediff's
    ``VPSDE.from_betas`` uses, so both sides share one discretization. Call it before
    ``set_timesteps``, then :func:`float64_sigmas` after (``set_timesteps`` casts ``sigmas``
    to float32 again).
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    scheduler.betas, scheduler.alphas, scheduler.alphas_cumprod = betas, 1.0 - betas, abar
    if hasattr(scheduler, "alpha_t"):  # the multistep solvers keep alpha, sigma, log-SNR / 2 per timestep
        scheduler.alpha_t, scheduler.sigma_t = abar.sqrt(), (1.0 - abar).sqrt()
        scheduler.lambda_t = torch.log(scheduler.alpha_t) - torch.log(scheduler.sigma_t)
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM
        scheduler.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if scheduler.config.set_alpha_to_one
                                         else abar[0].clone())
    if isinstance(getattr(scheduler, "sigmas", None), torch.Tensor):
        scheduler.sigmas = ((1.0 - abar) / abar).sqrt()
    return scheduler


def ve_sigma(abar: torch.Tensor) -> torch.Tensor:
    """diffusers' ``sigmas``: the VE noise level ``sqrt((1 - abar) / abar)``."""
    return ((1.0 - abar) / abar).sqrt()


def float64_sigmas(scheduler, final_sigma=None, *, at_timesteps: bool = True):
    """After ``set_timesteps``: ``scheduler.sigmas`` in float64 (``set_timesteps`` casts them to float32).

    With ``at_timesteps`` (schedules on integer timesteps), each sigma is recomputed exactly as
    ``sqrt((1 - abar_n) / abar_n)`` at the scheduler's timestep ``n`` (what ``set_timesteps``
    interpolates to, in float32), followed by ``final_sigma`` (default: the scheduler's last
    entry, upcast; for ``final_sigmas_type="sigma_min"`` pass timestep 0's sigma). Otherwise
    (Karras, Lu or exponential sigmas, which fall between timesteps) the sigmas are upcast as they
    are: their float32 rounding moves the grid points by a relative 6e-8, and the model is then
    evaluated at those same sigmas (:func:`continuous_eps_model`).
    """
    abar = scheduler.alphas_cumprod.to(torch.float64)
    old = scheduler.sigmas.to(torch.float64)
    last = old[-1:] if final_sigma is None else torch.as_tensor(final_sigma, dtype=torch.float64).reshape(1)
    if at_timesteps:
        ts = scheduler.timesteps
        if len(ts) != len(old) - 1 or not bool((ts == ts.round()).all()):
            raise ValueError("the scheduler's timesteps are not one integer per sigma")
        scheduler.sigmas = torch.cat([ve_sigma(abar[ts.round().long().cpu()]), last])
    else:
        scheduler.sigmas = torch.cat([old[:-1], last])
    return scheduler


class KeepFloat64(torch.Tensor):
    """A float64 tensor that ignores requests to cast it to float32.

    ``DPMSolverMultistepScheduler.step`` (and ``EulerDiscreteScheduler.step``) cast the state with
    ``sample.to(torch.float32)`` ("upcast to avoid precision issues", written for float16
    states), which for a float64 state is a downcast that caps the accuracy at float32
    round-off. Wrapping the state in this subclass keeps that cast from happening; every other
    operation is unchanged. Unwrap results with ``.as_subclass(torch.Tensor)``.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) \
                and args[0].dtype == torch.float64:
            wanted = kwargs.get("dtype")
            wanted = next((a for a in args[1:] if isinstance(a, torch.dtype)), wanted)
            if wanted in (torch.float32, torch.float16, torch.bfloat16):
                return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def discrete_eps_model(score_fn, sde, num_train_timesteps: int):
    """``model(x, n)``: the exact eps of ``score_fn`` at integer timestep ``n`` (sdediff's ``t = (n + 1) / N``).

    This is the model that ``sdediff.discrete_score_fn`` wraps: timestep ``n`` of a model trained
    on ``N`` steps sits at ``t = (n + 1) / N`` of ``VPSDE.from_betas(betas)``, where ``alpha(t)^2``
    is ``alphas_cumprod[n]`` exactly. ``n`` (0-d or ``(batch,)``, int or integer-valued float) is
    rounded; the input may be a :class:`KeepFloat64`.
    """
    N = int(num_train_timesteps)

    def model(x, n):
        x = x.as_subclass(torch.Tensor)
        n = torch.as_tensor(n).to(device=x.device).round().clamp(0, N - 1)
        t = ((n.to(torch.float64) + 1.0) / N).to(x.dtype).reshape(-1).expand(x.shape[0])
        sigma = _bcast(sde.marginal(t)[1], x)
        return -sigma * score_fn(x, t)

    return model


def continuous_eps_model(score_fn, sde, scheduler):
    """``model(x, n)`` for schedules whose sigmas fall between timesteps (Karras, Lu, exponential).

    diffusers rounds those sigmas to integer timesteps before calling the model, so a model
    conditioned on ``n`` sees a slightly different noise level than the solver assumes. Here the
    exact eps is evaluated at the sigma the scheduler uses at its current step (read from
    ``scheduler.sigmas[scheduler.step_index]``), as a continuous-time model would be: the
    solver is then measured alone, as sdediff's and k-diffusion's are.
    """

    def model(x, n):
        x = x.as_subclass(torch.Tensor)
        i = scheduler.step_index if scheduler.step_index is not None else 0
        s = scheduler.sigmas[i].to(device=x.device, dtype=x.dtype)
        t = sde.t_from_log_snr(-2.0 * torch.log(s)).reshape(1).expand(x.shape[0])
        sigma = _bcast(s * torch.rsqrt(1.0 + s**2), x)
        return -sigma * score_fn(x, t)

    return model


def run_continuous(sched, counter, score_fn, sde, x_T, steps: int) -> torch.Tensor:
    """``steps`` steps of a diffusers multistep scheduler whose float64 ``sigmas`` are set, from ``x_T``.

    ``counter`` (a :class:`CallCounter`) gets the exact eps at the scheduler's sigma
    (:func:`continuous_eps_model`). The loop stops at ``sigmas[steps]``: the scheduler's own last
    step would go from sigma_min to sigma_min, a zero-length step that costs one more evaluation.
    """
    counter.fn = continuous_eps_model(score_fn, sde, sched)
    x = x_T.clone().as_subclass(KeepFloat64)
    for t in sched.timesteps[:steps]:
        x = sched.step(counter(x, t), t, x, return_dict=False)[0]
    return x.as_subclass(torch.Tensor)


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------

class CallCounter:
    """Wraps a function and counts its calls (``.calls``); ``reset()`` sets the count to 0."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)

    def reset(self):
        self.calls = 0
        return self
