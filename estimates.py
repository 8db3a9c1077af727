"""The estimates of the evaluation table as data: `ROWS` maps each estimate's name to a `RowKind`
(what the number means, its unit, what data it needs, what it costs, how it is computed for one
model). Adding a row is one entry here, from inside or outside the project
(estimates.ROWS["name"] = estimates.RowKind(...)); evaluation.py runs them (docs/evaluation.md).
"""
import dataclasses
from typing import Callable, Optional

import torch as t

import estimators as est
import ode
import utils
from vb import variational_bound


@dataclasses.dataclass(frozen=True)
class RowKind:
    """One kind of estimate in the table.

    meaning: what the number is (a bound, an estimate, a change of units), a str or
        meaning(plan) -> str; printed under the table and stored with every row.
    unit: "nats" (per sample, also in bits/dim), "nats, not per dimension" or "fraction".
    grid: True for data on a grid only. when(plan): whether the evaluation computes the row.
    cost(plan): denoiser evaluations per scored sample for one model (the up-front estimate).
    build(plan, entry) -> (fn, span), or None where the entry has no such row: fn(x, index, y)
        -> per-sample values, or a dict {"values", "stderr" (each sample's own integration
        error), "cost" (evaluations it took), and anything derived rows read}; span: the row's
        proposal (its range and kind are reported), a (lo, hi) range, or None. `plan` is the
        evaluation's evaluation.Plan, `entry` the model's evaluation.Entry.
    derive: (row, fn(output, plan) -> (values, stderr)) instead of build: from another row's
        output on the same batch, at no cost.
    """
    meaning: object
    unit: str = "nats"
    grid: Optional[bool] = None
    when: Callable = lambda plan: True
    cost: Callable = lambda plan: 0
    build: Optional[Callable] = None
    derive: Optional[tuple] = None


def _continuous(dequantize):
    """-log p(x) of the data as they are (dequantize: of x + delta (U - 1/2), - d log delta)."""
    def build(plan, entry):
        proposal = plan.proposal("continuous", entry)
        denoiser = plan.denoiser("continuous", entry)

        def fn(x, index, y):
            if dequantize:
                x = utils.dequantize(x, plan.grid.delta, plan.seed, index)
            nll, stderr = est.nll_points(denoiser, entry.reference, proposal, x, plan.npoints,
                                         seed=plan.seed, index=index)
            if dequantize:
                nll = utils.discrete_limit_nats(nll, plan.grid.delta, plan.d)
            return dict(values=nll, stderr=stderr)
        return fn, proposal
    return build


def _variational_bound(plan, entry):
    """DDPM's -ELBO over the denoiser's own schedule, else 1000 steps linear in log SNR over the
    model's range."""
    schedule = entry.schedule if entry.schedule is not None else utils.logsnr_schedule(
        *entry.proposal.range)
    denoiser = plan.denoiser("discrete", entry)

    def fn(x, index, y):
        nll, stderr = variational_bound(denoiser, x, plan.grid, schedule, plan.vb_steps,
                                        seed=plan.seed, index=index)
        return dict(values=nll, stderr=stderr)
    return fn, tuple(utils.schedule_logsnr(schedule)[[-1, 0]].tolist())


def _discrete(rounding):
    """-log P(x) directly, over a range that resolves the grid; with rounding, x_hat is the
    Gaussian's, the entry's own, or the entry's rounded one, chosen per log SNR on held-out data."""
    def build(plan, entry):
        roundings = ("none",) if rounding == "none" else ("none", rounding)
        denoiser = plan.denoiser("discrete", entry, roundings)
        proposal = plan.proposal("discrete", entry, roundings)

        def fn(x, index, y):
            nll, stderr = est.nll_discrete_points(denoiser, entry.reference, proposal, x,
                                                  plan.grid, plan.npoints, seed=plan.seed,
                                                  index=index)
            return dict(values=nll, stderr=stderr)
        return fn, proposal
    return build


def _ode(dequantize):
    """-log p(x) of the density the probability-flow ODE of the entry's denoiser defines
    (dequantize: of x + delta (U - 1/2), - d log delta)."""
    def build(plan, entry):
        denoiser = plan.denoiser("continuous", entry)

        def fn(x, index, y):
            if dequantize:
                x = utils.dequantize(x, plan.grid.delta, plan.seed, index)
            nll, info = ode.nll_ode(denoiser, entry.reference, entry.proposal.range, x,
                                    seed=plan.seed, index=index, **plan.ode)
            if dequantize:
                nll = utils.discrete_limit_nats(nll, plan.grid.delta, plan.d)
            return dict(values=nll, stderr=t.zeros_like(nll), cost=info["nfe"])
        return fn, entry.proposal.range
    return build


def _ode_meaning(what):
    def meaning(plan):
        o = plan.ode
        trace = "exact" if o["trace"] == "exact" else f"Hutchinson's, {o['probes']} probe(s)"
        return (f"{what}: -log of the density the probability-flow ODE defines (the denoiser over "
                "logsnr_range, the Gaussian's exact one beyond; a different density from the one "
                "the IT rows bound), by an adaptive Dormand-Prince solve at rtol "
                f"{o['rtol']:g}, atol {o['atol']:g}, divergence {trace}; evaluations: function "
                "evaluations per sample, each with its divergence")
    return meaning


