"""The command line both scripts share: flags, per-dataset defaults, their checks and --resume,
and `UserError`, the mistakes a user can fix. Standard library only, so a script parses its
arguments before torch and Lightning load (answer_early): --help and mistakes answer at once.
"""
import argparse
import math
import os
import re
import secrets
import sys
import time

HALF_TRUE = ("16-true", "bf16-true", "16", "bf16", "half")
STARTED = None  # when a script started, before its imports (answer_early)
# With --resume, flags not given take the checkpoint's values, except these, which belong to
# the invocation; given ones may differ from the checkpoint's only if in RESUME_MAY_CHANGE.
PER_INVOCATION = {"resume", "accelerator", "devices", "strategy", "num_nodes", "precision",
                  "num_workers", "num_threads", "offline", "data_dir", "log_dir", "eval_only",
                  "ckpt", "results", "npoints", "select_fraction", "eval_proposal", "per_sample",
                  "eval_samples"}
RESUME_MAY_CHANGE = PER_INVOCATION | {"num_epochs", "eval_batch_size", "val_every", "num_samples",
                                      "sample_steps", "ode", "ode_trace", "ode_probes", "ode_tol",
                                      "max_steps", "grid_size", "curve_samples"}


LOGSNR_LIMIT = 36  # |log SNR| and clip: float64 tells s(a) = 1 / (1 + e^-a) from 1 only below
# a = ln 2^53 = 36.7 (the logistic's truncation points, every schedule's alpha_bar)


