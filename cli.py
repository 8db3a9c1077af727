"""The scripts' shared command line: flags, per-dataset defaults, their checks, --resume, UserError.
Standard library only: --help and mistakes answer before torch loads. Flags' limits: docs/2d.md."""
import argparse
import math
import operator
import os
import re
import secrets
import sys
import time

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
LOGSNR_LIMIT = 36  # |log SNR| and clip: float64 tells sigmoid(a) from 1 only below 36.7
BOUNDS = ((">=", operator.ge), (">", operator.gt), ("<=", operator.le), ("<", operator.lt))


class UserError(RuntimeError):
    """A problem the user can fix: experiment.run_cli prints it as one line, no traceback."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line, `error: ...` (exit status 2)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help does not already say the default."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def str2bool(value):
    text = str(value).lower()  # a bool as well: True, False
    if text in ("1", "true", "yes", "y", "on", "0", "false", "no", "n", "off"):
        return text in ("1", "true", "yes", "y", "on")
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def number(kind=float, low=None, high=None, above=None, below=None):
    """argparse type: a finite `kind` (int: whole) with low <= v <= high, above < v < below."""
    bounds = [(op, test, b) for (op, test), b in zip(BOUNDS, (low, above, high, below))
              if b is not None]
    limits = " and ".join(f"{op} {b:g}" if isinstance(b, float) else f"{op} {b}"
                          for op, _, b in bounds)
    what = ("whole number" if kind is int else "finite number") + (" " + limits if limits else "")

    def parse(value):
        try:
            v = kind(value)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or not all(test(v, b) for _, test, b in bounds):
            raise argparse.ArgumentTypeError(f"must be a {what}, got {value}")
        return v
    return parse


def positive(kind):
    return number(kind, above=0)


def run_name(value):
    if value in ("", ".", "..") or any(c and c in value for c in ("/", os.sep, os.altsep, "\0")):
        raise argparse.ArgumentTypeError(f"must be one folder name (no '/', not empty, '.' or "
                                         f"'..'), got {value!r}")
    return value


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser(description, defaults, data_help, denoiser, threads=1):
    """A parser with the shared flags. defaults: {dataset (the first the default): the values of
    flags left at None}; data_help: what --data reads; denoiser: the script's own --denoiser."""
    p = Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)
    p.architecture = denoiser
    # "-1e-3" is a (bad) value, not an unknown option: argparse only knows plain negative numbers
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    arg = p.add_argument_group("data").add_argument
    arg("--dataset", choices=list(defaults),
        help=f"default: {list(defaults)[0]}, or with --eval_only the checkpoint's")
    arg("--data", metavar="PATH", help=f"your own data instead of a dataset: {data_help}")
    arg = p.add_argument_group(
        "log-SNR importance distribution (a truncated logistic)").add_argument
    arg("--logsnr_loc", type=number(float, -LOGSNR_LIMIT, LOGSNR_LIMIT),
        help="its location; the run's summary suggests one")
    arg("--logsnr_scale", type=positive(float), help="its scale")
    arg("--clip", type=number(float, above=0, high=LOGSNR_LIMIT), default=4.,
        help="the integral covers loc +- clip * scale, within +-36")
    arg("--fit_proposal", type=number(int, 0), metavar="N", help="refit it to the model on N >= 8 "
        "training samples 5 times during training (0: keep the logistic)")
    arg = p.add_argument_group("the denoiser").add_argument
    arg("--denoiser", default=denoiser, metavar="NAME|module:Class", help="this script's network, "
        "or an importable nn.Module class with forward(z, logsnr[, y]) returning z's shape")
    arg("--denoiser_args", default="{}", metavar="JSON",
        help="keyword arguments of a module:Class denoiser, as a JSON object")
    arg = p.add_argument_group("training").add_argument
    arg("--num_epochs", type=positive(int))
    arg("--max_steps", type=number(int, -1),
        help="stop after this many steps (default -1: no limit)")
    arg("--batch_size", type=positive(int), help="samples per step")
    arg("--learning_rate", type=number(float, above=0, high=10), help="Adam's peak learning rate")
    arg("--lr_schedule", choices=("constant", "onecycle"))
    arg("--conditional", type=str2bool, nargs="?", const=True, default=False,
        help="model p(x | y) for the data's labels, and p(x) (docs/conditional.md)")
    arg("--label_dropout", type=number(float, above=0, below=1), default=0.1,
        help="--conditional: the share of training samples without their label")
    arg("--num_threads", type=number(int, 1), default=threads,
        help="PyTorch CPU threads per process")
    arg = p.add_argument_group("validation and figures").add_argument
    arg("--eval_batch_size", type=positive(int), help="samples per evaluation batch")
    arg("--val_npoints", type=positive(int),
        help="(log SNR, noise) points per validation sample, a power of 2")
    arg("--val_every", type=positive(int),
        help="validate every this many epochs and after the last")
    arg("--num_samples", type=number(int, 0), help="model samples drawn for the figures (0: none)")
    arg("--sample_steps", type=positive(int), default=100,
        help="steps of the deterministic sampler")
    arg("--resume", metavar="CKPT",
        help=f"continue a run from its checkpoint (e.g. exps/{list(defaults)[0]}-base/checkpoints/"
             "last.ckpt) with its data and settings; only {may_change} may change (a one-cycle "
             "schedule keeps its length)")
    arg = p.add_argument_group("output").add_argument
    arg("--log_dir", default="exps",
        help="runs go to log_dir/<dataset>-<experiment_name>[-2, -3, ...]")
    arg("--experiment_name", type=run_name, default="base", help="one folder name")
    arg = p.add_argument_group("trainer (PyTorch Lightning)").add_argument
    arg("--accelerator", default="auto", help="cpu, gpu, mps or auto")
    arg("--devices", default="auto", help="a number, a list like 0,1, or auto")
    arg("--strategy", default="auto", help="e.g. ddp")
    arg("--num_nodes", type=positive(int), default=1, help="machines for multi-node DDP")
    arg("--precision", default="32-true",
        help="32-true, 64-true, bf16-mixed or 16-mixed (losses stay float32)")
    arg("--seed", type=number(int, 0, 2 ** 32 - 1), default=0,
        help="seeds data splits, init and noise")
    arg = p.add_argument_group("evaluation instead of training (docs/evaluation.md)").add_argument
    arg("--eval_only", action="store_true",
        help="evaluate --ckpt on the validation data (or every sample of --data): E[-log p] in "
             "nats and bits/dim, printed and written as JSON")
    arg("--ckpt", nargs="+", metavar="PATH",
        help="checkpoint(s) of this script; with several, their ensemble too")
    arg("--per_sample", metavar="CSV",
        help="also write every scored sample's values to this CSV file")
    arg("--eval_samples", type=positive(int), metavar="N", help="score only the first N samples")
    arg("--npoints", type=positive(int), default=128,
        help="(log SNR, noise) points per sample and estimate, a power of 2 >= 8")
    arg("--select_fraction", type=number(float, above=0, below=1), default=0.5,
        help="share of the validation data that chooses ensemble members")
    arg("--eval_proposal", default="fitted", choices=("fitted", "logistic"),
        help="every row's log-SNR distribution: fitted to it, or the checkpoint's")
    arg("--vb_steps", type=number(int, 0, 999), default=100,
        help="grid data: variational-bound timesteps per sample (of 1000; 0: all)")
    arg("--ode", type=str2bool, nargs="?", const=True,
        help="also the probability-flow ODE's likelihood")
    arg("--ode_trace", default="auto", choices=("auto", "exact", "hutchinson"),
        help="the ODE's divergence (auto: exact up to 16 dimensions)")
    arg("--ode_probes", type=positive(int), default=1,
        help="Rademacher probes of Hutchinson's estimate")
    arg("--ode_tol", type=number(float, above=0, below=1), default=1e-5,
        help="the ODE solver's relative and absolute tolerance (2-D contours: at least 1e-4)")
    arg("--results", metavar="JSON", help="where the table goes (default: eval-<checkpoint>.json "
        "beside the first checkpoint; never overwritten: -2, -3, ...)")
    return p