def _given(plan, entry):
    """-log p(x | y), from one pass over no label and every label on the same points; the other
    label rows derive from its statistics (estimators.label_statistics)."""
    if not entry.conditional:
        return None
    proposal = plan.proposal("continuous", entry)
    labels = t.arange(-1, plan.num_classes)

    def fn(x, index, y):
        terms = est.label_terms(entry.denoiser, entry.reference, proposal, x,
                                labels.to(x.device), plan.npoints, seed=plan.seed, index=index)
        stats = est.label_statistics(terms, entry.label_prior, y)
        values, stderr = stats["given"]
        return dict(values=values, stderr=stderr, stats=stats,
                    cost=t.full_like(values, _label_cost(plan)))
    return fn, proposal


def _label_cost(plan):
    return plan.npoints * (plan.num_classes + 1)


def _statistic(name):
    return "conditional", lambda output, plan: output["stats"][name]


def _labelled(plan):
    return plan.labels is not None


LABEL_PASS = ("; from one pass over no label and every label on the same points, shared by the "
              "label rows (their evaluations: that pass's)")
ROWS = {  # the table's estimates, in the order of its columns
    "continuous": RowKind(
        "estimate of E[-log p(x)] of the data as they are: an upper bound in expectation for the "
        "hybrid denoiser (the model over logsnr_range, the Gaussian's optimal predictor outside); "
        "for grid data it depends on the range's top",
        cost=lambda plan: plan.npoints, build=_continuous(False)),
    "discrete limit": RowKind(
        "continuous - d log(delta): a change of units, not a bound", grid=True,
        derive=("continuous", lambda output, plan: (utils.discrete_limit_nats(
            output["values"], plan.grid.delta, plan.d), output["stderr"]))),
    "dequantized": RowKind(
        "upper bound on E[-log P(x)]: the continuous estimate of x + delta (U - 1/2), "
        "- d log(delta)", grid=True, cost=lambda plan: plan.npoints, build=_continuous(True)),
    "variational bound": RowKind(
        "upper bound on E[-log P(x)]: the -ELBO of the T-step schedule over logsnr_range as DDPM "
        "reported it (x_hat clipped to the data's range in every term, fixed_small variances, "
        "discretised Gaussian decoder; timesteps subsampled, unbiased)",
        grid=True, cost=lambda plan: (plan.vb_steps or 1000) + 2, build=_variational_bound),
    **{name: RowKind(
        "upper bound on E[-log P(x)]: 1/2 Int E||eps - eps_hat||^2 da over logsnr_range, the "
        "tails in closed form", grid=True, cost=lambda plan: plan.npoints, build=_discrete(rounding))
       for name, rounding in (("discrete, no rounding", "none"), ("discrete, hard rounding", "hard"),
                              ("discrete, soft rounding", "soft"))},
    "conditional": RowKind(
        "estimate of E[-log p(x | y)] given each sample's label, the same bound as continuous "
        "with each label's data-matched Gaussian as the reference" + LABEL_PASS,
        when=_labelled, cost=_label_cost, build=_given),
    "mutual information": RowKind(
        "estimate of E[i(x; y)] = E[log p(x | y) - log p(x)], the pointwise mutual information "
        "of each sample and its label, as the difference of the two bounds on the same noise; "
        "it inherits the unconditional bound's gap" + LABEL_PASS,
        unit="nats, not per dimension", when=_labelled, derive=_statistic("information")),
    "accuracy": RowKind(
        "the fraction of the samples whose label is argmax_y p(y | x): Bayes' rule over the "
        "model's p(x | y) of every label, the training labels' frequencies as p(y), jackknifed "
        "over the replicates" + LABEL_PASS,
        unit="fraction", when=_labelled, derive=_statistic("correct")),
    "information, Bayes' rule": RowKind(
        "estimate of E[i(x; y)] as E[log p(y | x) - log p(y)], from the conditional densities "
        "alone, jackknifed over the replicates (docs/conditional.md)" + LABEL_PASS,
        unit="nats, not per dimension", when=_labelled, derive=_statistic("bayes")),
    "ode": RowKind(_ode_meaning("estimate of E[-log p(x)] of the data as they are"),
                   when=lambda plan: plan.ode is not None, cost=lambda plan: ODE_EVALUATIONS,
                   build=_ode(False)),
    "ode, dequantized": RowKind(
        _ode_meaning("upper bound on E[-log P(x)] (score_sde's dequantized bits/dim): the ODE "
                     "estimate of x + delta (U - 1/2), - d log(delta)"), grid=True,
        when=lambda plan: plan.ode is not None, cost=lambda plan: ODE_EVALUATIONS, build=_ode(True)),
}
ODE_EVALUATIONS = 200  # function evaluations per sample the up-front estimate assumes for an ODE
EXACT = "the exact value on the same points"  # the meaning of the `exact` rows (known densities)
