"""The evaluation table of trained models, as a LightningModule run by Trainer.test (experiment.py
builds the Trainer): rows of E[-log p] in nats and bits/dim with standard errors, printed and
written as JSON.

A row is a model (the data-matched Gaussian, each checkpoint, their ensemble) and an estimate
(estimates.ROWS: the estimates as data). Here: the models' entries, the candidates of the held-out
choice, the two passes, and the table as text and as a results file.
"""
import os
import time

import pytorch_lightning as pl
import torch as t

import datasets
import utils
from cli import UserError
from denoisers import Ensemble, GaussianDenoiser, GridRounding
from diffusionmodel import bin_edges, heldout_errors, heldout_logsnrs
from estimates import EXACT, ROWS, Entry
from proposals import BINS, FittedProposal, LogisticProposal

RESULTS_SCHEMA = "itd-eval/3"


def _kind(row):
    """The meaning's key of a row: its estimate up to the first comma, or `exact`."""
    return "exact" if row["model"] == "exact" else row["estimate"].split(",")[0]


def _meaning(estimate, ev):
    meaning = ROWS[estimate].meaning
    return meaning(ev) if callable(meaning) else meaning


# ---------------------------------------------------------------------------------------------
# The candidates of the held-out choice
# ---------------------------------------------------------------------------------------------
class Candidates:
    """The candidate denoisers of a held-out choice as the columns of its errors: every base (the
    Gaussian, then each model) under every rounding of `roundings` ("none", "hard", "soft"). Rows
    name columns by (bases, roundings); no index arithmetic lives outside this class."""

    def __init__(self, bases, roundings=("none",), grid=None):
        self.bases, self.roundings = list(bases), tuple(roundings)
        self.rounders = {r: GridRounding(None, grid, r) for r in self.roundings if r != "none"}

    def __len__(self):
        return len(self.bases) * len(self.roundings)

    def columns(self, bases, roundings):
        """The columns of the given base indices under the given roundings, sorted."""
        n = len(self.bases)
        return sorted(self.roundings.index(r) * n + b for r in roundings for b in bases)

    def predict(self, z, a):
        """Every column's noise prediction at (z, a), each base evaluated once."""
        eps = [b(z, a) for b in self.bases]
        return [e if r == "none" else self.rounders[r].round_eps(z, a, e)
                for r in self.roundings for e in eps]

    def module(self, column):
        """The denoiser of one column."""
        rounding, base = divmod(column, len(self.bases))
        base = self.bases[base]
        if self.roundings[rounding] == "none":
            return base
        return GridRounding(base, self.rounders[self.roundings[rounding]].grid,
                            self.roundings[rounding])


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------
class Evaluation(pl.LightningModule):
    """The evaluation table of trained DiffusionModels as two Trainer.test passes.

    "select" scores every candidate denoiser (the data-matched Gaussian, each model and, for grid
    data, their hard and soft roundings) per log-SNR bin on the selection samples; the ensembles
    and rounding choices follow from those held-out errors. "score" computes every row on the
    scoring samples. Samples are sharded across processes; every draw is named by (seed, sample
    index), and the per-sample values are gathered in index order, so the table is the same for
    any number of processes and any batch size. With proposal="fitted" every row's log-SNR
    importance distribution is fitted to that row's integrand from the selection pass's errors
    (no extra evaluations; proposals.FittedProposal).

    source: a datasets.DataSource; eval_data() gives the samples and their grid (or None).
    ode: None, or the settings of the probability-flow ODE rows (DiffusionModel.nll_ode's trace,
    probes, rtol, atol).
    """

    def __init__(self, models, names, source, seed=0, npoints=128, batch_size=256,
                 select_fraction=0.5, fit_reference=False, bins=BINS, vb_steps=100,
                 proposal="fitted", ode=None):
        super().__init__()
        if proposal not in ("fitted", "logistic"):
            raise ValueError(f"proposal must be 'fitted' or 'logistic', got {proposal!r}")
        self.proposal_kind, self.ode = proposal, ode
        self.vb_steps = vb_steps or None
        self.models, self.names, self.source = t.nn.ModuleList(models), list(names), source
        self.seed, self.npoints, self.batch_size, self.bins = seed, npoints, batch_size, bins
        self.select_fraction, self.fit_reference = select_fraction, fit_reference
        self.data, self.phase, self.rows, self.per_sample = None, "select", [], {}
        self.shared = {}  # what rows of one batch share (estimates.RowKind)
        self.d, self.num_classes = models[0].d, models[0].hparams.get("num_classes")
        self.heldout = {}  # kind -> the selection samples' errors, samples x bins x candidates
        self.selection_seed = utils.derive_seed(seed, SELECTION)

    def prepare_data(self):  # Lightning calls it once per node: downloads
        self.source.prepare_data()

    def setup(self, stage):
        """The data (source.eval_data() -> (x, grid)), split once (seeded) into the selection and
        scoring parts, the candidates and the log-SNR bins of the held-out choice."""
        if self.data is not None:
            return
        self.source.setup()
        first = self.models[0]
        if self.fit_reference:  # a pretrained model evaluated as it is: the data-matched Gaussian
            first.fit_reference(self.source.reference_data())
        x, self.grid = self.source.eval_data()
        n_select = int(round(self.select_fraction * len(x)))
        perm = t.randperm(len(x), generator=t.Generator().manual_seed(self.seed))
        if min(n_select, len(x) - n_select) < max(2, self.trainer.world_size):
            raise UserError(f"{len(x)} samples are too few to split into selection and scoring "
                            f"parts for {self.trainer.world_size} process(es)")
        self.data = {"select": x[perm[:n_select]], "score": x[perm[n_select:]]}
        y = self.source.eval_labels() if first.hparams.get("num_classes") else None
        self.labels = None if y is None else y[perm[n_select:]]  # the scored samples' labels
        self.bases = [GaussianDenoiser(first.reference)] + list(self.models)
        self.candidates = {"continuous": Candidates(self.bases)}
        self.edges = {"continuous": _union_bins([m.proposal for m in self.models], self.bins)}
        if self.grid is not None:
            self.candidates["discrete"] = Candidates(self.bases, ("none", "hard", "soft"), self.grid)
            top = utils.grid_resolved_logsnr(self.grid.delta)
            self.edges["discrete"] = _union_bins([m.proposal.widened(top) for m in self.models],
                                                 self.bins)
        n = len(self.models)
        self.entries = ([Entry("gaussian", first.with_denoiser(self.bases[0]), [0], first)]
                        + [Entry(name, m, [1 + i], m)
                           for i, (name, m) in enumerate(zip(self.names, self.models))]
                        + [Entry("ensemble", None, list(range(n + 1)), first)])  # model: after
        if self.trainer.is_global_zero:
            select, score = self.evaluations_per_sample()
            print(f"evaluating {len(self.names)} model(s) on {len(x) - n_select} scored samples "
                  f"({n_select} for selection) with {self.trainer.world_size} process(es): "
                  f"{select} + {score} denoiser evaluations per sample, "
                  f"{select * n_select + score * (len(x) - n_select):,} in all", flush=True)

    # -- what the rows are built from
    def rows_for(self):
        """The row kinds this evaluation computes (grid-only ones only for grid data), in table
        order."""
        return {name: kind for name, kind in ROWS.items()
                if (not kind.grid or self.grid is not None) and kind.when(self)}

    def ensemble(self, kind, entry, roundings=("none",)):
        """The entry's model choosing per log-SNR bin among its bases under `roundings` (and the
        Gaussian), on the held-out errors; None before the selection pass."""
        if kind not in self.heldout:
            return None
        cands = self.candidates[kind]
        columns = self._columns(kind, entry, roundings)
        ensemble = Ensemble.from_heldout([cands.module(c) for c in columns], self.edges[kind],
                                         self.heldout[kind].mean(0).T[columns])
        return entry.like.with_denoiser(ensemble)

    def _columns(self, kind, entry, roundings):
        """An entry's candidate columns: its bases unrounded and under `roundings`, and, with
        rounding, the Gaussian too."""
        cands = self.candidates[kind]
        gaussian = cands.columns([0], ("none",)) if roundings != ("none",) else []
        return sorted(set(gaussian + cands.columns(entry.bases, roundings)))

    def discrete_model(self, entry, roundings):
        """The model of an entry's discrete rows: a single base unrounded as it is, otherwise the
        held-out choice."""
        if len(entry.bases) == 1 and roundings == ("none",):
            return entry.model
        return self.ensemble("discrete", entry, roundings)

    def proposal(self, kind, entry, base, roundings=("none",)):
        """The row's log-SNR importance distribution over base's range: with proposal="logistic"
        the logistic of that range (also for a checkpoint whose proposal was fitted in
        training); with "fitted" base's logistic fitted to the row whose denoiser takes, per
        log-SNR bin, the held-out best of the entry's candidate columns, from their errors on
        the selection samples (the integrand is 1/2 (error - the Gaussian's) for continuous
        rows, 1/2 error for discrete ones), in bins over the row's own whole range
        (FittedProposal.from_draws). Where there is nothing to follow (the Gaussian's row) or
        too few selection samples, the logistic."""
        logistic = LogisticProposal(base.loc, base.scale, base.clip)
        errors = self.heldout[kind]
        if self.proposal_kind == "logistic" or len(errors) < FittedProposal.MIN_SAMPLES:
            return logistic
        columns = t.as_tensor(self._columns(kind, entry, roundings))
        best = columns[errors.mean(0).T[columns].argmin(0)]
        chosen = errors[:, t.arange(errors.shape[1]), best]
        terms = 0.5 * (chosen - errors[..., 0]) if kind == "continuous" else 0.5 * chosen
        logsnrs = heldout_logsnrs(t.arange(len(errors)), self.selection_seed, self.edges[kind])
        return FittedProposal.from_draws(logistic, logsnrs[..., 0], terms, bins=self.bins)

    def evaluations_per_sample(self):
        """Denoiser evaluations per selection sample and per scored sample (for the log)."""
        n = len(self.models)  # the Gaussian's evaluations cost next to nothing
        select = sum((len(e) - 1) * n for e in self.edges.values())
        score = sum(kind.cost(self) for kind in self.rows_for().values())
        return select, score * (n + 1)

    def run(self, trainer):
        """Both passes through the trainer: the selection samples, then the scored ones."""
        for self.phase in ("select", "score"):
            trainer.test(self, verbose=False)

    # -- Lightning hooks
    def test_dataloader(self):
        x = self.data[self.phase]
        shard = range(self.global_rank, len(x), self.trainer.world_size)
        return t.utils.data.DataLoader(_Keyed(x, shard), batch_size=self.batch_size)

    def on_test_epoch_start(self):
        self.parts, self._start = [], time.time()
        if self.phase == "score":  # the ensemble's choice is known after the selection pass
            self.entries[-1].model = self.ensemble("continuous", self.entries[-1])
            built = [(entry.name, name, kind.build(self, entry)) for entry in self.entries
                     for name, kind in self.rows_for().items() if kind.build is not None]
            self.jobs = [(entry, name, *job) for entry, name, job in built if job is not None]

    def test_step(self, batch, batch_idx):
        index, x = batch
        self.shared = {}
        if self.phase == "select":
            values = [heldout_errors(self.candidates[kind].predict, x, index, self.selection_seed,
                                     edges).flatten(1) for kind, edges in self.edges.items()]
        else:
            values = [_columns(fn(x, index), ROWS[estimate].cost(self))
                      for _, estimate, fn, _ in self.jobs]
        self.parts.append((index, t.cat(values, 1)))
        batches = self.trainer.num_test_batches[0]
        if batch_idx == 0 and batches > 1 and self.trainer.is_global_zero:
            left = (time.time() - self._start) * (batches - 1)
            print(f"{self.phase}: about {left:.0f} s left for this pass", flush=True)

    def on_test_epoch_end(self):
        x = self.data[self.phase]
        values = _gather_rows(self, self.parts, len(x))
        if self.phase == "select":
            start = 0
            for kind, edges in self.edges.items():
                bins, m = len(edges) - 1, len(self.candidates[kind])
                self.heldout[kind] = values[:, start:start + bins * m].view(len(x), bins, m)
                start += bins * m
            return
        self.rows = []
        for j, (name, estimate, _, span) in enumerate(self.jobs):
            nats, stderr, cost = values[:, 3 * j:3 * j + 3].unbind(1)
            self._add_row(name, estimate, nats, span, stderr, cost)
            for derived, kind in self.rows_for().items():
                if kind.derive is not None and kind.derive[0] == estimate:
                    self._add_row(name, derived, kind.derive[1](nats, self), span, stderr, cost)

    def _add_row(self, name, estimate, values, span, stderr, cost):
        self.per_sample[(name, estimate)] = values
        unit = ROWS[estimate].unit
        row = table_row(name, estimate, values, self.d, span, stderr, unit)
        self.rows.append(dict(row, unit=unit, evaluations=cost.mean().item(),
                              meaning=_meaning(estimate, self)))

    def _exact_given(self, x):
        """The exact conditional rows where the labelled data's densities are known: -log p(x | y),
        i(x; y) and the Bayes classifier's accuracy, on the scored points."""
        exact = None if self.labels is None else datasets.exact_labels(self.source, x,
                                                                         self.labels.cpu())
        if exact is None:
            return []
        return [dict(table_row("exact", estimate, values, self.d, unit=ROWS[estimate].unit),
                     meaning=EXACT)
                for estimate, values in zip(("conditional", "mutual information", "accuracy"), exact)]

    def results(self, info=None, checkpoints=(), wall_time_s=None):
        """The table as a dict (the JSON file's content), with an `exact` row first where the
        data's density is known (on the same scored points)."""
        x_score, d = self.data["score"], self.d
        exact = self.source.exact_nll(x_score.cpu())
        rows = ([dict(table_row("exact", "continuous", exact, d), meaning=EXACT)]
                if exact is not None else []) + self._exact_given(x_score.cpu()) + self.rows
        header = (f"E[-log p] on {len(x_score)} scored samples: nats per sample and bits/dim; +- is "
                  "the standard error over the samples (data and log-SNR integral together)")
        if self.grid is not None:
            delta, lo, levels = self.grid
            header += (f"; grid data lo + k delta, lo = {lo:g}, delta = {delta:.5g}, "
                       f"{levels or 'unbounded'} levels")
        return dict(schema=RESULTS_SCHEMA, **(info or {}), header=header,
                    checkpoints=[os.path.abspath(p) for p in checkpoints],
                    x_shape=list(self.models[0].x_shape), d=d, npoints=self.npoints,
                    seed=self.seed, select_fraction=self.select_fraction,
                    proposal=self.proposal_kind, n_scored=len(x_score),
                    n_selection=len(self.data["select"]),
                    grid=None if self.grid is None else self.grid._asdict(),
                    world_size=self.trainer.world_size, rows=rows, wall_time_s=wall_time_s)