class UserError(RuntimeError):
    """A problem the user can fix: experiment.run_cli prints it as one line, no traceback."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line, `error: ...` (exit status 2); --help as
    argparse's."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


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


def number(kind=float, low=None, high=None, above=None, below=None):
    """argparse type: a finite number of `kind` (int: a whole number) with low <= v <= high and
    above < v < below (each end optional)."""
    bounds = [(op, v) for op, v in ((">=", low), (">", above), ("<=", high), ("<", below))
              if v is not None]
    checks = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b,
              "<": lambda v, b: v < b}

    def parse(value):
        try:
            v = kind(value)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not all(checks[op](v, b) for op, b in bounds):
            limits = " and ".join(f"{op} {b:g}" if isinstance(b, float) else f"{op} {b}"
                                  for op, b in bounds)
            what = "whole number" if kind is int else "finite number"
            raise argparse.ArgumentTypeError(
                f"must be a {what}{' ' + limits if limits else ''}, got {value}")
        return v
    return parse


def positive(kind):
    """argparse type: a finite number of the given kind that must be > 0."""
    return number(kind, above=0)


def whole(low=None, high=None):
    """argparse type: a whole number in [low, high)."""
    return number(int, low, None if high is None else high - 1)


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
        for name, values in defaults.items() if key in values)


def available_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser(description, defaults, data_help, denoiser, threads=1):
    """A parser with the flags both scripts share. `defaults` maps each dataset (the choices of
    --dataset, the first the default) to its values of the flags left at None (apply_defaults);
    data_help: what --data reads; denoiser: the default --denoiser; threads: --num_threads'."""
    p = Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    p.may_change, p.architecture = RESUME_MAY_CHANGE, denoiser
    # "-1e-3" is a (bad) value, not an unknown option: argparse only knows plain negative numbers
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    group = p.add_argument_group("data")
    group.add_argument("--dataset", default=None, choices=list(defaults),
                       help=f"default: {list(defaults)[0]}, or with --eval_only the checkpoint's")
    group.add_argument("--data", default=None, metavar="PATH",
                       help=f"your own data instead of a dataset: {data_help}; split like a "
                            "dataset when training; with --eval_only --ckpt, every sample is scored")
    group = p.add_argument_group("log-SNR importance distribution (a truncated logistic; "
                                 "--fit_proposal mixes it with bins fitted to the model)")
    group.add_argument("--logsnr_loc", type=number(float, -LOGSNR_LIMIT, LOGSNR_LIMIT), default=None,
                       help=per_dataset(defaults, "logsnr_loc", "its location; the run's summary "
                                        "and MSE-curve figure suggest a value"))
    group.add_argument("--logsnr_scale", type=positive(float), default=None,
                       help=per_dataset(defaults, "logsnr_scale", "its scale"))
    group.add_argument("--clip", type=number(float, above=0, high=LOGSNR_LIMIT), default=4.,
                       help="the log-SNR integral covers loc +- clip * scale, within +-36 (float64 "
                            "tells sigmoid(a) from 1 only for a < ln 2^53 = 36.7)")
    group.add_argument("--fit_proposal", type=whole(0), default=None, metavar="N",
                       help=per_dataset(defaults, "fit_proposal", "refit the distribution to the "
                                        "model on N >= 8 training samples 5 times during "
                                        "training: lower-variance gradients and val_loss, "
                                        "unbiased either way; 0: keep the logistic"))
    group = p.add_argument_group("the denoiser")
    group.add_argument("--denoiser", default=denoiser, metavar="NAME|module:Class",
                       help="the network: this script's own, or any importable nn.Module class "
                            "with forward(z, logsnr[, y]) returning z's shape")
    group.add_argument("--denoiser_args", default="{}", metavar="JSON",
                       help="keyword arguments of a --denoiser module:Class, as a JSON object")
    group = p.add_argument_group("training")
    group.add_argument("--num_epochs", type=positive(int), default=None,
                       help=per_dataset(defaults, "num_epochs"))
    group.add_argument("--max_steps", type=whole(-1), default=None,
                       help="stop after this many steps (-1: no limit)")
    group.add_argument("--batch_size", type=positive(int), default=None,
                       help=per_dataset(defaults, "batch_size", "training samples per step"))
    group.add_argument("--learning_rate", type=number(float, above=0, high=10), default=None,
                       help=per_dataset(defaults, "learning_rate", "peak learning rate of Adam"))
    group.add_argument("--lr_schedule", default=None, choices=("constant", "onecycle"),
                       help=per_dataset(defaults, "lr_schedule", "Adam with a constant or a "
                                        "one-cycle learning rate"))
    group.add_argument("--conditional", type=str2bool, nargs="?", const=True, default=False,
                       help="a model of p(x | y) for the data's labels, whose denoiser also gives "
                            "p(x) without a label: conditional likelihoods, pointwise mutual "
                            "information i(x; y) and classification")
    group.add_argument("--label_dropout", type=number(float, above=0, below=1), default=0.1,
                       help="--conditional: the share of training samples whose label is dropped "
                            "(p(x)'s training signal)")
    group.add_argument("--num_threads", type=whole(1), default=threads,
                       help="PyTorch CPU threads per process")
    group = p.add_argument_group("validation and figures")
    group.add_argument("--eval_batch_size", type=positive(int), default=None,
                       help=per_dataset(defaults, "eval_batch_size", "samples per evaluation batch"))
    group.add_argument("--val_npoints", type=positive(int), default=None,
                       help=per_dataset(defaults, "val_npoints", "(log SNR, noise) points per "
                                        "validation sample (a power of two)"))
    group.add_argument("--val_every", type=positive(int), default=None,
                       help=per_dataset(defaults, "val_every", "validate every this many epochs, "
                                        "and after the last one"))
    group.add_argument("--num_samples", type=whole(0), default=None,
                       help=per_dataset(defaults, "num_samples", "model samples drawn for the "
                                        "figures (0: none)"))
    group.add_argument("--sample_steps", type=positive(int), default=100,
                       help="steps of the deterministic sampler")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help=f"continue a run from its checkpoint (e.g. exps/{list(defaults)[0]}-"
                            "base/checkpoints/last.ckpt) in its folder, with its data and "
                            "settings; of those only {may_change} may be changed (a "
                            "one-cycle schedule keeps its planned length)")
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
                       help="evaluate --ckpt on the validation data (or every sample of --data): "
                            "a table of E[-log p] (nats, bits/dim, standard errors), printed and "
                            "written as JSON")
    group.add_argument("--ckpt", nargs="+", default=None, metavar="PATH",
                       help="checkpoint(s) written by this script; with several, their ensemble "
                            "(with the data-matched Gaussian) is scored too")
    group.add_argument("--per_sample", default=None, metavar="CSV",
                       help="also write every scored sample's values (each model and row, nats, "
                            "bits/dim and integration standard error) to this CSV file")
    group.add_argument("--eval_samples", type=positive(int), default=None, metavar="N",
                       help="score only the first N of the samples to score (the same for every "
                            "row and model)")
    group.add_argument("--npoints", type=positive(int), default=128,
                       help="(log SNR, noise) points per sample and estimate: 4 independent "
                            "randomised Sobol sets of npoints / 4 (a power of 2, >= 8)")
    group.add_argument("--select_fraction", type=number(float, above=0, below=1), default=0.5,
                       help="part of the validation data held out to choose, per log SNR, between "
                            "ensemble members and rounded variants; every row is scored on the rest")
    group.add_argument("--eval_proposal", default="fitted", choices=("fitted", "logistic"),
                       help="the log-SNR importance distribution of every row: fitted to the row "
                            "on the selection samples' errors (no extra evaluations), or the "
                            "checkpoint's own")
    group.add_argument("--vb_steps", type=number(int, 0, 999), default=100,
                       help="grid data: timesteps per sample of the variational-bound rows (an "
                            "unbiased subsample of the schedule's T = 1000 steps; 0: all T)")
    group.add_argument("--ode", type=str2bool, nargs="?", const=True, default=None,
                       help=per_dataset(defaults, "ode", "also the likelihood of the probability-flow "
                                        "ODE (the `ode` rows; for grid data also dequantized)"))
    group.add_argument("--ode_trace", default="auto", choices=("auto", "exact", "hutchinson"),
                       help="the ODE's divergence: exact (one vector-Jacobian product per "
                            "dimension), Hutchinson's estimate, or auto: exact up to 16 dimensions")
    group.add_argument("--ode_probes", type=positive(int), default=1,
                       help="Rademacher probes of Hutchinson's estimate")
    group.add_argument("--ode_tol", type=number(float, above=0, below=1), default=1e-5,
                       help="the ODE solver's relative and absolute tolerance")
    group.add_argument("--results", default=None, metavar="JSON",
                       help="where the table goes (default: eval-<checkpoint name>.json next to the "
                            "first checkpoint; an existing file is never overwritten: -2, -3, ...)")
    return p


