"""The estimates of the evaluation table (evaluation.py) as data, one row kind each: `ROWS`
maps each estimate's name to a `RowKind` (what the number means, what data it needs, what it costs, how it is built from the
evaluation and a model). Adding a row is one entry here plus its estimator; it may also be added
from outside (estimates.ROWS["name"] = estimates.RowKind(...)).
"""
import dataclasses
import math
from typing import Callable, Optional

import torch as t

import utils
from vb import variational_bound


@dataclasses.dataclass(frozen=True)
class RowKind:
    """One kind of estimate in the table.

    meaning: what the number is (a bound, an estimate, a change of units), printed under the
        table and stored with every row; a str, or meaning(ev) -> str for one that names the
        evaluation's settings.
    unit: "nats" (per sample, also in bits/dim), "nats, not per dimension" or "fraction"; the
        value is the row's "nats" field for the first two, its "value" field otherwise.
    grid: None for any data, True for data on a grid only.
    when(ev): whether the evaluation computes the row (default: always).
    cost(ev): denoiser evaluations per scored sample for one model (the up-front estimate).
    build(ev, entry) -> (fn, span), or None where the entry has no such row: fn(x, index) ->
        per-sample values (B,), or (values, the standard errors of each sample's own
        integration[, the denoiser evaluations each sample took]), with x a batch of scored
        samples and index their positions; span the row's log-SNR proposal (its range and kind
        are reported) or a (lo, hi) range, or None. `ev` is the Evaluation (its seed, npoints,
        grid, scored samples' labels, and `proposal(kind, entry, ...)`); `entry` the model's
        Entry.
        Rows that share a computation keep it for the batch in `ev.shared` (a dict emptied
        before every batch).
    derive: (row, fn(values, ev)) instead of build: computed from another row's per-sample values
        at no cost.
    """
    meaning: object
    unit: str = "nats"
    grid: Optional[bool] = None
    when: Callable = lambda ev: True
    cost: Callable = lambda ev: 0
    build: Optional[Callable] = None
    derive: Optional[tuple] = None


@dataclasses.dataclass
class Entry:
    """A model of the table: its name, the DiffusionModel scored for continuous estimates, the
    candidate bases it may round or choose among (indices into Evaluation.bases: 0 is the
    Gaussian), and the model whose log-SNR range, proposal and schedule the row uses."""
    name: str
    model: object
    bases: list
    like: object

    @property
    def conditional(self):
        """A model of p(x | y) (the Gaussian and the ensembles are not)."""
        return self.model is not None and self.model.hparams.get("num_classes") is not None


def _continuous(ev, entry):
    """-log p(x) of the data as they are (nll_points)."""
    proposal = ev.proposal("continuous", entry, entry.like.proposal)

    def fn(x, index):
        return entry.model.nll_points(x, ev.npoints, seed=ev.seed, index=index,
                                      proposal=proposal)
    return fn, proposal


def _dequantized(ev, entry):
    """-log p(x + delta (U - 1/2)) - d log delta, U named by (seed, index)."""
    proposal = ev.proposal("continuous", entry, entry.like.proposal)
    delta, d = ev.grid.delta, entry.model.d

    def fn(x, index):
        x = utils.dequantize(x, delta, ev.seed, index)
        nll, stderr = entry.model.nll_points(x, ev.npoints, seed=ev.seed, index=index,
                                             proposal=proposal)
        return utils.discrete_limit_nats(nll, delta, d), stderr
    return fn, proposal


def _variational_bound(ev, entry):
    """DDPM's -ELBO over the denoiser's own schedule, else 1000 steps linear in log SNR over the
    model's range."""
    schedule = getattr(entry.like.model, "alphas_cumprod", None)
    if schedule is None:
        schedule = utils.logsnr_schedule(*entry.like.proposal.range)
    model = ev.discrete_model(entry, ("none",))

    def fn(x, index):
        return variational_bound(model, x, ev.grid, schedule, ev.vb_steps, seed=ev.seed,
                                 index=index)
    return fn, tuple(utils.schedule_logsnr(schedule)[[-1, 0]].tolist())