def parse(parser, argv, defaults, data_defaults, checkpoint_args=None, without_ckpt=False):
    """The checked arguments: --resume's checkpoint's (checkpoint_args: path -> its run arguments;
    without it, None), then the dataset's (data_defaults: --data's) for flags left at None;
    without_ckpt: --eval_only may go without --ckpt (a pretrained model evaluated as it is)."""
    known = {a.dest for a in parser._actions}
    for action in parser._actions:  # help: per-dataset defaults; --resume's own flags
        shown = [f"{name} {v[action.dest]:g}" if isinstance(v[action.dest], float) else
                 f"{name} {v[action.dest]}" for name, v in defaults.items() if action.dest in v]
        if action.dest == "resume":
            action.help = action.help.replace("{may_change}", ", ".join(
                f"--{k}" for k in sorted(RESUME_MAY_CHANGE - PER_INVOCATION) if k in known))
        elif action.default is None and "default" not in (action.help or "") and shown:
            action.help = "; ".join(filter(None, [action.help, "default: " + ", ".join(shown)]))
    args = parser.parse_args(argv)
    if args.eval_only and args.resume:
        parser.error("argument --resume: not used with --eval_only (give the checkpoint to --ckpt)")
    if args.resume:
        if checkpoint_args is None:
            return None
        saved = {k: v for k, v in checkpoint_args(args.resume).items()
                 if k in vars(args) and k not in PER_INVOCATION}
        parser.set_defaults(**saved)  # the flags not given: the checkpoint's
        args = parser.parse_args(argv)
        for key, value in saved.items():
            if key not in RESUME_MAY_CHANGE and getattr(args, key) != value:
                parser.error(f"argument --{key}: {getattr(args, key)} contradicts the checkpoint's "
                             f"--{key} {value} (--resume continues a run with its settings)")
            if (key == "num_epochs" and args.num_epochs > value
                    and saved.get("lr_schedule", "onecycle") == "onecycle"):
                parser.error(f"argument --num_epochs: {args.num_epochs} is longer than the "
                             f"{value} epochs the resumed run's one-cycle schedule was planned for")
    if args.precision in ("16-true", "bf16-true", "16", "bf16", "half"):
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
        check(parser, args, [
            ("npoints", lambda v: v < 8 or v & (v - 1), "must be a power of 2 >= 8"),
            ("vb_steps", lambda v: v == 1, "0 (all of the schedule's timesteps) or at least 2")])
        if args.ckpt:
            return args  # everything else comes from the checkpoints
    elif args.ckpt:
        parser.error("argument --ckpt: only used with --eval_only")
    if args.data is None:
        args.dataset = args.dataset or list(defaults)[0]
    values = data_defaults if args.data else defaults[args.dataset]
    vars(args).update({k: v for k, v in values.items() if getattr(args, k, None) is None})
    check(parser, args, [
        ("fit_proposal", lambda v: v and v < 8, "needs at least 8 samples (0: off)"),
        ("val_npoints", lambda v: v & (v - 1), "must be a power of 2"),
        ("val_npoints", lambda v: args.conditional and v < 4,
         "--conditional needs at least 4 (the label pass's 4 replicates)"),
        ("max_steps", lambda v: v == 0, "-1 (no limit) or >= 1")])
    # the per-point index and uniform arrays of validation's estimator: 0.6 KB (measured)
    check_fits(parser, "--val_npoints", f"{args.val_npoints} (x --eval_batch_size "
               f"{args.eval_batch_size})", 600 * args.val_npoints * args.eval_batch_size)
    lo, hi = logsnr_range(args)
    if not -LOGSNR_LIMIT <= lo < hi <= LOGSNR_LIMIT:
        parser.error(f"argument --clip: the log-SNR range loc -+ clip * scale = [{lo:g}, {hi:g}] "
                     f"({range_flags(args)}) must lie within [-36, 36] (float64 tells sigmoid(a) "
                     "from 1 only for a < 36.7)")
    return args


