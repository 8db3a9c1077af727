"""The command line both scripts share: flags, per-dataset defaults, their checks and --resume,
and `UserError`, the mistakes a user can fix.

Only the standard library is imported here, so a script can parse its arguments before torch
and Lightning load (cli.answer_early): --help and argument mistakes answer at once.
"""
import argparse
import os
import re
import sys

HALF_TRUE = ("16-true", "bf16-true", "16", "bf16", "half")
# With --resume, flags not given take the checkpoint's values, except these, which belong to
# the invocation; the given ones may differ from the checkpoint's only if they are in
# RESUME_MAY_CHANGE or among the script's own (build_parser's may_change).
PER_INVOCATION = {"resume", "accelerator", "devices", "strategy", "num_nodes", "precision",
                  "num_workers", "num_threads", "offline", "data_dir", "log_dir", "eval_only",
                  "ckpt", "results", "npoints", "select_fraction", "eval_proposal"}
RESUME_MAY_CHANGE = PER_INVOCATION | {"num_epochs", "eval_batch_size", "val_every", "num_samples",
                                      "sample_steps", "ode", "ode_trace", "ode_probes", "ode_tol"}


class UserError(RuntimeError):
    """A problem the user can fix (missing data, weights or files): experiment.run_cli prints it
    as one line, without a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help does not already say the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def str2bool(value):
    """argparse type for booleans that parse: 'False', 'no', '0' are false."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def positive(kind):
    """argparse type: a number of the given kind (int: a whole number) that must be > 0."""
    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not number > 0:
            raise argparse.ArgumentTypeError(
                f"must be a {'whole number' if kind is int else 'number'} > 0, got {value}")
        return number
    return parse


def whole(low=None, high=None):
    """argparse type: a whole number in [low, high) (either end may be open)."""
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or (low is not None and number < low) or (high is not None
                                                                    and number >= high):
            limits = " and ".join(([f">= {low}"] if low is not None else [])
                                  + ([f"< {high}"] if high is not None else []))
            raise argparse.ArgumentTypeError(f"must be a whole number{' ' + limits if limits else ''}"
                                             f", got {value}")
        return number
    return parse


def run_name(value):
    """argparse type: one folder name under --log_dir (no separators, not '.' or '..')."""
    if not value or value in (".", "..") or "/" in value or os.sep in value or (
            os.altsep and os.altsep in value) or "\0" in value:
        raise argparse.ArgumentTypeError(f"must be one folder name (no '/', not empty, '.' or "
                                         f"'..'), got {value!r}")
    return value


def per_dataset(defaults, key, text=""):
    """Help text naming a flag's per-dataset defaults."""
    return (text + "; " if text else "") + "default: " + ", ".join(
        f"{name} {values[key]:g}" if isinstance(values[key], float) else f"{name} {values[key]}"
        for name, values in defaults.items())


