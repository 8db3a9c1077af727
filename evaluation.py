"""The evaluation table of trained models as two Trainer.test passes (experiment.py builds the
Trainer): rows of E[-log p] in nats and bits/dim with standard errors, every sample's values kept,
printed and written as JSON (docs/evaluation.md).

A row is a model (the data-matched Gaussian, each checkpoint, their ensemble) and an estimate
(estimates.ROWS). "select" scores every candidate denoiser per log-SNR bin on the selection
samples; the ensembles, rounding choices and fitted proposals follow (a `Plan`). "score" computes
every row on the scored samples. Every draw is named by (seed, sample index) and the values are
gathered in index order, so the table is the same for any number of processes and batch size.
"""
import dataclasses
import os
import time
from typing import Optional

import pytorch_lightning as pl
import torch as t

import estimators as est
import utils
from cli import UserError
from denoisers import Ensemble, GaussianDenoiser, GridRounding
from estimates import EXACT, ROWS
from proposals import BINS, FittedProposal, LogisticProposal

RESULTS_SCHEMA = "itd-eval/4"
SELECTION = 1  # names the held-out choice's stream apart from the scored rows' (derive_seed)


@dataclasses.dataclass
class Entry:
    """A model of the table: its denoiser, reference, own proposal (range, logistic) and schedule
    (or None), its candidate bases (indices into Plan.bases: 0 is the Gaussian) and, for a model
    of p(x | y), its label prior."""
    name: str
    denoiser: object
    reference: object
    proposal: LogisticProposal
    bases: list
    schedule: Optional[t.Tensor] = None
    label_prior: Optional[t.Tensor] = None

    @property
    def conditional(self):
        return self.label_prior is not None


class Plan:
    """What the rows are computed with: the settings (npoints, seed, grid, d, ode, vb_steps,
    labels, num_classes), and after the selection pass each row's denoiser (a single base as it
    is, else the per-bin held-out choice among candidate columns: every base under every
    rounding) and log-SNR proposal (fitted to that row's held-out integrand)."""

    def __init__(self, bases, edges, grid, proposal_kind, bins, seed, **settings):
        self.bases, self.edges, self.grid, self.bins = bases, edges, grid, bins
        self.proposal_kind, self.seed, self.heldout = proposal_kind, seed, {}
        self.roundings = {"continuous": ("none",), "discrete": ("none", "hard", "soft")}
        self.selection_seed = utils.derive_seed(seed, SELECTION)
        for key, value in settings.items():
            setattr(self, key, value)

    def candidates(self, kind):
        """(z, a) -> every column's prediction of `kind`, each base evaluated once."""
        rounders = [GridRounding(None, self.grid, r) for r in self.roundings[kind][1:]]

        def predict(z, a):
            eps = [est.denoise(b, z, a) for b in self.bases]
            return eps + [r.round_eps(z, a, e) for r in rounders for e in eps]
        return predict

    def columns(self, kind, entry, roundings=("none",)):
        """An entry's candidate columns: its bases under `roundings`, and with rounding the
        Gaussian too (column index: rounding * bases + base)."""
        n, order = len(self.bases), self.roundings[kind]
        cols = {order.index(r) * n + b for r in roundings for b in entry.bases}
        return sorted(cols | ({0} if roundings != ("none",) else set()))

    def column(self, kind, c):
        rounding, base = divmod(c, len(self.bases))
        mode = self.roundings[kind][rounding]
        return self.bases[base] if mode == "none" else GridRounding(self.bases[base], self.grid, mode)

    def denoiser(self, kind, entry, roundings=("none",)):
        """The row's denoiser: the entry's own where it has one base unrounded, else the per-bin
        held-out best of its columns."""
        if len(entry.bases) == 1 and roundings == ("none",):
            return entry.denoiser
        cols = self.columns(kind, entry, roundings)
        return Ensemble.from_heldout([self.column(kind, c) for c in cols], self.edges[kind],
                                     self.heldout[kind].mean(0).T[cols])

    def proposal(self, kind, entry, roundings=("none",)):
        """The row's log-SNR importance distribution: the logistic of the entry's range (widened
        to resolve the grid for discrete rows), fitted to the row's held-out integrand (1/2
        (error - the Gaussian's) continuous, 1/2 error discrete) unless proposal="logistic",
        there is nothing to follow or too few selection samples (docs/evaluation.md)."""
        base = entry.proposal
        if kind == "discrete":
            base = base.widened(utils.grid_resolved_logsnr(self.grid.delta))
        logistic = LogisticProposal(base.loc, base.scale, base.clip)
        errors = self.heldout[kind]
        if self.proposal_kind == "logistic" or len(errors) < FittedProposal.MIN_SAMPLES:
            return logistic
        cols = t.as_tensor(self.columns(kind, entry, roundings))
        best = cols[errors.mean(0).T[cols].argmin(0)]
        chosen = errors[:, t.arange(errors.shape[1]), best]
        terms = 0.5 * (chosen - errors[..., 0]) if kind == "continuous" else 0.5 * chosen
        logsnrs = est.heldout_logsnrs(t.arange(len(errors)), self.selection_seed, self.edges[kind])
        return FittedProposal.from_draws(logistic, logsnrs[..., 0], terms, bins=self.bins)


