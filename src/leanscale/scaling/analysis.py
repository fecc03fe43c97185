"""Fit all three Chinchilla approaches to one set of runs and write the results: what
``leanscale fit`` and the tour's scaling chapter call."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.io import atomic_write_bytes, atomic_write_json
from leanscale.core.validation import Interval, check_param
from leanscale.scaling.envelope import EnvelopeFit, fit_envelope
from leanscale.scaling.isoflop import IsoFLOPFit, fit_isoflop, group_budgets
from leanscale.scaling.laws import (
    BootstrapResult,
    ParametricScalingLaw,
    ScalingWarning,
    fit_parametric,
)
from leanscale.scaling.runs import Curves, Runs

__all__ = ["REFERENCE_EXPONENTS", "ScalingAnalysis", "analyze_runs"]

# Published exponent a of N_opt ~ C^a, for comparison.
REFERENCE_EXPONENTS = {
    "Chinchilla Approach 1": 0.50,  # Hoffmann et al. 2022, table 2
    "Chinchilla Approach 2": 0.49,
    "Chinchilla Approach 3": 0.46,
    "Epoch 2024 refit of Approach 3": 0.51,  # Besiroglu et al. 2024: beta/(alpha+beta) = 0.3658/0.7136
    "Kaplan et al. 2020": 0.73,  # arXiv 2001.08361, N_opt ~ C^0.73
}


@dataclass
class ScalingAnalysis:
    runs: Runs
    law: ParametricScalingLaw
    bootstrap: BootstrapResult | None
    isoflop: IsoFLOPFit | None
    envelope: EnvelopeFit | None
    budget_flops: float  # budget at which N_opt and tokens per parameter are reported
    notes: list[str] = field(default_factory=list)
    # Why a result may not be trusted (unidentifiable law, negative exponent, a point estimate
    # outside its own interval, extrapolation): printed by `leanscale fit`, in fit.json and --json.
    warnings: list[str] = field(default_factory=list)

    def exponent_rows(self) -> list[dict]:
        """a (N_opt ~ C^a) and b (D_opt ~ C^b) of each approach with intervals."""
        rows = []
        a, b = self.law.exponents_
        ia = self.bootstrap.interval("a") if self.bootstrap else (math.nan, math.nan)
        ib = self.bootstrap.interval("b") if self.bootstrap else (math.nan, math.nan)
        rows.append({"approach": "3: parametric L(N,D)", "a": a, "a_low": ia[0], "a_high": ia[1],
                     "b": b, "b_low": ib[0], "b_high": ib[1]})
        for name, fit in (("2: IsoFLOP profiles", self.isoflop), ("1: envelope of curves", self.envelope)):
            if fit is None:
                continue
            ia = fit.intervals.get("a", (math.nan, math.nan))
            ib = fit.intervals.get("b", (math.nan, math.nan))
            rows.append({"approach": name, "a": fit.a, "a_low": ia[0], "a_high": ia[1],
                         "b": fit.b, "b_low": ib[0], "b_high": ib[1]})
        return rows

    def parameter_rows(self) -> list[dict]:
        if self.bootstrap is None:
            return [{"parameter": k, "estimate": v} for k, v in
                    zip(("E", "A", "B", "alpha", "beta"),
                        (self.law.E_, self.law.A_, self.law.B_, self.law.alpha_, self.law.beta_))]
        return self.bootstrap.summary()

    @property
    def has_frontier(self) -> bool:
        return self.law.alpha_ > 0 and self.law.beta_ > 0

    def optimum_rows(self) -> list[dict]:
        if not self.has_frontier:
            return []
        c = self.budget_flops
        n, d = self.law.compute_optimal(c)
        row = {"flops": c, "n_opt": n, "d_opt": d, "tokens_per_param": d / n}
        if self.bootstrap is not None:
            ci = self.bootstrap.compute_optimal_interval(c)
            row.update(n_opt_low=ci["n_params"][0], n_opt_high=ci["n_params"][1],
                       d_opt_low=ci["n_tokens"][0], d_opt_high=ci["n_tokens"][1])
        return [row]

    def to_dict(self) -> dict:
        out = {
            "law": self.law.to_dict(),
            "parameters": self.parameter_rows(),
            "exponents": self.exponent_rows(),
            "optimum": self.optimum_rows(),
            "reference_exponents_a": REFERENCE_EXPONENTS,
            "n_runs": int(self.runs.n_params.size),
            "notes": self.notes,
            "warnings": self.warnings,
        }
        if self.isoflop is not None:
            out["isoflop"] = {"budgets": self.isoflop.budgets, "n_opt": self.isoflop.n_opt,
                              "d_opt": self.isoflop.d_opt, "loss_opt": self.isoflop.loss_opt,
                              "vertex_inside_sampled_range": self.isoflop.interior,
                              "skipped": self.isoflop.skipped}
        return out

    def write(self, out_dir: str | Path, figures: bool = True) -> dict[str, Path]:
        """Write fit.json, law.json (usable by `leanscale plan --law`) and the figures."""
        out = Path(out_dir)
        paths = {"fit": atomic_write_json(out / "fit.json", self.to_dict()),
                 "law": self.law.save(out / "law.json")}
        if figures:
            from leanscale.report.figures import figure_to_png_bytes
            from leanscale.scaling.figures import contour_figure, isoflop_figure

            r = self.runs
            if self.isoflop is not None:
                fig = isoflop_figure(self.isoflop, r.n_params, r.loss, self._budgets())
                paths["isoflop"] = atomic_write_bytes(out / "isoflop.png", figure_to_png_bytes(fig))
            if not self.has_frontier:
                return paths
            fig = contour_figure(self.law, (r.flops.min() / 3, r.flops.max() * 10),
                                 (r.n_params.min() / 3, r.n_params.max() * 3), r.n_params, r.flops)
            paths["contours"] = atomic_write_bytes(out / "contours.png", figure_to_png_bytes(fig))
        return paths

    def _budgets(self) -> np.ndarray:
        return self.runs.budget_flops if self.runs.budget_flops is not None else group_budgets(self.runs.flops)


def analyze_runs(
    runs: Runs,
    curves: Curves | None = None,
    *,
    n_resamples: int = 4000,
    seed: int = 0,
    method: str = "fast",
    budget_flops: float | None = None,
    progress_bar: bool = False,
) -> ScalingAnalysis:
    """Approach 3 with bootstrap intervals; Approach 2 when the runs form IsoFLOP profiles;
    Approach 1 when training curves are given. Approaches 1-2 that cannot be fitted are noted.

    What makes a result untrustworthy is collected in ``warnings`` (not raised as Python warnings):
    an unidentifiable law (N and D collinear), a non-positive exponent, a point estimate outside its
    bootstrap interval, refits that did not converge, a budget far outside the runs.

    ``progress_bar``: show a progress bar of the fits (Approach 3, its bootstrap, Approaches 2
    and 1; rank 0 only).
    """
    check_param("n_resamples", n_resamples, [Interval(int, 0, None)], owner="analyze_runs")
    if n_resamples:
        check_param("n_resamples", n_resamples, [Interval(int, 10, None)], owner="analyze_runs")
    if budget_flops is not None:
        check_param("budget_flops", budget_flops, [Interval("real", 0, math.inf, closed="neither")],
                    owner="analyze_runs")
    if not np.all(np.isfinite(runs.flops)):
        raise InvalidParameterError(
            "The runs' FLOPs (6 N D) must be finite. Got an overflow: n_params and n_tokens are too large "
            "to be real runs.")
    check_param("progress_bar", progress_bar, [bool], owner="analyze_runs")
    from leanscale.core.distributed import rank_and_world
    from leanscale.core.progress import progress

    bar = progress(total=4, desc="fit", unit="fit", disable=None if progress_bar and rank_and_world()[0] == 0 else True)
    try:
        return _analyze(runs, curves, n_resamples, seed, method, budget_flops, bar)
    finally:
        bar.close()


def _analyze(runs, curves, n_resamples, seed, method, budget_flops, bar) -> ScalingAnalysis:
    bar.set_postfix(now="Approach 3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScalingWarning)  # collected into `warnings` below
        law = fit_parametric(runs.n_params, runs.n_tokens, runs.loss, method=method)
        bar.set_postfix(now=f"bootstrap x{n_resamples}")
        bar.update(1)
        boot = law.bootstrap(n_resamples, seed=seed) if n_resamples else None
    bar.set_postfix(now="Approach 2")
    bar.update(1)
    c = float(budget_flops) if budget_flops is not None else float(runs.flops.max())
    found = list(law.warnings_)
    if boot is not None:
        found += boot.check(c)
    lo, hi = float(runs.flops.min()), float(runs.flops.max())
    if c > 10 * hi or c < lo / 10:
        factor = c / hi if c > hi else lo / c
        found.append(f"The budget {c:.3g} FLOPs is {factor:.3g}x {'beyond' if c > hi else 'below'} the runs "
                     f"({lo:.3g}-{hi:.3g} FLOPs): N_opt and D_opt there are extrapolated.")
    notes = []
    iso = env = None
    iso_budgets = runs.budget_flops if runs.budget_flops is not None else group_budgets(runs.flops)
    try:
        iso = fit_isoflop(runs.n_params, runs.n_tokens, runs.loss, flops=runs.flops,
                          budget_flops=runs.budget_flops, n_resamples=min(n_resamples, 2000), seed=seed)
        sizes = [np.unique(runs.n_params[np.isclose(iso_budgets, c, rtol=1e-6)]).size for c in iso.budgets]
        if min(sizes) < 5:
            notes.append(f"Approach 2 has budgets with only {min(sizes)} model sizes: resampling so few runs "
                         "cannot show the parabola's uncertainty, so its interval understates it. Use >= 5 sizes.")
        if iso.interior is not None and not iso.interior.all():
            outside = iso.budgets[~iso.interior]
            notes.append("IsoFLOP minimum outside the sampled sizes (extrapolated) for budgets "
                         + ", ".join(f"{c:.3g}" for c in outside))
    except InvalidParameterError as exc:
        notes.append(f"Approach 2 not fitted: {exc}")
    bar.set_postfix(now="Approach 1")
    bar.update(1)
    if curves is not None:
        try:
            env = fit_envelope(curves.run_id, curves.n_params, curves.n_tokens, curves.loss,
                               n_resamples=min(n_resamples, 1000), seed=seed)
        except InvalidParameterError as exc:
            notes.append(f"Approach 1 not fitted: {exc}")
    bar.update(1)
    if boot is not None and 0 < 1 - boot.valid_fraction <= (1 - boot.level) / 2:  # more: a warning
        notes.append(f"{100 * (1 - boot.valid_fraction):.1f}% of bootstrap refits had alpha or beta <= 0 (no "
                     "frontier); they count at their limits (N_opt 0 or infinity) in the intervals of a, b, "
                     "N_opt and D_opt: the law is weakly determined by these runs.")
    return ScalingAnalysis(runs=runs, law=law, bootstrap=boot, isoflop=iso, envelope=env,
                           budget_flops=c, notes=notes, warnings=list(dict.fromkeys(found)))