def parse(parser, argv, defaults, data_defaults, checkpoint_args=None, without_ckpt=False):
    """The parsed arguments: with --resume the checkpoint's (a flag given here that contradicts
    it is an error naming both values), then the dataset's defaults (data_defaults for --data)
    for flags left at None. checkpoint_args(path) -> a checkpoint's run arguments; without it
    (the early pass, before the heavy imports) a --resume command returns None."""
    known = {a.dest for a in parser._actions}  # --resume's help names the script's own flags
    for action in parser._actions:
        if action.dest == "resume":
            action.help = action.help.replace("{may_change}", ", ".join(
                f"--{k}" for k in sorted(parser.may_change - PER_INVOCATION) if k in known))
    args = parser.parse_args(argv)
    if args.eval_only and args.resume:
        parser.error("argument --resume: not used with --eval_only (give the checkpoint to --ckpt)")
    if args.resume:
        if checkpoint_args is None:
            return None
        given = {a.dest for a in parser._actions for opt in a.option_strings
                 for word in (sys.argv[1:] if argv is None else argv)
                 if word == opt or word.startswith(opt + "=")}
        saved = checkpoint_args(args.resume)
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
    return apply_defaults(parser, args, defaults, data_defaults, without_ckpt)


def answer_early(name, parse_args):
    """In a script run as __main__ (`name`), parse the command line with parse_args() before the
    heavy imports that follow: --help and argument mistakes answer in a fraction of a second."""
    global STARTED
    if name == "__main__":
        STARTED = time.time()  # the run's start-up is timed from here (callbacks.Timings)
        parse_args()


def memory():
    """This machine's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(parser, flag, value, nbytes):
    """parser.error (a UserError without a parser) unless `nbytes` (what a flag's value would
    hold in memory) fits in half of this machine's memory."""
    if nbytes > memory() / 2:
        message = (f"argument {flag}: {value} needs about {nbytes / 2 ** 30:.1f} GiB of memory; "
                   f"this machine has {memory() / 2 ** 30:.1f} GiB")
        if parser is None:
            raise UserError(message)
        parser.error(message)