class Evaluation(pl.LightningModule):
    """The table of DiffusionModels `models` (named `names`) on a datamodules.Data's evaluation
    samples, split once (seeded) into selection and scored parts; or, with `scored` (x, labels),
    every one of those samples scored and the data's for selection. `limit`: score the first
    `limit` scored samples only. ode: None or the ODE rows' settings (ode.settings)."""

    def __init__(self, models, names, data, scored=None, seed=0, npoints=128, batch_size=256,
                 select_fraction=0.5, bins=BINS, vb_steps=100, proposal="fitted", ode=None,
                 limit=None):
        super().__init__()
        if proposal not in ("fitted", "logistic"):
            raise ValueError(f"proposal must be 'fitted' or 'logistic', got {proposal!r}")
        self.models, self.names, self.data = t.nn.ModuleList(models), list(names), data
        self.scored, self.limit, self.proposal_kind, self.ode = scored, limit, proposal, ode
        self.seed, self.npoints, self.batch_size, self.bins = seed, npoints, batch_size, bins
        self.select_fraction, self.vb_steps = select_fraction, vb_steps or None
        self.samples, self.phase, self.rows, self.per_sample = None, "select", [], {}
        self.d = models[0].d

    def prepare_data(self):  # Lightning calls it once per node: downloads
        self.data.prepare_data()

    def setup(self, stage):
        """The selection and scored samples (their positions in the evaluated data kept as
        `scored_index`), the candidates and bins of the held-out choice, and the Plan."""
        if self.samples is not None:
            return
        self.data.setup()
        x, grid = self.data.eval_data()
        first = self.models[0]
        labels = self.data.eval_labels() if first.num_classes else None
        if self.scored is None:
            n_select = int(round(self.select_fraction * len(x)))
            perm = t.randperm(len(x), generator=t.Generator().manual_seed(self.seed))
            select, self.scored_index = perm[:n_select], perm[n_select:]
            score, labels = x, labels
        else:
            select, self.scored_index = t.arange(len(x)), t.arange(len(self.scored[0]))
            score, labels = self.scored
            labels = labels if first.num_classes else None
        self.scored_index = self.scored_index[:self.limit]
        if min(len(select), len(self.scored_index)) < max(2, self.trainer.world_size):
            raise UserError(f"{len(select)} selection and {len(self.scored_index)} scored samples "
                            f"are too few for {self.trainer.world_size} process(es)")
        self.samples = {"select": x[select], "score": score[self.scored_index]}
        self.labels = None if labels is None else labels[self.scored_index]
        bases = [GaussianDenoiser(first.reference)] + list(self.models)
        edges = {"continuous": _union_bins([m.proposal for m in self.models], self.bins)}
        if grid is not None:
            top = utils.grid_resolved_logsnr(grid.delta)
            edges["discrete"] = _union_bins([m.proposal.widened(top) for m in self.models], self.bins)
        self.plan = Plan(bases, edges, grid, self.proposal_kind, self.bins, self.seed,
                         npoints=self.npoints, d=self.d, ode=self.ode, vb_steps=self.vb_steps,
                         labels=self.labels, num_classes=first.num_classes)
        n, schedules = len(self.models), [getattr(m.model, "alphas_cumprod", None)
                                          for m in self.models]
        self.entries = ([Entry("gaussian", bases[0], first.reference, first.proposal, [0],
                               schedules[0])]
                        + [Entry(name, m, m.reference, m.proposal, [1 + i], schedule,
                                 m.label_log_prior if m.num_classes else None)
                           for i, (name, m, schedule) in enumerate(zip(self.names, self.models,
                                                                        schedules))]
                        + [Entry("ensemble", None, first.reference, first.proposal,
                                 list(range(n + 1)), schedules[0])])
        if self.trainer.is_global_zero:
            select_cost, score_cost = self.evaluations_per_sample()
            print(f"evaluating {n} model(s) on {len(self.scored_index)} scored samples "
                  f"({len(select)} for selection) with {self.trainer.world_size} process(es): "
                  f"{select_cost} + {score_cost} denoiser evaluations per sample, "
                  f"{select_cost * len(select) + score_cost * len(self.scored_index):,} in all",
                  flush=True)

    def kinds(self):
        """The row kinds this evaluation computes, in table order."""
        return {name: kind for name, kind in ROWS.items()
                if (not kind.grid or self.plan.grid is not None) and kind.when(self.plan)}

    def evaluations_per_sample(self):
        """Denoiser evaluations per selection sample and per scored sample (for the log)."""
        n = len(self.models)  # the Gaussian's evaluations cost next to nothing
        select = sum((len(e) - 1) * n for e in self.plan.edges.values())  # roundings reuse them
        return select, sum(kind.cost(self.plan) for kind in self.kinds().values()) * (n + 1)

    def run(self, trainer):
        """Both passes through the trainer: the selection samples, then the scored ones."""
        for self.phase in ("select", "score"):
            trainer.test(self, verbose=False)

    # -- Lightning hooks
    def test_dataloader(self):
        x = self.samples[self.phase]
        shard = range(self.global_rank, len(x), self.trainer.world_size)
        return t.utils.data.DataLoader(_Keyed(x, shard), batch_size=self.batch_size)

    def on_test_epoch_start(self):
        self.parts, self.started = [], time.time()
        if self.phase == "score":  # the ensemble's choice is known after the selection pass
            self.entries[-1].denoiser = self.plan.denoiser("continuous", self.entries[-1])
            built = [(entry, name, kind.build(self.plan, entry)) for entry in self.entries
                     for name, kind in self.kinds().items() if kind.build is not None]
            self.jobs = [(entry, name, *job) for entry, name, job in built if job is not None]

    def test_step(self, batch, batch_idx):
        index, x = batch
        if self.phase == "select":
            values = [est.heldout_errors(self.plan.candidates(kind), x, index,
                                         self.plan.selection_seed, edges).flatten(1)
                      for kind, edges in self.plan.edges.items()]
        else:
            y = None if self.labels is None else self.labels.to(index.device)[index]
            values = []
            for entry, estimate, fn, _ in self.jobs:
                out = fn(x, index, y)
                out = out if isinstance(out, dict) else dict(values=out)
                cost = out.get("cost", t.full_like(out["values"], ROWS[estimate].cost(self.plan)))
                for _, kind in self._family(estimate):
                    v, se = (out["values"], out.get("stderr")) if kind.derive is None else \
                        kind.derive[1](out, self.plan)
                    values.append(t.stack([v.double(), (t.zeros_like(v) if se is None else se)
                                           .double(), cost.double()], 1))
        self.parts.append((index, t.cat(values, 1)))
        batches = self.trainer.num_test_batches[0]
        if batch_idx == 0 and batches > 1 and self.trainer.is_global_zero:
            left = (time.time() - self.started) * (batches - 1)
            print(f"{self.phase}: about {left:.0f} s left for this pass", flush=True)

    def _family(self, estimate):
        """A built row and the rows derived from it, in table order."""
        return [(name, kind) for name, kind in self.kinds().items()
                if name == estimate or (kind.derive is not None and kind.derive[0] == estimate)]

    def on_test_epoch_end(self):
        x = self.samples[self.phase]
        values = _gather_rows(self, self.parts, len(x))
        if self.phase == "select":
            start = 0
            for kind, edges in self.plan.edges.items():
                bins, m = len(edges) - 1, len(self.plan.bases) * len(self.plan.roundings[kind])
                self.plan.heldout[kind] = values[:, start:start + bins * m].view(len(x), bins, m)
                start += bins * m
            return
        self.rows, j = [], 0
        for entry, estimate, _, span in self.jobs:
            for name, kind in self._family(estimate):
                nats, stderr, cost = values[:, 3 * j:3 * j + 3].unbind(1)
                self.per_sample[(entry.name, name)] = (nats, stderr)
                row = table_row(entry.name, name, nats, self.d, span, stderr, kind.unit)
                meaning = kind.meaning(self.plan) if callable(kind.meaning) else kind.meaning
                self.rows.append(dict(row, unit=kind.unit, evaluations=cost.mean().item(),
                                      meaning=meaning))
                j += 1

    def exact_rows(self):
        """The exact rows on the scored samples where the data's densities are known."""
        x = self.samples["score"].cpu()
        nll = self.data.exact_nll(x) if self.scored is None else None
        rows = [] if nll is None else [("continuous", nll)]
        given = None if self.labels is None or self.scored is not None else self.data.exact_labels(
            x, self.labels.cpu())
        if given is not None:
            rows += zip(("conditional", "mutual information", "accuracy"), given)
        return [dict(table_row("exact", name, v, self.d, unit=ROWS[name].unit), meaning=EXACT,
                     unit=ROWS[name].unit) for name, v in rows]

    def results(self, info=None, checkpoints=(), wall_time_s=None):
        """The table as a dict (the JSON file's content), the exact rows first."""
        n, grid = len(self.scored_index), self.plan.grid
        header = (f"E[-log p] on {n} scored samples: nats per sample and bits/dim; +- is the "
                  "standard error over the samples (data and log-SNR integral together)")
        if grid is not None:
            header += (f"; grid data lo + k delta, lo = {grid.lo:g}, delta = {grid.delta:.5g}, "
                       f"{grid.levels or 'unbounded'} levels")
        return dict(schema=RESULTS_SCHEMA, **(info or {}), header=header,
                    checkpoints=[os.path.abspath(p) for p in checkpoints],
                    x_shape=list(self.models[0].x_shape), d=self.d, npoints=self.npoints,
                    seed=self.seed, select_fraction=self.select_fraction,
                    proposal=self.proposal_kind, n_scored=n, n_selection=len(self.samples["select"]),
                    grid=None if grid is None else grid._asdict(),
                    world_size=self.trainer.world_size, rows=self.exact_rows() + self.rows,
                    wall_time_s=wall_time_s)