def _discrete(rounding):
    """-log P(x) directly, over a range that resolves the grid; with rounding, x_hat is the
    Gaussian's, the entry's own, or the entry's rounded one, chosen per log SNR on held-out data."""
    def build(ev, entry):
        roundings = ("none",) if rounding == "none" else ("none", rounding)
        model = ev.discrete_model(entry, roundings)
        wide = entry.like.proposal.widened(utils.grid_resolved_logsnr(ev.grid.delta))
        proposal = ev.proposal("discrete", entry, wide, roundings)

        def fn(x, index):
            return model.nll_discrete_points(x, ev.grid, ev.npoints, seed=ev.seed, index=index,
                                             proposal=proposal)
        return fn, proposal
    return build


def _ode(dequantize):
    """-log p(x) of the density the probability-flow ODE of the entry's denoiser defines
    (DiffusionModel.nll_ode); dequantize: of x + delta (U - 1/2), - d log delta."""
    def build(ev, entry):
        settings = dict(ev.ode)

        def fn(x, index):
            if dequantize:
                x = utils.dequantize(x, ev.grid.delta, ev.seed, index)
            nll, info = entry.model.nll_ode(x, seed=ev.seed, index=index, **settings)
            if dequantize:
                nll = utils.discrete_limit_nats(nll, ev.grid.delta, entry.model.d)
            return nll, t.zeros_like(nll), info["nfe"]
        return fn, entry.like.proposal.range
    return build


def _ode_meaning(what):
    def meaning(ev):
        o = ev.ode
        trace = "exact" if o["trace"] == "exact" else f"Hutchinson's, {o['probes']} probe(s)"
        return (f"{what}: -log of the density the probability-flow ODE defines (the denoiser over "
                "logsnr_range, the Gaussian's exact one beyond; a different density from the one "
                "the IT rows bound), by an adaptive Dormand-Prince solve at rtol "
                f"{o['rtol']:g}, atol {o['atol']:g}, divergence {trace}; evaluations: function "
                "evaluations per sample, each with its divergence")
    return meaning


def _labelled_row(estimate):
    """A conditional model's row: estimate(model, x, y, terms) -> per-sample values, or (values,
    their integration standard errors), from the batch's label_terms of no label and every
    label (B, R, 1 + K), computed once for all the label rows; none for an unconditional entry
    (the Gaussian, the ensembles)."""
    def build(ev, entry):
        if not entry.conditional:
            return None
        proposal = ev.proposal("continuous", entry, entry.like.proposal)

        def fn(x, index):
            key = ("label terms", entry.name)
            if key not in ev.shared:
                ev.shared[key] = entry.model.label_terms(
                    x, t.arange(-1, ev.num_classes, device=x.device), ev.npoints, seed=ev.seed,
                    index=index, proposal=proposal)
            out = estimate(entry.model, x, ev.labels.to(index.device)[index], ev.shared[key])
            values, stderr = out if isinstance(out, tuple) else (out, t.zeros_like(out))
            return values, stderr, t.full_like(values, _label_cost(ev))
        return fn, proposal
    return build


def _label_cost(ev):
    return ev.npoints * (ev.num_classes + 1)


def _mean_and_stderr(terms):
    """Per-sample estimates and standard errors from the replicates' (B, R)."""
    return terms.mean(1), terms.std(1) / math.sqrt(terms.shape[1])


def _of_label(terms, y):
    """The label terms of each sample's label y, (B, R)."""
    return terms[..., 1:].gather(2, y.view(-1, 1, 1).expand(-1, terms.shape[1], 1))[..., 0]


def _given(model, x, y, terms):
    """-log p(x | y) = -log q(x) + the label terms of y."""
    values, stderr = _mean_and_stderr(_of_label(terms, y))
    return model.reference.nll(x) + values, stderr


def _information(model, x, y, terms):
    """i(x; y) = log p(x | y) - log p(x): the terms of no label minus those of y (mi_points)."""
    return _mean_and_stderr(terms[..., 0] - _of_label(terms, y))


def _accuracy(model, x, y, terms):
    """1 where argmax_y log p(y | x) is the sample's label, else 0 (class_log_posterior)."""
    return (model.label_log_posterior(terms[..., 1:].mean(1)).argmax(1) == y).double()