def build_parser(description, defaults, may_change=()):
    """A parser with the flags both scripts share; `defaults` maps each dataset (the choices of
    --dataset, the first the default) to the values of the flags left at None (apply_defaults);
    may_change: the script's own flags a resumed run may change."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    p.may_change = RESUME_MAY_CHANGE | set(may_change)
    # "-1e-3" is a (bad) value, not an unknown option: argparse only knows plain negative numbers
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    p.add_argument("--dataset", default=None, choices=list(defaults),
                   help=f"default: {list(defaults)[0]}, or with --eval_only the checkpoint's")
    group = p.add_argument_group("log-SNR importance distribution (a truncated logistic; "
                                 "--fit_proposal mixes it with bins fitted to the model)")
    group.add_argument("--logsnr_loc", type=float, default=None,
                       help=per_dataset(defaults, "logsnr_loc", "its location; the run's summary "
                                        "and MSE-curve figure suggest a value"))
    group.add_argument("--logsnr_scale", type=positive(float), default=None,
                       help=per_dataset(defaults, "logsnr_scale", "its scale"))
    group.add_argument("--clip", type=positive(float), default=4.,
                       help="the log-SNR integral covers loc +- clip * scale")
    group.add_argument("--fit_proposal", type=whole(0), default=None, metavar="N",
                       help=per_dataset(defaults, "fit_proposal", "refit the distribution to the "
                                        "model on N training samples 20 times during training (each "
                                        "epoch but the first in runs of up to 20 epochs) "
                                        "(a mixture of the logistic and bins that follow the "
                                        "integrand): lower-variance gradients and val_loss, "
                                        "unbiased either way; 0: keep the logistic"))
    group = p.add_argument_group("training")
    group.add_argument("--num_epochs", type=positive(int), default=None,
                       help=per_dataset(defaults, "num_epochs"))
    group.add_argument("--learning_rate", type=positive(float), default=None,
                       help=per_dataset(defaults, "learning_rate", "peak learning rate of Adam"))
    group.add_argument("--conditional", type=str2bool, nargs="?", const=True, default=False,
                       help="a model of p(x | y) for the data's labels, whose denoiser also gives "
                            "p(x) without a label: conditional likelihoods, pointwise mutual "
                            "information i(x; y) and classification")
    group.add_argument("--label_dropout", type=float, default=0.1,
                       help="--conditional: the share of training samples whose label is dropped "
                            "(p(x)'s training signal)")
    group = p.add_argument_group("validation and figures")
    group.add_argument("--eval_batch_size", type=positive(int), default=None,
                       help=per_dataset(defaults, "eval_batch_size", "samples per evaluation batch"))
    group.add_argument("--val_npoints", type=positive(int), default=None,
                       help=per_dataset(defaults, "val_npoints", "(log SNR, noise) points per "
                                        "validation sample (a power of two)"))
    group.add_argument("--val_every", type=positive(int), default=None,
                       help="validate every this many epochs, and after the last one "
                            "(default: num_epochs // 10)")
    group.add_argument("--num_samples", type=whole(0), default=None,
                       help=per_dataset(defaults, "num_samples", "model samples drawn for the "
                                        "figures (0: none)"))
    group.add_argument("--sample_steps", type=positive(int), default=100,
                       help="steps of the deterministic sampler")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help=f"continue a run from its checkpoint (e.g. exps/{list(defaults)[0]}-"
                            "base/checkpoints/last.ckpt) in its folder, with its dataset and "
                            "settings; of those only " + ", ".join(
                                f"--{k}" for k in sorted(p.may_change - PER_INVOCATION))
                            + " may be changed (a one-cycle schedule keeps its planned length)")
    group = p.add_argument_group("output")
    group.add_argument("--log_dir", default="exps",
                       help="runs go to log_dir/<dataset>-<experiment_name>[-2, -3, ...]")
    group.add_argument("--experiment_name", type=run_name, default="base",
                       help="the run's name: one folder name")
    group = p.add_argument_group("trainer (PyTorch Lightning)")
    group.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto")
    group.add_argument("--devices", default="auto",
                       help="number of devices, a list like 0,1, or auto")
    group.add_argument("--strategy", default="auto", help="e.g. ddp")
    group.add_argument("--num_nodes", type=positive(int), default=1, help="machines for multi-node DDP")
    group.add_argument("--precision", default="32-true",
                       help="32-true, 64-true, bf16-mixed or 16-mixed (losses stay float32)")
    group.add_argument("--seed", type=whole(0, 2 ** 32), default=0,
                       help="seeds data splits, init and noise")
    group = p.add_argument_group("evaluation of trained checkpoints (instead of training)")
    group.add_argument("--eval_only", action="store_true",
                       help="evaluate --ckpt on the validation data: a table of E[-log p] (nats, "
                            "bits/dim, standard errors), printed and written as JSON")
    group.add_argument("--ckpt", nargs="+", default=None, metavar="PATH",
                       help="checkpoint(s) written by this script; with several, their ensemble "
                            "(with the data-matched Gaussian) is scored too")
    group.add_argument("--npoints", type=positive(int), default=128,
                       help="(log SNR, noise) points per sample and estimate: 4 independent "
                            "randomised Sobol sets of npoints / 4 (a power of 2, >= 8)")
    group.add_argument("--select_fraction", type=float, default=0.5,
                       help="part of the validation data held out to choose, per log SNR, between "
                            "ensemble members and rounded variants; every row is scored on the rest")
    group.add_argument("--eval_proposal", default="fitted", choices=("fitted", "logistic"),
                       help="the log-SNR importance distribution of every row: fitted to the row "
                            "on the selection samples' errors (no extra evaluations), or the "
                            "checkpoint's own")
    group.add_argument("--vb_steps", type=whole(0), default=100,
                       help="grid data: timesteps per sample of the variational-bound rows (an "
                            "unbiased subsample of the schedule's T; 0: all T)")
    group.add_argument("--ode", type=str2bool, nargs="?", const=True, default=None,
                       help=per_dataset(defaults, "ode", "also the likelihood of the probability-flow "
                                        "ODE (the `ode` rows; for grid data also dequantized)"))
    group.add_argument("--ode_trace", default="auto", choices=("auto", "exact", "hutchinson"),
                       help="the ODE's divergence: exact (one vector-Jacobian product per "
                            "dimension), Hutchinson's estimate, or auto: exact up to 16 dimensions")
    group.add_argument("--ode_probes", type=positive(int), default=1,
                       help="Rademacher probes of Hutchinson's estimate")
    group.add_argument("--ode_tol", type=positive(float), default=1e-5,
                       help="the ODE solver's relative and absolute tolerance")
    group.add_argument("--results", default=None, metavar="JSON",
                       help="where the table goes (default: eval-<checkpoint name>.json next to the "
                            "first checkpoint; an existing file is never overwritten: -2, -3, ...)")
    return p


def parse(parser, argv, defaults, checkpoint_args=None, without_ckpt=False, older=None):
    """The parsed arguments: with --resume the checkpoint's (a flag given here that contradicts
    it is an error naming both values; `older` gives the values of flags a checkpoint predates),
    then the dataset's defaults for flags left at None.

    checkpoint_args(path) -> the run arguments a checkpoint was trained with; without it (the
    early pass, before the heavy imports) a --resume command returns None: its settings are
    checked once the checkpoint can be read.
    """
    args = parser.parse_args(argv)
    if args.eval_only and args.resume:
        parser.error("argument --resume: not used with --eval_only (give the checkpoint to --ckpt)")
    if args.resume:
        if checkpoint_args is None:
            return None
        given = {a.dest for a in parser._actions for opt in a.option_strings
                 for word in (sys.argv[1:] if argv is None else argv)
                 if word == opt or word.startswith(opt + "=")}
        saved = dict(older or {}, **checkpoint_args(args.resume))
        for key, value in saved.items():
            if key not in vars(args):
                continue
            if key in given and key not in parser.may_change and getattr(args, key) != value:
                parser.error(f"argument --{key}: {getattr(args, key)} contradicts the checkpoint's "
                             f"--{key} {value} (--resume continues a run with its settings)")
            if (key == "num_epochs" and key in given and getattr(args, key) > value
                    and saved.get("lr_schedule", "onecycle") == "onecycle"):
                parser.error(f"argument --num_epochs: {getattr(args, key)} is longer than the "
                             f"{value} epochs the resumed run's one-cycle schedule was planned for")
            if key not in given and key not in PER_INVOCATION:
                setattr(args, key, value)
    return apply_defaults(parser, args, defaults, without_ckpt)


def answer_early(name, parse_args):
    """In a script run as __main__ (`name`), parse the command line with parse_args() before the
    heavy imports that follow: --help and argument mistakes answer in a fraction of a second."""
    if name == "__main__":
        parse_args()


def check_fits(parser, flag, value, nbytes):
    """parser.error unless `nbytes` (what a flag's value would hold in memory) fits in half of
    this machine's memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > memory / 2:
        parser.error(f"argument {flag}: {value} needs about {nbytes / 2 ** 30:.0f} GiB of memory; "
                     f"this machine has {memory / 2 ** 30:.0f} GiB")


def apply_defaults(parser, args, defaults, without_ckpt=False):
    """Fills the flags left at None from the dataset's defaults and checks the shared flags.
    without_ckpt: --eval_only may go without --ckpt (a pretrained model evaluated as it is)."""
    if args.precision in HALF_TRUE:
        parser.error(f"argument --precision: {args.precision} would cast the Gaussian reference "
                     "and the losses to half precision (off by nats); use bf16-mixed or 16-mixed")
    if args.eval_only:
        if not args.ckpt and not without_ckpt:
            parser.error("--eval_only needs --ckpt PATH [PATH ...]")
        if args.npoints < 8 or args.npoints & (args.npoints - 1):
            parser.error(f"argument --npoints: must be a power of 2 >= 8, got {args.npoints}")
        if args.vb_steps == 1:
            parser.error("argument --vb_steps: 0 (all of the schedule's timesteps) or at least 2, "
                         "got 1")
        if not 0 < args.select_fraction < 1:
            parser.error(f"argument --select_fraction: must be in (0, 1), got {args.select_fraction}")
        if args.ckpt:
            return args  # everything else comes from the checkpoints
    elif args.ckpt:
        parser.error("argument --ckpt: only used with --eval_only")
    args.dataset = args.dataset or list(defaults)[0]
    for key, value in defaults[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.val_every is None:
        args.val_every = max(1, args.num_epochs // 10)
    if not 0 < args.label_dropout < 1:  # 0 would leave p(x), and with it i(x; y), untrained
        parser.error(f"argument --label_dropout: must be in (0, 1): the share of samples that "
                     f"train p(x) without a label; got {args.label_dropout}")
    if args.fit_proposal and not 8 <= args.fit_proposal:
        parser.error(f"argument --fit_proposal: needs at least 8 samples (0: off), got "
                     f"{args.fit_proposal}")
    if args.val_npoints & (args.val_npoints - 1):
        parser.error(f"argument --val_npoints: must be a power of 2, got {args.val_npoints}")
    return args