def apply_defaults(parser, args, defaults, data_defaults, without_ckpt=False):
    """Fills the flags left at None from the dataset's defaults and checks the shared flags.
    without_ckpt: --eval_only may go without --ckpt (a pretrained model evaluated as it is)."""
    if args.precision in HALF_TRUE:
        parser.error(f"argument --precision: {args.precision} would cast the Gaussian reference "
                     "and the losses to half precision (off by nats); use bf16-mixed or 16-mixed")
    if args.data is not None and args.dataset is not None and not args.resume:
        parser.error("argument --data: give --dataset or --data, not both")
    if args.per_sample and not args.eval_only:
        parser.error("argument --per_sample: only used with --eval_only")
    if ":" not in args.denoiser and args.denoiser != parser.architecture:
        parser.error(f"argument --denoiser: this script's network is {parser.architecture}; "
                     f"another is given as module:Class, got {args.denoiser}")
    if args.eval_only:
        if not args.ckpt and not without_ckpt:
            parser.error("--eval_only needs --ckpt PATH [PATH ...]")
        if args.npoints < 8 or args.npoints & (args.npoints - 1):
            parser.error(f"argument --npoints: must be a power of 2 >= 8, got {args.npoints}")
        if args.vb_steps == 1:
            parser.error("argument --vb_steps: 0 (all of the schedule's timesteps) or at least 2, "
                         "got 1")
        if args.ckpt:
            return args  # everything else comes from the checkpoints
    elif args.ckpt:
        parser.error("argument --ckpt: only used with --eval_only")
    if args.data is None:
        args.dataset = args.dataset or list(defaults)[0]
    for key, value in (data_defaults if args.data else defaults[args.dataset]).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.fit_proposal and not 8 <= args.fit_proposal:
        parser.error(f"argument --fit_proposal: needs at least 8 samples (0: off), got "
                     f"{args.fit_proposal}")
    if args.val_npoints & (args.val_npoints - 1):
        parser.error(f"argument --val_npoints: must be a power of 2, got {args.val_npoints}")
    if args.conditional and args.val_npoints < 4:
        parser.error(f"argument --val_npoints: --conditional needs at least 4 (the label pass's 4 "
                     f"replicates), got {args.val_npoints}")
    if args.max_steps == 0:
        parser.error("argument --max_steps: -1 (no limit) or >= 1, got 0")
    # the per-point index and uniform arrays of validation's estimator: 0.6 KB (measured)
    check_fits(parser, "--val_npoints", f"{args.val_npoints} (x --eval_batch_size "
               f"{args.eval_batch_size})", 600 * args.val_npoints * args.eval_batch_size)
    lo, hi = logsnr_range(args)
    if not -LOGSNR_LIMIT <= lo < hi <= LOGSNR_LIMIT:
        parser.error(f"argument --clip: the log-SNR range loc -+ clip * scale = [{lo:g}, {hi:g}] "
                     f"({range_flags(args)}) must lie within [-36, 36] (float64 tells sigmoid(a) "
                     "from 1 only for a < 36.7)")
    return args


def logsnr_range(args):
    """The log-SNR range of a run's flags, loc -+ clip * scale."""
    return (args.logsnr_loc - args.clip * args.logsnr_scale,
            args.logsnr_loc + args.clip * args.logsnr_scale)


def range_flags(args):
    return f"--logsnr_loc {args.logsnr_loc:g} --logsnr_scale {args.logsnr_scale:g} --clip {args.clip:g}"


def write_file(path, content):
    """Writes content (str, bytes, or a function writing to a binary file) to path through a
    temporary file in the same folder, then renames it: a file is never left half-written. An
    OSError names the path."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # open, not mkstemp: the file's mode follows the umask
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and err.filename != path:
            raise OSError(err.errno, err.strerror, path) from err
        raise


def reachable(url, timeout=3.0):
    """Whether `url` answers an HTTP HEAD request within `timeout` seconds (any status counts),
    through the proxies urllib is configured with: a quick test before a download."""
    import threading
    import urllib.error
    import urllib.request
    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except (OSError, ValueError):
            pass
    thread = threading.Thread(target=probe, daemon=True)  # bounds slow name lookups too
    thread.start()
    thread.join(timeout)
    return bool(answered)
