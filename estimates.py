"""The evaluation table's estimates: `ROWS` maps a name to a `RowKind` (docs/extending.md)."""
import dataclasses
import functools
from typing import Callable, Optional

import torch as t

import estimators as est
import ode
import utils
from vb import variational_bound


@dataclasses.dataclass(frozen=True)
class RowKind:
    """One kind of estimate, built or derived from another row (fields: docs/extending.md)."""
    meaning: object
    unit: str = "nats"
    grid: bool = False
    when: Callable = lambda plan: True
    cost: Callable = lambda plan: 0
    build: Optional[Callable] = None
    derive: Optional[tuple] = None


def _dequantized(dequantize, plan, x, index, score):
    if not dequantize:
        return score(x)
    nll, info = score(utils.dequantize(x, plan.grid.delta, plan.seed, index))
    return utils.discrete_limit_nats(nll, plan.grid.delta, plan.d), info


def _points(plan, entry, kind="continuous", roundings=("none",), dequantize=False):
    """The continuous (of x, or x dequantized) or discrete bound over the row's points."""
    denoiser = plan.denoiser(kind, entry, roundings)
    proposal = plan.proposal(kind, entry, roundings)
    estimate = est.nll_points if kind == "continuous" else functools.partial(
        est.nll_discrete_points, grid=plan.grid)

    def fn(x, index, y):
        nll, stderr = _dequantized(dequantize, plan, x, index, lambda v: estimate(
            denoiser, entry.reference, proposal, v, npoints=plan.npoints, seed=plan.seed,
            index=index))
        return dict(values=nll, stderr=stderr)
    return fn, proposal


def _variational_bound(plan, entry):
    schedule = entry.schedule if entry.schedule is not None else utils.logsnr_schedule(
        *entry.proposal.range)
    denoiser = plan.denoiser("discrete", entry)

    def fn(x, index, y):
        nll, stderr = variational_bound(denoiser, x, plan.grid, schedule, plan.vb_steps,
                                        seed=plan.seed, index=index)
        return dict(values=nll, stderr=stderr)
    return fn, tuple(utils.schedule_logsnr(schedule)[[-1, 0]].tolist())


def _ode(dequantize, plan, entry):
    denoiser = plan.denoiser("continuous", entry)

    def fn(x, index, y):
        nll, info = _dequantized(dequantize, plan, x, index, lambda v: ode.nll_ode(
            denoiser, entry.reference, entry.proposal.range, v, seed=plan.seed, index=index,
            **plan.ode))
        return dict(values=nll, stderr=t.zeros_like(nll), cost=info["nfe"])
    return fn, entry.proposal.range


def _given(plan, entry):
    if entry.label_prior is None:  # not a model of p(x | y)
        return None
    proposal, labels = plan.proposal("continuous", entry), t.arange(-1, plan.num_classes)

    def fn(x, index, y):
        terms = est.label_terms(entry.denoiser, entry.reference, proposal, x,
                                labels.to(x.device), plan.npoints, seed=plan.seed, index=index)
        stats = est.label_statistics(terms, entry.label_prior, y)
        values, stderr = stats["given"]
        return dict(values=values, stderr=stderr, stats=stats)
    return fn, proposal


def _label_row(meaning, statistic, unit="nats, not per dimension"):
    return RowKind(meaning + LABEL_PASS, unit,
                   derive=("conditional", lambda output, plan: output["stats"][statistic]))


def _ode_row(what, dequantize):
    def meaning(plan):
        o = plan.ode
        trace = "exact" if o["trace"] == "exact" else f"Hutchinson's, {o['probes']} probe(s)"
        return (f"{what}: -log of the probability-flow ODE's density (the denoiser over "
                "logsnr_range, the Gaussian's exact one beyond; not the density the IT rows "
                f"bound), adaptive Dormand-Prince at rtol {o['rtol']:g}, atol {o['atol']:g}, "
                f"divergence {trace}; evaluations: function evaluations with their divergence")
    return RowKind(meaning, grid=dequantize, build=functools.partial(_ode, dequantize),
                   when=lambda plan: plan.ode is not None, cost=lambda plan: ODE_EVALUATIONS)


_UPPER = "upper bound on E[-log P(x)]: "
LABEL_PASS = ("; one pass over no label and every label on the same points serves the label rows "
              "(their evaluations: that pass's)")
ROWS = {  # the table's estimates, in the order of its columns
    "continuous": RowKind(
        "estimate of E[-log p(x)] of the data as they are: an upper bound in expectation for the "
        "hybrid denoiser (the model over logsnr_range, the Gaussian's optimal predictor "
        "outside); for grid data it depends on the range's top",
        cost=lambda plan: plan.npoints, build=_points),
    "discrete limit": RowKind(
        "continuous - d log(delta): a change of units, not a bound", grid=True,
        derive=("continuous", lambda output, plan: (utils.discrete_limit_nats(
            output["values"], plan.grid.delta, plan.d), output["stderr"]))),
    "dequantized": RowKind(
        _UPPER + "the continuous estimate of x + delta (U - 1/2), - d log(delta)", grid=True,
        cost=lambda plan: plan.npoints, build=functools.partial(_points, dequantize=True)),
    "variational bound": RowKind(
        _UPPER + "the -ELBO of the T-step schedule over logsnr_range as DDPM reported it (x_hat "
        "clipped to the data's range in every term, fixed_small variances, discretised Gaussian "
        "decoder; timesteps subsampled, unbiased)",
        grid=True, cost=lambda plan: (plan.vb_steps or 1000) + 2, build=_variational_bound),
    **{name: RowKind(
        _UPPER + "1/2 Int E||eps - eps_hat||^2 da over logsnr_range, the tails in closed form",
        grid=True, cost=lambda plan: plan.npoints, build=functools.partial(
            _points, kind="discrete", roundings=roundings))
       for name, roundings in (("discrete, no rounding", ("none",)),
                               ("discrete, hard rounding", ("none", "hard")),
                               ("discrete, soft rounding", ("none", "soft")))},
    "conditional": RowKind(
        "estimate of E[-log p(x | y)] given each sample's label: continuous's bound with the "
        "label's data-matched Gaussian as the reference" + LABEL_PASS,
        when=lambda plan: plan.labels is not None, build=_given,
        cost=lambda plan: plan.npoints * (plan.num_classes + 1)),
    "mutual information": _label_row(
        "estimate of E[i(x; y)] = E[log p(x | y) - log p(x)] as the difference of the two bounds "
        "on the same noise (it inherits the unconditional bound's gap)", "information"),
    "accuracy": _label_row(
        "the fraction of samples whose label is argmax_y p(y | x): Bayes' rule over p(x | y) of "
        "every label, p(y) the training labels' frequencies, jackknifed over the replicates",
        "correct", unit="fraction"),
    "information, Bayes' rule": _label_row(
        "estimate of E[i(x; y)] as E[log p(y | x) - log p(y)] from the conditional densities "
        "alone, jackknifed over the replicates (docs/conditional.md)", "bayes"),
    "ode": _ode_row("estimate of E[-log p(x)] of the data as they are", False),
    "ode, dequantized": _ode_row(
        "upper bound on E[-log P(x)] (score_sde's dequantized bits/dim): the ODE estimate of x + "
        "delta (U - 1/2), - d log(delta)", True),
}
ODE_EVALUATIONS = 200  # function evaluations per sample the up-front estimate assumes for an ODE
EXACT = "the exact value on the same points"  # the meaning of the `exact` rows (known densities)