def _union_bins(proposals, bins):
    """Equal-width bins over the union of the proposals' ranges: the held-out choice's."""
    ranges = [p.range for p in proposals]
    return est.bin_edges((min(r[0] for r in ranges), max(r[1] for r in ranges)), bins)


class _Keyed(t.utils.data.Dataset):
    """(index, x[index]) for the indices of one shard."""

    def __init__(self, x, indices):
        self.x, self.indices = x, list(indices)

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
# The table as rows, text and files
# ---------------------------------------------------------------------------------------------
def table_row(model, estimate, nll, d, span=None, stderr=None, unit="nats"):
    """A row {model, estimate, nats | value, its stderr, bpd, bpd_stderr, integration_nats,
    logsnr_range, proposal} from per-sample values: the standard error sqrt(Var_i(v_i) / N) over
    the N scored samples covers data and integral together; integration_nats, the rms of the
    samples' own integration errors, is the integral's part (docs/evaluation.md)."""
    proposal = None
    if isinstance(span, LogisticProposal):
        proposal = {"kind": "logistic", "loc": span.loc, "scale": span.scale, "clip": span.clip}
        if isinstance(span, FittedProposal):
            proposal.update(kind="fitted", mix=span.mix, moved=round(span.moved(), 4))
        span = span.range
    nll = t.as_tensor(nll).double()
    mean = nll.mean().item()
    spread = utils.stderr_from_sums(nll.sum(), nll.pow(2).sum(), len(nll)).item()
    integration = None if stderr is None else t.as_tensor(stderr).double().pow(2).mean().sqrt().item()
    bpd = (utils.nats_to_bpd(mean, d), utils.nats_to_bpd(spread, d)) if unit == "nats" else (None, None)
    values = dict(nats=None, nats_stderr=None, value=mean, value_stderr=spread) if (
        unit == "fraction") else dict(nats=mean, nats_stderr=spread)
    return dict(model=model, estimate=estimate, **values, bpd=bpd[0], bpd_stderr=bpd[1],
                integration_nats=integration, proposal=proposal,
                logsnr_range=None if span is None else [round(v, 3) for v in span])