def answer_early(name, parse_args):
    """In a script run as __main__ (`name`), parse_args() before the heavy imports that follow."""
    global STARTED
    if name == "__main__":
        STARTED = time.time()  # the run's start-up is timed from here (callbacks.Timings)
        parse_args()


def check_fits(parser, flag, value, nbytes):
    """parser.error (UserError without a parser) unless nbytes fit in half of this machine's."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > memory / 2:
        message = (f"argument {flag}: {value} needs about {nbytes / 2 ** 30:.1f} GiB of memory; "
                   f"this machine has {memory / 2 ** 30:.1f} GiB")
        if parser is None:
            raise UserError(message)
        parser.error(message)


def check(parser, args, checks):
    """parser.error for the first (flag, refused(value), what it must be) that refuses a value."""
    for flag, refused, text in checks:
        if refused(value := getattr(args, flag)):
            parser.error(f"argument --{flag}: {text}, got {value}")


def logsnr_range(args):
    return (args.logsnr_loc - args.clip * args.logsnr_scale,
            args.logsnr_loc + args.clip * args.logsnr_scale)


def range_flags(args):
    return (f"--logsnr_loc {args.logsnr_loc:g} --logsnr_scale {args.logsnr_scale:g} "
            f"--clip {args.clip:g}")


def write_file(path, content):
    """Writes content (str, bytes, or a function writing to a binary file) to path through a
    temporary file in its folder, then renames it: never half-written. An OSError names path."""
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
    """Whether `url` answers an HTTP HEAD request (any status) within `timeout` seconds."""
    import threading
    from urllib import error, request
    answered = []

    def probe():
        try:
            request.urlopen(request.Request(url, method="HEAD"), timeout=timeout).close()
        except (OSError, ValueError) as err:  # an HTTPError is an answer (any status)
            if not isinstance(err, error.HTTPError):
                return
        answered.append(True)
    thread = threading.Thread(target=probe, daemon=True)  # bounds slow name lookups too
    thread.start()
    thread.join(timeout)
    return bool(answered)