def _information_by_bayes(model, x, y, terms):
    """i(x; y) = log p(y | x) - log p(y) by Bayes' rule, from the conditional densities alone."""
    posterior = model.label_log_posterior(terms[..., 1:].mean(1))
    return posterior.gather(1, y[:, None])[:, 0] - model.label_log_prior.to(posterior)[y]


def _labelled(ev):
    return ev.labels is not None


ROWS = {  # the table's estimates, in the order of its columns
    "continuous": RowKind(
        "estimate of E[-log p(x)] of the data as they are: an upper bound in expectation for the "
        "hybrid denoiser (the model over logsnr_range, the Gaussian's optimal predictor outside); "
        "for grid data it depends on the range's top",
        cost=lambda ev: ev.npoints, build=_continuous),
    "discrete limit": RowKind(
        "continuous - d log(delta): a change of units, not a bound", grid=True,
        derive=("continuous", lambda values, ev: utils.discrete_limit_nats(
            values, ev.grid.delta, ev.d))),
    "dequantized": RowKind(
        "upper bound on E[-log P(x)]: the continuous estimate of x + delta (U - 1/2), "
        "- d log(delta)", grid=True, cost=lambda ev: ev.npoints, build=_dequantized),
    "variational bound": RowKind(
        "upper bound on E[-log P(x)]: the -ELBO of the T-step schedule over logsnr_range as DDPM "
        "reported it (x_hat clipped to the data's range in every term, fixed_small variances, "
        "discretised Gaussian decoder; timesteps subsampled, unbiased)",
        grid=True, cost=lambda ev: (ev.vb_steps or 1000) + 2, build=_variational_bound),
    **{name: RowKind(
        "upper bound on E[-log P(x)]: 1/2 Int E||eps - eps_hat||^2 da over logsnr_range, the "
        "tails in closed form", grid=True, cost=lambda ev: ev.npoints, build=_discrete(rounding))
       for name, rounding in (("discrete, no rounding", "none"), ("discrete, hard rounding", "hard"),
                              ("discrete, soft rounding", "soft"))},
    "conditional": RowKind(
        "estimate of E[-log p(x | y)] given each sample's label, the same bound as continuous "
        "for the model's conditional density; the label rows share one pass over every label and "
        "none on the same points (their evaluations: that pass's)", when=_labelled,
        cost=_label_cost, build=_labelled_row(_given)),
    "mutual information": RowKind(
        "estimate of E[i(x; y)] = E[log p(x | y) - log p(x)], the pointwise mutual information "
        "of each sample and its label (1/2 Int E[||eps - eps_hat(z)||^2 - ||eps - eps_hat(z, "
        "y)||^2] da, the same noise in both terms), in nats per sample",
        unit="nats, not per dimension", when=_labelled, build=_labelled_row(_information)),
    "accuracy": RowKind(
        "the fraction of the samples whose label is argmax_y log p(y | x): the model's p(x | y) "
        "for every label on common points, the training labels' frequencies as p(y)",
        unit="fraction", when=_labelled, build=_labelled_row(_accuracy)),
    "information, Bayes' rule": RowKind(
        "estimate of E[i(x; y)] as E[log p(y | x) - log p(y)]: from the conditional densities "
        "alone, without the unconditional one, whose bound's gap the "
        "difference form inherits; in nats per sample", unit="nats, not per dimension",
        when=_labelled, build=_labelled_row(_information_by_bayes)),
    "ode": RowKind(_ode_meaning("estimate of E[-log p(x)] of the data as they are"),
                   when=lambda ev: ev.ode is not None, cost=lambda ev: ODE_EVALUATIONS,
                   build=_ode(False)),
    "ode, dequantized": RowKind(
        _ode_meaning("upper bound on E[-log P(x)] (score_sde's dequantized bits/dim): the ODE "
                     "estimate of x + delta (U - 1/2), - d log(delta)"), grid=True,
        when=lambda ev: ev.ode is not None, cost=lambda ev: ODE_EVALUATIONS, build=_ode(True)),
}
ODE_EVALUATIONS = 200  # function evaluations per sample the up-front estimate assumes for an ODE
EXACT = "the exact value on the same points"  # the meaning of the `exact` row (known densities)