def format_results(rows, header):
    """The table as text: a line per (model, estimate) with its log-SNR range, integration noise,
    evaluations and proposal, then what each estimate means (keyed by the whole row name)."""
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
    meanings = {("exact" if r["model"] == "exact" else r["estimate"]): r["meaning"] for r in rows}
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


def per_sample_table(ev, files=None):
    """(header, rows) of every scored sample: its index in the evaluated data (and label and file
    name where known), then per model and row its value in nats and bits/dim and its integration
    standard error. The rows' means are the table's."""
    header, columns = ["index"], [ev.scored_index.tolist()]
    if ev.labels is not None:
        header, columns = header + ["label"], columns + [ev.labels.tolist()]
    if files is not None:
        header, columns = header + ["file"], columns + [[files[i] for i in ev.scored_index]]
    for (model, estimate), (values, stderr) in ev.per_sample.items():
        unit = ROWS[estimate].unit
        name = f"{model}: {estimate}"
        if unit == "fraction":
            header.append(name)
            columns.append(values.tolist())
            continue
        header += [f"{name} (nats)", f"{name} (integration stderr, nats)"]
        columns += [values.tolist(), stderr.tolist()]
        if unit == "nats":
            header.append(f"{name} (bits/dim)")
            columns.append(utils.nats_to_bpd(values, ev.d).tolist())
    return header, sorted(zip(*columns))


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