SELECTION = 1  # names the held-out choice's stream apart from the scored rows' (derive_seed)


def _union_bins(proposals, bins):
    """Equal-width bins over the union of the proposals' ranges: the held-out choice's."""
    ranges = [p.range for p in proposals]
    return bin_edges((min(r[0] for r in ranges), max(r[1] for r in ranges)), bins)


def _columns(value, cost):
    """A row's per-sample (nats, integration standard error, denoiser evaluations) as three
    float64 columns (the error 0 and the evaluations `cost` where the estimator reports none)."""
    nats, stderr, spent = ((*value, None) if len(value) == 2 else value) if isinstance(
        value, tuple) else (value, None, None)
    stderr = t.zeros_like(nats) if stderr is None else stderr
    spent = t.full_like(nats, cost) if spent is None else spent
    return t.stack([nats.double(), stderr.double(), spent.double()], 1)


class _Keyed(t.utils.data.Dataset):
    """(index, x[index]) for the indices of one shard."""

    def __init__(self, x, indices):
        self.x, self.indices = x, list(indices)  # (index, x) batches: labels by index

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.indices[i], self.x[self.indices[i]]


def _gather_rows(module, parts, n):
    """Every process's (index, values) rows as one (n, k) float64 CPU tensor in index order."""
    index = t.cat([p[0] for p in parts]).to(module.device)
    values = t.cat([p[1] for p in parts]).to(module.device, t.float64)
    if module.trainer.world_size > 1:  # shards differ in size by at most one: pad, then gather
        size = -(-n // module.trainer.world_size)
        index = t.cat([index, index.new_full((size - len(index),), -1)])
        values = t.cat([values, values.new_zeros(size - len(values), values.shape[1])])
        index, values = module.all_gather(index).flatten(0, 1), module.all_gather(values).flatten(0, 1)
    out = t.zeros(n, values.shape[1], dtype=t.float64)
    out[index[index >= 0].cpu()] = values[index >= 0].cpu()
    return out


# ---------------------------------------------------------------------------------------------
# The table as rows, text and a results file
# ---------------------------------------------------------------------------------------------
def table_row(model, estimate, nll, d, span=None, stderr=None, unit="nats"):
    """A row {model, estimate, nats, nats_stderr, bpd, bpd_stderr, integration_nats,
    logsnr_range, proposal} from per-sample values (the caller adds its meaning), in the unit of
    estimates.RowKind (bits/dim for "nats" only; a "fraction" as value, value_stderr): the standard error
    sqrt(Var_i(nll_i) / N) over the N scored samples covers the data and the log-SNR integral
    together; integration_nats, the root mean square of the samples' own integration standard
    errors (`stderr`), is the integral's part per sample (what a better proposal lowers). span:
    the row's log-SNR proposal (its range and kind are reported) or range."""
    proposal = None
    if isinstance(span, LogisticProposal):
        proposal = {"kind": "logistic", "loc": span.loc, "scale": span.scale, "clip": span.clip}
        if isinstance(span, FittedProposal):
            proposal.update(kind="fitted", mix=span.mix, moved=round(span.moved(), 4))
        span = span.range
    logsnr_range = None if span is None else [round(v, 3) for v in span]
    nll = t.as_tensor(nll).double()
    mean = nll.mean().item()
    spread = utils.stderr_from_sums(nll.sum(), nll.pow(2).sum(), len(nll)).item()
    integration = None if stderr is None else t.as_tensor(stderr).double().pow(2).mean().sqrt().item()
    bpd = (utils.nats_to_bpd(mean, d), utils.nats_to_bpd(spread, d)) if unit == "nats" else (
        None, None)
    values = dict(nats=None, nats_stderr=None, value=mean, value_stderr=spread) if (
        unit == "fraction") else dict(nats=mean, nats_stderr=spread)
    return dict(model=model, estimate=estimate, **values, bpd=bpd[0], bpd_stderr=bpd[1],
                integration_nats=integration, logsnr_range=logsnr_range, proposal=proposal)


def format_results(rows, header):
    """The table as text: a header line, then one line per (model, estimate) with its log-SNR
    range, its integration noise per sample, the denoiser evaluations it spent per sample and its
    proposal, then what each kind of estimate means."""
    lines = [header, f"{'model':<24} {'estimate':<26} {'nats':>12} {'+-':>9} {'bits/dim':>9} "
                     f"{'+-':>7}  {'log SNR':<13} {'integration':>11} {'evaluations':>11}  "
                     "proposal"]
    for r in rows:
        span = "" if r["logsnr_range"] is None else "[{:.1f}, {:.1f}]".format(*r["logsnr_range"])
        spent = f"{r['evaluations']:.0f}" if "evaluations" in r else ""
        noise = "" if not r.get("integration_nats") else f"{r['integration_nats']:.4f}"
        value, stderr = (r["nats"], r["nats_stderr"]) if r["nats"] is not None else (
            r["value"], r["value_stderr"])
        bpd = "" if r["bpd"] is None else f"{r['bpd']:9.4f} {r['bpd_stderr']:7.4f}"
        lines.append(f"{r['model']:<24} {r['estimate']:<26} {value:12.4f} {stderr:9.4f} "
                     f"{bpd:>17}  {span:<13} {noise:>11} {spent:>11}  "
                     f"{(r['proposal'] or {}).get('kind', '')}".rstrip())
    meanings = {_kind(r): r["meaning"] for r in rows}
    lines += [f"  {kind}: {meaning}" for kind, meaning in meanings.items()]
    lines.append("  integration: the rms over samples of each sample's own integration standard "
                 "error, nats (the part of +- a better proposal or more points lowers)")
    moved = [r["proposal"]["moved"] for r in rows if (r["proposal"] or {}).get("kind") == "fitted"]
    if moved:
        share = "-".join(dict.fromkeys(f"{100 * v:.0f}" for v in (min(moved), max(moved))))
        lines.append(f"  proposal: the log-SNR importance distribution; {len(moved)} rows use one "
                     f"fitted to the row on the selection samples ({share}% of the logistic's "
                     "mass moved), the others the logistic; unbiased either way")
    return "\n".join(lines)


def results_path(path=None, ckpt=None, name=None, folder=None):
    """`path`, or eval-<checkpoint's name>.json next to the checkpoint `ckpt`, or
    eval-<name>.json in `folder`; made unique: an existing file is never overwritten."""
    if path is None and ckpt is not None:
        stem = os.path.splitext(os.path.basename(ckpt))[0]
        path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"eval-{stem}.json")
    elif path is None:
        path = os.path.join(folder or ".", f"eval-{name.replace('/', '-').replace(' ', '_')}.json")
    root, ext = os.path.splitext(path)
    k = 2
    while os.path.exists(path):
        path, k = f"{root}-{k}{ext}", k + 1
    return path


def claim_results_file(path):
    """Creates the results file now, empty, so a bad path fails before the evaluation."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "x").close()
    except OSError as err:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        reason = f"{parent} is a file, not a folder" if not os.path.isdir(parent) else (
            err.strerror or str(err))
        raise UserError(f"cannot write the results to {path}: {reason}") from None
