"""The evaluation table as two Trainer.test passes, "select" and "score" (docs/evaluation.md)."""
import csv
import dataclasses
import functools
import io
import itertools
import math
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
    """A model of the table; bases: indices into Plan.bases (0: the Gaussian)."""
    name: str
    denoiser: object
    reference: object
    proposal: LogisticProposal
    bases: list
    schedule: Optional[t.Tensor] = None
    label_prior: Optional[t.Tensor] = None


class Plan:
    """The rows' settings and, after the selection pass, each row's denoiser and proposal."""

    def __init__(self, bases, grid, proposal_kind, seed, **settings):
        self.bases, self.grid = bases, grid
        self.proposal_kind, self.seed, self.heldout = proposal_kind, seed, {}
        self.roundings = {"continuous": ("none",), "discrete": ("none", "hard", "soft")}
        self.tops = {"continuous": -math.inf}  # the log SNR each kind's ranges reach at least
        if grid is not None:
            self.tops["discrete"] = utils.grid_resolved_logsnr(grid.delta)
        self.edges = {}  # the held-out bins over the union of the models' ranges
        for kind, top in self.tops.items():
            lo, hi = zip(*(m.proposal.widened(top).range for m in bases[1:]))
            self.edges[kind] = est.bin_edges((min(lo), max(hi)), BINS)
        self.selection_seed = utils.derive_seed(seed, SELECTION)
        vars(self).update(settings)

    def candidates(self, kind, z, a):
        """Every column's prediction of `kind` at (z, a), each base evaluated once."""
        eps = [est.denoise(b, z, a) for b in self.bases]
        rounders = [GridRounding(None, self.grid, r) for r in self.roundings[kind][1:]]
        return eps + [r.round_eps(z, a, e) for r in rounders for e in eps]

    def columns(self, kind, entry, roundings=("none",)):
        """An entry's candidate columns (rounding * bases + base; with rounding the Gaussian's)."""
        n, order = len(self.bases), self.roundings[kind]
        cols = {order.index(r) * n + b for r in roundings for b in entry.bases}
        return sorted(cols | ({0} if roundings != ("none",) else set()))

    def denoiser(self, kind, entry, roundings=("none",)):
        """The entry's own denoiser, or the per-bin held-out best of its columns."""
        if len(entry.bases) == 1 and roundings == ("none",):
            return entry.denoiser
        cols, n = self.columns(kind, entry, roundings), len(self.bases)
        modes = [(self.roundings[kind][c // n], self.bases[c % n]) for c in cols]
        members = [m if mode == "none" else GridRounding(m, self.grid, mode) for mode, m in modes]
        return Ensemble(members, self.edges[kind], self.heldout[kind].mean(0).T[cols].argmin(0))

    def proposal(self, kind, entry, roundings=("none",)):
        """The row's log-SNR proposal, fitted to its held-out integrand (docs/evaluation.md)."""
        base = entry.proposal.widened(self.tops[kind])
        logistic = LogisticProposal(base.loc, base.scale, base.clip)
        errors = self.heldout[kind]
        if self.proposal_kind == "logistic" or len(errors) < FittedProposal.MIN_SAMPLES:
            return logistic
        cols = t.as_tensor(self.columns(kind, entry, roundings))
        best = cols[errors.mean(0).T[cols].argmin(0)]
        chosen = errors[:, t.arange(errors.shape[1]), best]
        terms = 0.5 * (chosen - errors[..., 0]) if kind == "continuous" else 0.5 * chosen
        logsnrs = est.heldout_logsnrs(t.arange(len(errors)), self.selection_seed, self.edges[kind])
        return FittedProposal.from_draws(logistic, logsnrs, terms)


class Evaluation(pl.LightningModule):
    """The table of DiffusionModels on a Data's evaluation samples (split seeded into selection and
    scored) or on `scored` (x, labels); limit: score the first `limit`; ode: ode.settings(...)."""

    def __init__(self, models, names, data, scored=None, seed=0, npoints=128, batch_size=256,
                 select_fraction=0.5, vb_steps=100, proposal="fitted", ode=None, limit=None):
        super().__init__()
        self.models, self.names, self.data = t.nn.ModuleList(models), list(names), data
        self.scored, self.limit, self.proposal_kind, self.ode = scored, limit, proposal, ode
        self.seed, self.npoints, self.batch_size = seed, npoints, batch_size
        self.select_fraction, self.vb_steps, self.d = select_fraction, vb_steps or None, models[0].d
        self.samples, self.phase, self.rows, self.per_sample = None, "select", [], {}

    def prepare_data(self):
        self.data.prepare_data()

    def setup(self, stage):
        if self.samples is not None:
            return
        self.data.setup()
        x, grid = self.data.eval_data()
        first, n = self.models[0], len(self.models)
        if self.scored is None:
            perm = t.randperm(len(x), generator=t.Generator().manual_seed(self.seed))
            select, scored_index = perm.tensor_split([round(self.select_fraction * len(x))])
            score, labels = x, self.data.val_labels
        else:
            select, scored_index = t.arange(len(x)), t.arange(len(self.scored[0]))
            score, labels = self.scored
        self.scored_index = scored_index[:self.limit]
        if min(len(select), len(self.scored_index)) < max(2, self.trainer.world_size):
            raise UserError(f"{len(select)} selection and {len(self.scored_index)} scored samples "
                            f"are too few for {self.trainer.world_size} process(es)")
        self.samples = {"select": x[select], "score": score[self.scored_index]}
        self.labels = None if labels is None or not first.num_classes else labels[self.scored_index]
        bases = [GaussianDenoiser(first.reference)] + list(self.models)
        self.plan = Plan(bases, grid, self.proposal_kind, self.seed,
                         npoints=self.npoints, d=self.d, ode=self.ode, vb_steps=self.vb_steps,
                         labels=self.labels, num_classes=first.num_classes)
        schedules = [getattr(m.model, "alphas_cumprod", None) for m in self.models]
        gaussian = Entry("gaussian", bases[0], first.reference, first.proposal, [0], schedules[0])
        own = [Entry(name, m, m.reference, m.proposal, [1 + i], schedules[i],
                     m.label_log_prior if m.num_classes else None)
               for i, (name, m) in enumerate(zip(self.names, self.models))]
        self.entries = [gaussian, *own, dataclasses.replace(
            gaussian, name="ensemble", denoiser=None, bases=list(range(n + 1)))]
        if self.trainer.is_global_zero:  # roundings reuse the bases' evaluations; Gaussian's ~free
            select_cost = sum(len(e) - 1 for e in self.plan.edges.values()) * n
            score_cost = sum(kind.cost(self.plan) for kind in self.kinds().values()) * (n + 1)
            print(f"evaluating {n} model(s) on {len(self.scored_index)} scored samples "
                  f"({len(select)} for selection) with {self.trainer.world_size} process(es): "
                  f"{select_cost} + {score_cost} denoiser evaluations per sample, "
                  f"{select_cost * len(select) + score_cost * len(self.scored_index):,} in all",
                  flush=True)

    def kinds(self):
        """The row kinds this evaluation computes, in table order."""
        return {name: kind for name, kind in ROWS.items()
                if (not kind.grid or self.plan.grid is not None) and kind.when(self.plan)}

    def run(self, trainer):
        """Both passes through the trainer: the selection samples, then the scored ones."""
        for self.phase in ("select", "score"):
            trainer.test(self, verbose=False)

    def test_dataloader(self):  # (index, x[index]) of this process's shard
        x = self.samples[self.phase]
        shard = range(self.global_rank, len(x), self.trainer.world_size)
        keyed = t.utils.data.TensorDataset(t.arange(len(x)), x)
        return t.utils.data.DataLoader(keyed, batch_size=self.batch_size, sampler=shard)

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
            values = [est.heldout_errors(functools.partial(self.plan.candidates, kind), x, index,
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
        return [(name, kind) for name, kind in self.kinds().items()
                if name == estimate or (kind.derive is not None and kind.derive[0] == estimate)]

    def on_test_epoch_end(self):
        x, world = self.samples[self.phase], self.trainer.world_size
        index, rows = (t.cat(part).to(self.device) for part in zip(*self.parts))  # rows: float64
        if world > 1:  # shards differ in size by at most one: pad, then gather
            size = -(-len(x) // world)
            index = t.cat([index, index.new_full((size - len(index),), -1)])
            rows = t.cat([rows, rows.new_zeros(size - len(rows), rows.shape[1])])
            index, rows = self.all_gather(index).flatten(0, 1), self.all_gather(rows).flatten(0, 1)
        values = t.zeros(len(x), rows.shape[1], dtype=t.float64)  # every process's, in order
        values[index[index >= 0].cpu()] = rows[index >= 0].cpu()
        if self.phase == "select":  # each kind's (bins, candidates) block of columns in turn
            for kind, edges in self.plan.edges.items():
                bins, m = len(edges) - 1, len(self.plan.bases) * len(self.plan.roundings[kind])
                self.plan.heldout[kind] = values[:, :bins * m].view(len(x), bins, m)
                values = values[:, bins * m:]
            return
        self.rows, columns = [], iter(values.split(3, 1))  # (values, stderr, cost) of each row
        for entry, estimate, _, span in self.jobs:
            for name, kind in self._family(estimate):
                nats, stderr, cost = next(columns).unbind(1)
                self.per_sample[(entry.name, name)] = (nats, stderr)
                row = table_row(entry.name, name, nats, self.d, span, stderr, kind.unit)
                meaning = kind.meaning(self.plan) if callable(kind.meaning) else kind.meaning
                self.rows.append(dict(row, evaluations=cost.mean().item(), meaning=meaning))

    def exact_rows(self):
        """The exact rows on the scored samples where the data's densities are known."""
        if self.scored is not None:
            return []
        x = self.samples["score"].cpu()
        given = None if self.labels is None else self.data.exact_labels(x, self.labels.cpu())
        values = (self.data.exact_nll(x), *(given or (None,) * 3))
        names = ("continuous", "conditional", "mutual information", "accuracy")
        return [dict(table_row("exact", name, v, self.d, unit=ROWS[name].unit), meaning=EXACT)
                for name, v in zip(names, values) if v is not None]

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
                    proposal=self.proposal_kind, n_scored=n,
                    n_selection=len(self.samples["select"]),
                    grid=None if grid is None else grid._asdict(),
                    world_size=self.trainer.world_size, rows=self.exact_rows() + self.rows,
                    wall_time_s=wall_time_s)


# --- The table as rows, text and files ---
def table_row(model, estimate, nll, d, span=None, stderr=None, unit="nats"):
    """A row of the table from per-sample values and integration stderrs (docs/evaluation.md)."""
    proposal = None
    if isinstance(span, LogisticProposal):
        proposal = {"kind": "logistic", "loc": span.loc, "scale": span.scale, "clip": span.clip}
        if isinstance(span, FittedProposal):
            proposal.update(kind="fitted", mix=span.mix, moved=round(span.moved(), 4))
        span = span.range
    nll = t.as_tensor(nll).double()
    mean = nll.mean().item()
    spread = utils.stderr_from_sums(nll.sum(), nll.pow(2).sum(), len(nll)).item()
    integration = None if stderr is None else (
        t.as_tensor(stderr).double().pow(2).mean().sqrt().item())
    bpd = [utils.nats_to_bpd(v, d) if unit == "nats" else None for v in (mean, spread)]
    values = dict(nats=None, nats_stderr=None, value=mean, value_stderr=spread) if (
        unit == "fraction") else dict(nats=mean, nats_stderr=spread)
    return dict(model=model, estimate=estimate, **values, bpd=bpd[0], bpd_stderr=bpd[1],
                integration_nats=integration, proposal=proposal,
                logsnr_range=None if span is None else [round(v, 3) for v in span], unit=unit)


def format_results(rows, header):
    """The table as text: a line per row, then what each estimate means."""
    lines = [header, f"{'model':<24} {'estimate':<26} {'nats':>12} {'+-':>9} {'bits/dim':>9} "
                     f"{'+-':>7}  {'log SNR':<13} {'integration':>11} {'evaluations':>11}  "
                     "proposal"]
    for r in rows:
        span = "" if r["logsnr_range"] is None else "[{:.1f}, {:.1f}]".format(*r["logsnr_range"])
        spent = f"{r['evaluations']:.0f}" if "evaluations" in r else ""
        noise = "" if not r.get("integration_nats") else f"{r['integration_nats']:.4f}"
        key = "value" if r["nats"] is None else "nats"  # a fraction's row: no nats
        bpd = "" if r["bpd"] is None else f"{r['bpd']:9.4f} {r['bpd_stderr']:7.4f}"
        lines.append(f"{r['model']:<24} {r['estimate']:<26} {r[key]:12.4f} "
                     f"{r[key + '_stderr']:9.4f} {bpd:>17}  {span:<13} {noise:>11} {spent:>11}  "
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


def per_sample_csv(ev, files):
    """The CSV text of every scored sample's values per model and row (docs/evaluation.md)."""
    columns = {"index": ev.scored_index.tolist()}
    if ev.labels is not None:
        columns["label"] = ev.labels.tolist()
    if files is not None:
        columns["file"] = [files[i] for i in ev.scored_index]
    for (model, estimate), (values, stderr) in ev.per_sample.items():
        unit, name = ROWS[estimate].unit, f"{model}: {estimate}"
        if unit == "fraction":
            columns[name] = values.tolist()
            continue
        columns[f"{name} (nats)"] = values.tolist()
        columns[f"{name} (integration stderr, nats)"] = stderr.tolist()
        if unit == "nats":
            columns[f"{name} (bits/dim)"] = utils.nats_to_bpd(values, ev.d).tolist()
    table = io.StringIO(newline="")
    csv.writer(table).writerows([list(columns), *sorted(zip(*columns.values()))])
    return table.getvalue()


def results_path(path=None, ckpt=None, name=None, folder=None):
    """`path`, or eval-<ckpt's name>.json next to it, or eval-<name>.json in `folder`; unique."""
    if path is None and ckpt is not None:
        stem = os.path.splitext(os.path.basename(ckpt))[0]
        path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"eval-{stem}.json")
    elif path is None:
        path = os.path.join(folder or ".", f"eval-{name.replace('/', '-').replace(' ', '_')}.json")
    root, ext = os.path.splitext(path)
    numbered = (f"{root}-{k}{ext}" for k in itertools.count(2))
    return next(p for p in itertools.chain([path], numbered) if not os.path.exists(p))


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
