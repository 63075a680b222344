"""The `vqa2` command. Thin: parse options, call library functions, format results.

Heavy imports (torch, transformers, bitsandbytes, peft) happen inside commands, never at module
level, so `vqa2 --help` and `vqa2 --version` answer instantly.

Conventions every command follows (and new ones should too):
- stdout carries only data, written through `vqa2cli.output` writers; `@output_format_options`
  adds --json/--jsonl/--csv and passes `fmt` (a table on a terminal, JSON Lines otherwise);
- messages go to stderr through `output.Reporter`: one line per problem, no tracebacks;
- a command returns its exit code: 0 all good, 1 some inputs failed, EXIT_INTERRUPTED; errors that
  stop the command are raised (`SetupError` -> 2, other `Vqa2Error` -> 1, see `main`);
- SIGTERM and SIGHUP arrive as Ctrl-C does, as a KeyboardInterrupt (`errors.Stopped`): a command that
  catches it keeps what it finished, says so in one line (`_stop.note`) and returns EXIT_INTERRUPTED,
  which `main` turns into 128 + the signal number (130 SIGINT, 143 SIGTERM, 129 SIGHUP).
"""

import dataclasses
import functools
import os
import signal
import sys
import threading
import time
import types
import typing

import click

from vqa2cli import __version__
from vqa2cli.errors import STOP_SIGNALS, SetupError, Stopped, Vqa2Error
from vqa2cli.finetune.options import FinetuneOptions

EXIT_FAILED = 1  # some inputs failed
EXIT_INTERRUPTED = 130  # stopped by a signal; `main` exits with 128 + its number (130 is SIGINT's)


class _StopSignals:
    """While a command runs, SIGINT, SIGTERM and SIGHUP raise `Stopped` (a KeyboardInterrupt) in the
    main thread, so `kill`, `timeout`, `docker stop` and a closed terminal end a run the way Ctrl-C does.

    A second signal ends the process at once, by the signal's default action (a writer still finishes
    the record it is writing: `output.uninterrupted`), unless it follows the first within REPEAT_WINDOW:
    `timeout` signals its child and then the child's whole process group, so one stop can arrive twice.
    A signal the caller ignores (SIGHUP under `nohup`, SIGINT in a script's background job) stays ignored.
    """

    REPEAT_WINDOW = 0.5  # seconds

    def __init__(self):
        self.signum = None
        self._since = 0.0
        self._previous = {}

    def __enter__(self):
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._since = signum, now
            raise Stopped(signum)
        if now - self._since < self.REPEAT_WINDOW:
            return
        for number in self._previous:
            signal.signal(number, signal.SIG_DFL)
        signal.raise_signal(signum)

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def note(self, what: str = "") -> str:
        """The one line telling the user the run was stopped, and by which signal."""
        by = f" by {signal.Signals(self.signum).name}" if self.signum else ""
        return f"interrupted{by}: {what}" if what else f"interrupted{by}"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


_stop = _StopSignals()


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # a command with nothing to keep (ask's streamed answer): one line
            click.echo(_stop.note(), err=True)
            return EXIT_INTERRUPTED


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vqa2")
def cli():
    """Tell how good a video looks, and why, with the VQA² model.

    \b
    Examples:
      vqa2 score clip.mp4
      vqa2 score videos/ --recursive --json > scores.json
      find . -name '*.mov' | vqa2 score - --csv > scores.csv
      vqa2 score clip.mp4 --timeline --explain
      vqa2 compare source.mp4 encode-a.mp4 encode-b.mp4
      vqa2 ask clip.mp4 "Is there stuttering?"
      vqa2 models
    """


# --- options shared by commands ------------------------------------------------------------------


def sampling_options(func):
    """--max-motion-frames, --max-keyframes: how much of a long video the model sees (`load_video`)."""
    func = click.option(
        "--max-keyframes",
        type=click.IntRange(min=1),
        default=40,
        show_default=True,
        help="Most keyframes (one per second); longer videos keep this many, spread evenly. 40 keeps "
        "the input within the length the checkpoints were trained on.",
    )(func)
    return click.option(
        "--max-motion-frames",
        type=click.IntRange(min=4),
        default=2000,
        show_default=True,
        help="Longest motion stream; longer videos are sampled evenly down to it.",
    )(func)


def model_options(func):
    """--model, --device, --quant: what `pipeline.load_model` needs."""
    func = click.option(
        "--quant",
        type=click.Choice(["auto", "4bit", "8bit", "none"]),
        default="auto",
        show_default=True,
        help="Weight quantization (auto: 4-bit language model on CUDA, none on CPU).",
    )(func)
    func = click.option(
        "--device",
        type=click.Choice(["auto", "cuda", "cpu"]),
        default="auto",
        show_default=True,
        help="Where to run the model (auto: cuda when available).",
    )(func)
    func = click.option(
        "-m",
        "--model",
        "model_name",
        envvar="VQA2_MODEL",
        metavar="NAME|DIR|REPO",
        default=None,
        help="Model: a name from `vqa2 models`, a model directory or a Hugging Face repo id "
        "[env: VQA2_MODEL; default: the command's default model, downloaded on first use; vqa2-tiny is "
        "shipped with vqa2 and works offline].",
    )(func)
    return func


def output_format_options(func):
    """--json/--jsonl/--csv, mutually exclusive; the command receives `fmt` (None: pick by stdout)."""

    @functools.wraps(func)
    def wrapper(*args, as_json, as_jsonl, as_csv, **kwargs):
        chosen = [name for name, on in (("json", as_json), ("jsonl", as_jsonl), ("csv", as_csv)) if on]
        if len(chosen) > 1:
            raise click.UsageError(f"choose one output format, not {' and '.join('--' + c for c in chosen)}")
        return func(*args, fmt=chosen[0] if chosen else None, **kwargs)

    wrapper = click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")(wrapper)
    wrapper = click.option(
        "--jsonl", "as_jsonl", is_flag=True, help="One JSON object per line, written as each item finishes."
    )(wrapper)
    wrapper = click.option("--json", "as_json", is_flag=True, help="A single JSON array.")(wrapper)
    return wrapper


def ray_options(func):
    """--ray and its settings; the command receives `ray`: a dict of them, or None without --ray."""

    @functools.wraps(func)
    def wrapper(*args, use_ray, ray_address, ray_actors, ray_gpus, parquet, **kwargs):
        options = {"--ray-address": ray_address, "--ray-actors": ray_actors, "--ray-gpus-per-actor": ray_gpus,
                   "--parquet": parquet}
        if not use_ray:
            given = [option for option, value in options.items() if value is not None]
            if given:
                raise click.UsageError(f"{given[0]} needs --ray")
            return func(*args, ray=None, **kwargs)
        settings = {"address": ray_address, "actors": ray_actors or 1, "gpus_per_actor": ray_gpus, "parquet": parquet}
        return func(*args, ray=settings, **kwargs)

    wrapper = click.option("--parquet", metavar="DIR", type=click.Path(file_okay=False),
                           help="With --ray: also write the records as a Parquet dataset into DIR.")(wrapper)
    wrapper = click.option("--ray-gpus-per-actor", "ray_gpus", type=click.FloatRange(min=0), metavar="N",
                           help="GPUs per model actor [default: 1 on a cluster with GPUs, else 0].")(wrapper)
    wrapper = click.option("--ray-actors", type=click.IntRange(min=1), metavar="N",
                           help="Model actors (each holds the model once) [default: 1].")(wrapper)
    wrapper = click.option("--ray-address", metavar="ADDRESS",
                           help="Ray cluster to join [default: RAY_ADDRESS, else a new local cluster].")(wrapper)
    return click.option("--ray", "use_ray", is_flag=True,
                        help="Run as a Ray Data pipeline: decode tasks on the cluster's CPUs, model actors on its "
                        "GPUs (needs the ray extra).")(wrapper)


def timeline_options(func):
    """--timeline [SECONDS], --plot FILE: quality over time (`vqa2cli.timeline`, `vqa2cli.plot`)."""
    func = click.option(
        "--plot",
        "plot_path",
        type=click.Path(dir_okay=False),
        metavar="FILE",
        help="Draw the score over time, the levels as bands, into FILE (.png, .svg or .pdf); implies "
        "--timeline. Needs matplotlib: pip install 'vqa2[plot]'.",
    )(func)
    return click.option(
        "--timeline",
        type=click.FloatRange(min=0, min_open=True),
        is_flag=False,
        flag_value=2.0,
        default=None,
        metavar="[SECONDS]",
        help="Also score the video in consecutive windows of SECONDS (2 if not given), from the same "
        "decoding pass; records get segments [{start, end, score, level}].",
    )(func)


def _timeline_setup(timeline, plot_path):
    """The window length to use (--plot implies the default one) after checking that the plot can be made."""
    if plot_path is None:
        return timeline
    from vqa2cli.plot import require
    from vqa2cli.timeline import DEFAULT_SECONDS

    require(plot_path)
    return timeline or DEFAULT_SECONDS


def _write_plot(reporter, plot_path, records, title, quiet):
    from vqa2cli.plot import plot_timelines

    drawn = plot_timelines(records, plot_path, title=title)
    if not quiet:
        reporter.note(f"plot of {drawn} timeline(s) written to {plot_path}")


def _timeline_column():
    """A table-only view of `segments`: a sparkline (one block per window), then the worst window."""
    from vqa2cli.output import Column
    from vqa2cli.timeline import sparkline, worst_text

    return Column("segments", "Timeline, worst window", lambda s: f"{sparkline(s)} {worst_text(s)}", in_csv=False)


def _load_model(reporter, model_name, device, quant, task):
    from vqa2cli.pipeline import load_model

    with reporter.status(f"Loading model {model_name or '(default)'}…"):
        return load_model(model_name, device=device, quant=quant, task=task)


def _connect_ray(reporter, address, model_name):
    """Join or start the Ray cluster; (model name for the records, level words), read without the weights."""
    try:
        from vqa2cli import ray_scoring
        import ray  # noqa: F401  (the extra may be missing)
    except ImportError:
        raise SetupError("--ray needs Ray Data: install vqa2's ray extra (pip install '.[ray]' in its source "
                         "folder)") from None
    with reporter.status("Starting Ray…" if address is None and "RAY_ADDRESS" not in os.environ else "Joining Ray…"):
        ray_scoring.connect(address)
    name, config = ray_scoring.model_config(model_name)
    return name, config.level_words


# --- score ---------------------------------------------------------------------------------------


def _stdin_lines():
    from vqa2cli.batch import fd_lines

    if sys.stdin is None:  # started with stdin closed: no paths there
        return ()
    try:
        return fd_lines(sys.stdin.fileno())
    except (AttributeError, ValueError, OSError):  # replaced by a file-like object without a descriptor
        return sys.stdin


def _score_columns(level_words, timeline=False, explain=False):
    """The record's columns; with `timeline` / `explain`, their fields come last in CSV (the others keep
    their places) and in the table next to the score."""
    from vqa2cli.output import Column, fmt_float

    return [
        Column("path", "Path"),
        Column("score", "Score", fmt_float(3), "right"),
        Column("level", "Level"),
        *([_timeline_column()] if timeline else []),
        *[Column(f"probs.{word}", word, fmt_float(2), "right", wide_only=True) for word in level_words],
        Column("model", "Model", in_table=False),  # the table names it in its title
        Column("duration_s", "Duration", lambda seconds: f"{seconds:.1f} s", "right"),
        Column("keyframes", "Keyframes", in_table=False),
        Column("motion_frames", "Motion frames", in_table=False),
        Column("seconds", "Took", lambda seconds: f"{seconds:.2f} s", "right"),
        Column("warnings", "Warnings", lambda warnings: "! " + "; ".join(warnings) if warnings else "", when_set=True),
        Column("error", "Error", in_table=False),  # the table adds an Error column when a row failed
        *([Column("segments", "Segments", in_table=False)] if timeline else []),  # CSV: a JSON cell
        *([Column("explanation", "Explanation")] if explain else []),
    ]


def _explainer(reporter, model, explain_model, device, quant, max_motion_frames, max_keyframes):
    """The `after` hook that adds explanations (`vqa2cli.explain`), loading the assistant if it is another model."""
    from vqa2cli.explain import Explainer, assistant_for

    assistant = assistant_for(model, explain_model, lambda name: _load_model(reporter, name, device, quant, "ask"))
    return Explainer(model, assistant, max_motion_frames, max_keyframes)


def decoding_options(func):
    """--workers, --strict: how videos are decoded ahead of the model, and what damage is allowed."""
    func = click.option(
        "--strict",
        is_flag=True,
        help="A damaged file (truncated, corrupt data) is an error (exit 1) instead of scored with warnings.",
    )(func)
    return click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="Decode worker processes [default: one per usable CPU but one with the model on a GPU, one with "
        "it on the CPU, none for a single video]. 0 decodes in this process (a thread), for debugging.",
    )(func)


def _warm_up_decoders(workers, videos):
    """Start the process decode workers are forked from, while the model loads, when there will be some."""
    if workers != 0 and (videos is None or videos > 1):
        from vqa2cli.prefetch import warm_up

        warm_up()


def _workers(workers, videos, model) -> int:
    """--workers, or its default for this many videos (None: unknown) and the model's device."""
    from vqa2cli.batch import default_workers

    if workers is None:
        return default_workers(videos, model.device)
    return workers if videos is None else min(workers, videos)  # no idle processes


class _Shard(click.ParamType):
    name = "K/N"

    def convert(self, value, param, ctx):
        from vqa2cli.batch import parse_shard

        if isinstance(value, tuple):
            return value
        try:
            return parse_shard(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def _expand_inputs(paths, recursive, shard, images, quiet, reporter):
    """(paths to score, their number or None while stdin streams, notes to print once the model loads).
    `images`: folders give still images too (the model takes them)."""
    from vqa2cli.batch import expand_paths

    if "-" in paths:  # expanded as they arrive, notes printed then
        return expand_paths(paths, recursive=recursive, stdin=_stdin_lines(), shard=shard, images=images,
                            warn=None if quiet else reporter.note), None, []
    notes = []
    # the whole list known up front gives the progress bar its ETA and the worker pool its size
    inputs = list(expand_paths(paths, recursive=recursive, shard=shard, images=images, warn=notes.append))
    return inputs, len(inputs), [] if quiet else notes


def _score_writer(fmt, output, resume, name, columns, inputs, total, note):
    """(writer, inputs, total): stdout in `fmt`, or --output FILE, whose finished paths --resume skips."""
    from vqa2cli.output import make_writer, open_record_file

    if output is None:
        return make_writer(fmt, sys.stdout, columns, title=f"vqa2 score ({name})"), inputs, total
    writer, existing = open_record_file(output, columns, resume=resume)
    other_models = existing.models - {name}
    if other_models:
        writer.close()
        raise SetupError(f"{output}: its records were made with model {sorted(map(str, other_models))[0]!r}, "
                         f"this run uses {name!r}; resume with the same --model, or name a new file")
    if existing.torn_bytes:
        note(f"{output}: cut off an incomplete last record ({existing.torn_bytes} bytes) left by an "
                      f"interrupted run")
    if existing.done:
        if total is not None:
            inputs = [path for path in inputs if path not in existing.done]
            total = len(inputs)
        else:
            inputs = (path for path in inputs if path not in existing.done)
        note(f"resuming {output}: {len(existing.done)} video(s) already scored are skipped")
    return writer, inputs, total


def _takes_images(model_name) -> bool:
    """Whether the model scores still images too (then folders give them), from its config alone."""
    from vqa2cli.checkpoint import read_config

    return read_config(model_name, "score")[1].images


def _kept(record: dict, timelines: list | None) -> dict:
    """`record`, its timeline kept in `timelines` for --plot (None: no plot)."""
    if timelines is not None:
        timelines.append({"path": record["path"], "segments": record["segments"]})
    return record


def _write_records(records, writer, reporter):
    """Write each record (a dict) as it comes, one stderr line per failed or damaged file: (scored, failed,
    damaged, interrupted)."""
    scored = failed = damaged = 0
    try:
        for record in records:
            writer.write(record)
            if record["error"]:
                failed += 1
                reporter.note(f"error: {record['error']}")
            else:
                scored += 1
                if record["warnings"]:
                    damaged += 1
                    reporter.note(f"warning: {record['path']}: {'; '.join(record['warnings'])}")
            reporter.advance()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGHUP turned into one by main()
        return scored, failed, damaged, True
    return scored, failed, damaged, False


@cli.command(short_help="Score the quality of videos (files, directories, stdin).")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@model_options
@click.option(
    "--prompt",
    type=click.Choice(["ugc", "streaming", "enhanced"]),
    default=None,
    help="Scoring prompt [default: the one the model was trained with].",
)
@sampling_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Videos the model scores in one forward pass.",
)
@decoding_options
@timeline_options
@click.option("--explain", is_flag=True,
              help="Also say what is wrong: the assistant model's answer to \"What quality problems does this video "
              "have?\" (records get explanation), from the same decoded video.")
@click.option("--explain-model", metavar="NAME|DIR|REPO",
              help="Model that explains; implies --explain [default: the scoring model when it also answers "
              "questions (vqa2-assistant-enhanced, vqa2-tiny), else the default of `vqa2 ask`].")
@click.option("--shard", type=_Shard(), default=None,
              help="Score only share K of N (0 <= K < N) of the inputs: N machines each given one K split a "
              "catalogue between them with no overlap (a hash of each path; see docs/cli.md).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Append records to FILE (.jsonl or .csv) as they are made, instead of stdout.")
@click.option("--resume", is_flag=True,
              help="Continue --output FILE: skip the videos it already holds a score for (failed ones are retried).")
@click.option("-r", "--recursive", is_flag=True, help="Look for videos in subdirectories too.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr: no progress bar, notes or summary.")
@ray_options
@output_format_options
def score(paths, model_name, device, quant, prompt, max_motion_frames, max_keyframes, batch_size, workers, strict,
          timeline, plot_path, explain, explain_model, shard, output, resume, recursive, quiet, ray, fmt):
    """Score the quality of videos: 0 (worst) to 1 (best), and a level from low to high.

    PATH is a video file, a directory, or - to read paths from stdin (one per line). In a directory,
    files with a video extension (.mp4 .mov .mkv .webm .avi .m4v .ts .flv .wmv .mpg .y4m …) are
    scored, sorted by name; --recursive goes into subdirectories. Files named explicitly are always
    tried. The model loads once for the whole batch; videos are decoded ahead of it in --workers
    processes.

    Output goes to stdout: a table on a terminal, JSON Lines when piped (or --json, --jsonl, --csv),
    or to --output FILE. Each record has path, score, level, probs, model, duration_s, keyframes,
    motion_frames, seconds, warnings, error, segments (--timeline, else null) and explanation
    (--explain, else null); CSV has the last two as columns only when asked for, segments as one
    JSON text. A file that fails gives a record with `error` and a line on stderr; the batch goes
    on. A damaged file that still decodes is scored, with what was lost in `warnings` and a line on
    stderr (an error with --strict).

    Still images (.jpg .png …, also in directories) are scored by models trained on them
    (vqa2-assistant-enhanced); other models refuse them. --timeline decodes each file in this
    process, between the model's passes over its windows: --workers does not apply.

    With --ray the same inputs are scored by a Ray Data pipeline on the cluster RAY_ADDRESS (or
    --ray-address) names, or on a new local one: decode tasks, then --ray-actors model actors.

    Exit status: 0 all scored, 1 some failed, 2 bad usage or model not available; 130, 143, 129
    stopped by Ctrl-C, SIGTERM, SIGHUP (the results so far are written, --json stays a valid array).

    \b
    Examples:
      vqa2 score clip.mp4
      vqa2 score videos/ -r --json > scores.json
      vqa2 score a.mp4 b.webm --csv
      vqa2 score clip.mp4 --timeline --plot clip.png
      vqa2 score clip.mp4 --explain -m vqa2-assistant-enhanced
      find /data -name '*.mp4' -mmin -60 | vqa2 score - --jsonl | jq .score
      vqa2 score /catalogue -r --shard 0/4 --output part0.jsonl --resume
      RAY_ADDRESS=ray://head:10001 vqa2 score /mnt/catalogue -r --ray --ray-actors 8 --parquet scores/
    """
    from vqa2cli.batch import score_videos
    from vqa2cli.output import Reporter, default_format, make_writer, record_file_format

    if resume and output is None:
        raise click.UsageError("--resume continues an --output FILE: name the file")
    if output is not None:
        if fmt:
            raise click.UsageError(f"--output takes its format from the file's extension: drop --{fmt}")
        try:
            record_file_format(output)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--output") from None
    fmt = fmt or default_format(sys.stdout)
    timeline = _timeline_setup(timeline, plot_path)
    explain = explain or explain_model is not None
    if ray is not None and (timeline is not None or explain):
        raise click.UsageError("--timeline, --plot and --explain score in this process: drop --ray")
    # records streamed to the terminal are their own progress, and a live bar redrawn on the same
    # screen would overwrite them: the bar is for tables (printed at the end) and redirected output
    reporter = Reporter.for_stderr(quiet or (output is None and fmt != "table" and sys.stdout.isatty()))
    if "-" in paths and sys.stdin is not None and sys.stdin.isatty() and not quiet:
        reporter.note("reading video paths from stdin, one per line (end with Ctrl-D)")
    if timeline is not None and workers and not quiet:
        reporter.note("--workers does not apply with --timeline: each file is decoded between the model's passes")
    try:
        inputs, total, notes = _expand_inputs(paths, recursive, shard, _takes_images(model_name), quiet, reporter)
        if ray is None and timeline is None:
            _warm_up_decoders(workers, total)
        # the model first: when it cannot load, its error is the only message
        after = None
        if ray is None:
            model = _load_model(reporter, model_name, device, quant, task="score")
            name, level_words = model.name, model.config.level_words
            workers = 0 if timeline is not None else _workers(workers, total, model)
            if explain:
                after = _explainer(reporter, model, explain_model, device, quant, max_motion_frames, max_keyframes)
        else:
            name, level_words = _connect_ray(reporter, ray["address"], model_name)
            if total is None:  # Ray plans the whole list up front
                inputs = list(inputs)
                total = len(inputs)
        for note in notes:
            reporter.note(note)
        columns = _score_columns([word.strip() for word in level_words], timeline is not None, explain)
        writer, inputs, total = _score_writer(fmt, output, resume, name, columns, inputs, total,
                                              (lambda message: None) if quiet else reporter.note)
    except KeyboardInterrupt:
        if fmt == "json" and output is None:  # no results yet, but what reads our stdout still gets valid JSON
            make_writer(fmt, sys.stdout, []).close()
        reporter.note(_stop.note("no video was scored"))
        return EXIT_INTERRUPTED
    start = time.perf_counter()
    timelines = []  # what --plot draws
    if ray is None:
        scores = score_videos(model, inputs, prompt=prompt, max_motion_frames=max_motion_frames,
                              max_keyframes=max_keyframes, batch_size=batch_size, workers=workers, strict=strict,
                              timeline=timeline, after=after)
        records = (_kept(record.to_dict(), timelines if plot_path else None) for record in scores)
    else:
        from vqa2cli.ray_scoring import score_records

        scores = records = score_records(
            inputs, model_name, parquet=ray["parquet"], device=device, quant=quant, prompt=prompt,
            max_motion_frames=max_motion_frames, max_keyframes=max_keyframes, batch_size=batch_size, strict=strict,
            actors=ray["actors"], gpus_per_actor=ray["gpus_per_actor"])
    try:
        reporter.start("Scoring", total=total)
        scored, failed, damaged, interrupted = _write_records(records, writer, reporter)
    finally:
        reporter.stop()
        writer.close()  # first: a second signal ends the process at once
        scores.close()  # stops the decoders (or the Ray pipeline)
    if plot_path is not None:
        _write_plot(reporter, plot_path, timelines, f"vqa2 score ({name})", quiet)
    where = f"; records in {output}" if output else ""
    if interrupted:
        # the writer's count: a signal held back while a record was written lands before the counts above
        reporter.note(_stop.note(f"{writer.count} video(s) done, results so far written{where}"))
        return EXIT_INTERRUPTED
    if not quiet:
        with_warnings = f" ({damaged} with warnings)" if damaged else ""
        reporter.note(f"scored {scored} video(s){with_warnings}, {failed} failed, in "
                      f"{time.perf_counter() - start:.1f} s{where}")
    return EXIT_FAILED if failed else 0


# --- compare -------------------------------------------------------------------------------------


def _compare_columns(timeline):
    from vqa2cli.compare import windows_text
    from vqa2cli.output import Column, fmt_float

    return [
        Column("path", "Path"),
        Column("score", "Score", fmt_float(3), "right"),
        Column("level", "Level"),
        Column("difference", "B - A", lambda d: f"{d:+.3f}", "right", missing="-"),
        Column("verdict", "Verdict"),
        Column("rank", "Rank", justify="right"),
        *([_timeline_column()] if timeline else []),
        *([Column("segments", "Windows vs A", windows_text, in_csv=False)] if timeline else []),
        Column("reference", "Reference", in_table=False),
        Column("model", "Model", in_table=False),
        Column("error", "Error", in_table=False),
        *([Column("segments", "Segments", in_table=False)] if timeline else []),  # CSV: a JSON cell
    ]


@cli.command(short_help="Compare versions of a video by their scores (reference-free, not full-reference).")
@click.argument("reference", metavar="A")
@click.argument("candidates", nargs=-1, required=True, metavar="B...")
@model_options
@sampling_options
@timeline_options
@click.option("--margin", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Score differences up to this are reported as 'same'.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr: no progress bar, notes or summary.")
@output_format_options
def compare(reference, candidates, model_name, device, quant, max_motion_frames, max_keyframes, timeline, plot_path,
            margin, quiet, fmt):
    """Compare videos by the model's quality score: which is better, and by how much.

    Each video is scored on its own, exactly as `vqa2 score` scores it, and each candidate B gets
    B - A, a verdict (better, worse, or same within --margin) and a rank among all inputs (1 =
    best). With --timeline, windows are paired by position and each candidate window gets its
    difference too.

    This is NOT a full-reference metric: the pixels of A and B are never compared (unlike PSNR,
    SSIM or VMAF). The score is reference-free, so A and B need not be aligned or the same length,
    and an encode can score above its source.

    Exit status: 0 all scored, 1 some failed, 2 bad usage or model not available; 130, 143, 129
    stopped by Ctrl-C, SIGTERM, SIGHUP (the videos scored so far are compared and written).

    \b
    Examples:
      vqa2 compare source.mp4 encode-crf23.mp4 encode-crf35.mp4
      vqa2 compare a.mp4 b.mp4 --timeline 1 --json
      vqa2 compare a.mp4 b.mp4 --timeline --plot ab.png
    """
    from vqa2cli.batch import score_videos
    from vqa2cli.compare import best, compare_records
    from vqa2cli.output import Reporter, default_format, make_writer

    fmt = fmt or default_format(sys.stdout)
    timeline = _timeline_setup(timeline, plot_path)
    reporter = Reporter.for_stderr(quiet)
    model = _load_model(reporter, model_name, device, quant, task="score")
    paths = [reference, *candidates]
    records = []  # all of them first: the rows compare each with the first
    scoring = score_videos(model, paths, max_motion_frames=max_motion_frames, max_keyframes=max_keyframes,
                           timeline=timeline)
    try:
        reporter.start("Scoring", total=len(paths))
        *_, interrupted = _write_records((record.to_dict() for record in scoring),
                                         types.SimpleNamespace(write=records.append), reporter)
    finally:
        scoring.close()
        reporter.stop()
    rows = compare_records(records, margin) if records else []
    with make_writer(fmt, sys.stdout, _compare_columns(timeline is not None),
                     title=f"vqa2 compare ({model.name}): B - A with A = {reference}") as writer:
        for row in rows:
            writer.write(row)
    if plot_path is not None:
        _write_plot(reporter, plot_path, rows, f"vqa2 compare ({model.name})", quiet)
    if interrupted:
        reporter.note(_stop.note(f"{len(rows)} of {len(paths)} video(s) scored, those written"))
        return EXIT_INTERRUPTED
    top = best(rows)
    if top is not None and not quiet:
        reporter.note(f"best: {top['path']} ({top['score']:.3f}); reference-free scores, not a pixel comparison")
    return EXIT_FAILED if any(row["error"] for row in rows) else 0


# --- ask -----------------------------------------------------------------------------------------


def _read_questions(question, questions_file):
    questions = [question] if question else []
    if questions_file is not None:
        questions += [line.strip() for line in questions_file if line.strip()]
    if not questions:
        raise click.UsageError("give a QUESTION, or --questions FILE with one question per line")
    return questions


@cli.command(short_help="Ask a question about the quality of a video.")
@click.argument("video", type=click.Path(dir_okay=False))
@click.argument("question", required=False)
@click.option(
    "--questions",
    "questions_file",
    type=click.File("r", encoding="utf-8"),
    help="A file with one question per line (- for stdin), all asked about the same decoded video.",
)
@model_options
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Longest answer.")
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print {path, question, answer, model} (an array for several).")
@click.option("-q", "--quiet", is_flag=True, help="No spinner while the model loads.")
def ask(video, question, questions_file, model_name, device, quant, max_new_tokens, max_motion_frames, max_keyframes,
        as_json, quiet):
    """Ask a question about the quality of a video; the answer streams as it is generated.

    With --questions, every question in the file is answered about the same video, which is
    decoded once. Each answer is printed after its question ("Q: …" / "A: …").

    \b
    Examples:
      vqa2 ask clip.mp4 "Is there stuttering?"
      vqa2 ask clip.mp4 "Describe the sharpness and the noise." --json
      vqa2 ask clip.mp4 --questions questions.txt
    """
    questions = _read_questions(question, questions_file)  # a usage error before any slow import
    from vqa2cli.output import JsonArrayWriter, Reporter, to_json

    reporter = Reporter.for_stderr(quiet)
    model = _load_model(reporter, model_name, device, quant, task="ask")
    sample = model.load_video(video, max_motion_frames, max_keyframes, views=False)

    def echo(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def record(question_text):
        answer = model.ask(sample, question_text, max_new_tokens=max_new_tokens)
        return {"path": video, "question": question_text, "answer": answer, "model": model.name}

    if as_json and len(questions) == 1:
        echo(to_json(record(questions[0]), indent=2) + "\n")
        return 0
    if as_json:
        # streamed like `score --json`: answers so far stay a valid array after Ctrl-C
        with JsonArrayWriter(sys.stdout) as writer:
            try:
                for question_text in questions:
                    writer.write(record(question_text))
            except KeyboardInterrupt:
                reporter.note(_stop.note(f"{writer.count} of {len(questions)} question(s) answered"))
                return EXIT_INTERRUPTED
        return 0
    for number, question_text in enumerate(questions, 1):
        if len(questions) > 1:
            blank_line = "\n" if number > 1 else ""
            echo(f"{blank_line}Q: {question_text}\nA: ")
        model.ask(sample, question_text, max_new_tokens=max_new_tokens, on_text=echo)
        echo("\n")
    return 0


# --- models --------------------------------------------------------------------------------------


@cli.command(short_help="List known models and whether they are on this machine.")
@output_format_options
def models(fmt):
    """List the known models: what each is for, where it comes from, whether it is here.

    A model is "present" when it can be loaded without network access. Fetch one with
    `hf download REPO_ID` (or let `vqa2 score --model NAME` download it).

    \b
    Examples:
      vqa2 models
      vqa2 models --json
    """
    from vqa2cli.output import Column, default_format, human_size, make_writer
    from vqa2cli.registry import list_models

    columns = [
        Column("name", "Name", no_wrap=True),
        Column("purpose", "Purpose"),
        Column("repo_id", "Source", no_wrap=True, missing="shipped with vqa2"),
        Column("default_for", "Default", lambda tasks: ", ".join(tasks)),
        Column("present", "Present", lambda present: "yes" if present else "no"),
        Column("size_bytes", "Size", lambda size: human_size(size) if size else "-", "right"),
        Column("path", "Path", in_table=False),
    ]
    with make_writer(fmt or default_format(sys.stdout), sys.stdout, columns, title="vqa2 models") as writer:
        for status in list_models():
            entry = status.entry
            writer.write(
                {
                    "name": entry.name,
                    "purpose": entry.purpose,
                    "repo_id": entry.repo_id,
                    "prompt": entry.prompt,
                    "default_for": list(entry.default_for),
                    "present": status.present,
                    "size_bytes": status.size_bytes,
                    "path": str(status.path) if status.path else None,
                }
            )
    return 0


# --- synth ---------------------------------------------------------------------------------------


def _parse_sizes(ctx, param, value):
    sizes = []
    for item in value.split(","):
        try:
            width, height = (int(part) for part in item.strip().lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"'{item}' is not WIDTHxHEIGHT (e.g. 128x128)") from None
        sizes.append((width, height))
    return tuple(sizes)


def _parse_range(kind):
    def parse(ctx, param, value):
        try:
            parts = [kind(part) for part in value.split(",")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2:
            raise click.BadParameter(f"'{value}' is not LO,HI (or one value)")
        return tuple(parts)

    return parse


@cli.command(short_help="Make labelled training data: clean clips + graded distortions.")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--clips", "clips_dir", type=click.Path(exists=True, file_okay=False),
              help="Folder of clean clips to distort (searched recursively) [default: procedural clips].")
@click.option("-n", "--count", type=click.IntRange(min=1), default=200, show_default=True, help="Clips to make.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same dataset.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="Folder of photographs (searched recursively) for 'photo' content: a camera pans and zooms over "
              "each, with cut-outs of it gliding across [default content with it: photo,photo,photo,photo,shapes].")
@click.option("--size", default="128x128", show_default=True, callback=_parse_sizes, metavar="WxH[,WxH...]",
              help="Frame size (even); several: each clip takes one, drawn from the seed. User clips are "
              "centre-cropped to its aspect ratio, then resized.")
@click.option("--fps", type=float, default=12.0, show_default=True, help="Frame rate (never above a user clip's).")
@click.option("--seconds", type=float, default=4.0, show_default=True, help="Clip length.")
@click.option("--crf", type=click.IntRange(0, 51), default=0, show_default=True,
              help="x264 quality of the written clips: 0 is lossless (only the labelled damage shows, and frames "
              "are identical run to run); 10-18 are near-lossless and smaller.")
@click.option("--content", default=None,
              help="Content kinds to draw from (comma-separated; repeat one to draw it more often): photo (needs "
              "--images), and the procedural texture, gradient, shapes, zoom and leaves (dead leaves) "
              "[default: texture,gradient,shapes,zoom; with --images photo,photo,photo,photo,shapes].")
@click.option("--distortions", default=None, metavar="NAME,...",
              help="Distortions to draw from [default: all but blocking]: blur, motion_blur, noise, compression "
              "(x264, VP9 or MPEG-4 at a quality ladder), upscaling, blocking (synthetic 8x8 DCT), overexposure, "
              "underexposure (spatial); stutter, flicker, shake (motion).")
@click.option("--speed", default="1,3", show_default=True, callback=_parse_range(float), metavar="LO,HI",
              help="Procedural motion, pixels per frame at 128 px.")
@click.option("--detail", default="0.9,1.5", show_default=True, callback=_parse_range(float), metavar="LO,HI",
              help="Procedural texture slope: 1 is natural-image-like, higher is smoother.")
@click.option("--objects", default="2,6", show_default=True, callback=_parse_range(int), metavar="LO,HI",
              help="Moving shapes in 'shapes' clips.")
@click.option("--grain", default="0,0", show_default=True, callback=_parse_range(float), metavar="LO,HI",
              help="Camera noise in clean photo and procedural content, sigma in grey levels drawn per clip; part "
              "of the content, not a distortion (MOS unchanged). Keep HI under 6, noise's lightest severity.")
@click.option("--photo-scale", default="0,0", show_default=True, callback=_parse_range(float), metavar="LO,HI",
              help="Photo pixels per frame pixel for 'photo' content, drawn per clip (log-uniform); 1 is the "
              "photo's own pixels, as a camera records them. 0,0: the frame covers 45-80% of the photo.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Clips made at once, one process each; the data is the same for any number [default: the "
              "CPUs this process may use].")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUT folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary; errors are still reported.")
def synth(out, clips_dir, images_dir, count, seed, size, fps, seconds, crf, content, distortions, speed, detail, objects,
          grain, photo_scale, jobs, overwrite, quiet):
    """Make training data for all three fine-tune stages from clean clips and labelled distortions.

    Each clip gets no distortion, one, or one spatial plus one motion distortion, each at a severity
    in [1, 4] over the whole clip or one half of it: blur, motion blur, noise, compression (a real
    encoder), low resolution, over-exposure, under-exposure (spatial); stutter, flicker, camera
    shake (motion). Content: your clips (--clips), photographs a camera moves over (--images), or
    procedural clips.

    OUT receives videos/*.mp4 and, with video paths relative to OUT: stage1.csv
    (video,distortion,kind), stage2.csv (video,mos; MOS 0-100: use --mos-range 0 100), stage3.csv
    (video,question,answer), the same as LLaVA-style stage1/2/3.json, labels.csv (path,mos, for
    `vqa2 eval`), manifest.csv (every clip's source and distortions) and synth.json (settings).

    Exit status: 0 done, 1 some user clips could not be used, 2 bad options or nothing made.

    \b
    Examples:
      vqa2 synth data/train --count 400 --seed 1
      vqa2 synth data/heldout --count 100 --seed 99 --content shapes,zoom --speed 1,4
      vqa2 synth data/mine --clips ~/clean-footage --size 224x224
      vqa2 synth data/photos --images ~/Pictures --size 320x180,480x270 --fps 24
    """
    from vqa2cli.output import Reporter
    from vqa2cli.synth import ContentSettings, SynthSettings, generate_dataset, usable_cpus

    if content is None:
        content = "photo,photo,photo,photo,shapes" if images_dir else "texture,gradient,shapes,zoom"
    kinds = tuple(kind.strip() for kind in content.split(",") if kind.strip())
    extra = {"distortions": tuple(d.strip() for d in distortions.split(",") if d.strip())} if distortions else {}
    settings = SynthSettings(count=count, seed=seed, width=size[0][0], height=size[0][1], more_sizes=size[1:], fps=fps,
                             seconds=seconds, crf=crf,
                             content=ContentSettings(kinds=kinds, speed=speed, detail=detail, objects=objects,
                                                     grain=grain, photo_scale=photo_scale), **extra)
    reporter = Reporter.for_stderr(quiet, unit="clips")

    def on_clip(plan, error):
        if error is not None:
            reporter.note(f"error: {error}")
        reporter.advance()

    start = time.perf_counter()
    try:
        with reporter:
            reporter.start("Making clips", total=count)
            meta = generate_dataset(out, settings, clips_dir=clips_dir, images_dir=images_dir, overwrite=overwrite,
                                    on_clip=on_clip,
                                    jobs=min(jobs or usable_cpus(), count))
    except KeyboardInterrupt:
        reporter.note(_stop.note(f"the clips made so far are labelled in {out}"))
        return EXIT_INTERRUPTED
    for message in meta["skipped_sources"]:
        reporter.note(f"skipped: {message}")
    if not quiet:
        reporter.note(f"made {meta['clips']} clip(s) in {out} ({len(meta['failed'])} failed) "
                      f"in {time.perf_counter() - start:.1f} s")
    return EXIT_FAILED if meta["failed"] or meta["skipped_sources"] else 0


# --- eval ----------------------------------------------------------------------------------------


def _prediction_writer(path, columns):
    from vqa2cli.output import make_writer

    suffix = os.path.splitext(path)[1].lower()
    fmt = {".json": "json", ".jsonl": "jsonl"}.get(suffix, "csv")
    try:
        handle = open(path, "w", encoding="utf-8", newline="")
    except OSError as error:
        raise SetupError(f"{path}: cannot write predictions ({error.strerror})") from None
    return handle, make_writer(fmt, handle, columns)


@cli.command("eval", short_help="Evaluate a model on labelled videos: SRCC/PLCC/KRCC/RMSE or accuracy.")
@click.argument("labels", type=click.Path(dir_okay=False))
@model_options
@click.option("--predictions", "predictions_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Where per-item predictions go (.csv, .json or .jsonl) [default: LABELS.predictions.csv "
              "beside LABELS].")
@click.option("--max-motion-frames", type=click.IntRange(min=4), default=2000, show_default=True,
              help="Longest motion stream; longer videos are sampled evenly down to it.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Longest answer (question sets).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Videos scored in one forward pass (score sets).")
@decoding_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary; errors are still reported.")
@output_format_options
def eval_(labels, model_name, device, quant, predictions_path, max_motion_frames, max_new_tokens, batch_size, workers,
          strict, quiet, fmt):
    """Evaluate a model on a labelled set, with the standard VQA protocol.

    LABELS is a CSV whose header says what it holds (`video` may stand for `path`):

    \b
      path,mos                  scores: SRCC and KRCC on the raw scores; PLCC and RMSE (on the
                                MOS scale) after the 4-parameter logistic fit of predictions to MOS
      path,question,answer      questions: accuracy (yes/no by the first word, option letters,
                                otherwise the whole answer, case-insensitive)

    Paths are relative to the CSV's folder and may not leave it. The model loads once. A video that
    is missing or cannot be decoded or scored is a failed item: reported, left out of the metrics.
    A damaged video that still decodes is evaluated, with a warning (a failed item with --strict).
    Per-item predictions are saved to --predictions; the metrics go to stdout (a table on a
    terminal, JSON Lines when piped, or --json/--jsonl/--csv).

    Exit status: 0 all evaluated, 1 some items failed, 2 bad usage, labels or model.

    \b
    Examples:
      vqa2 eval data/heldout/labels.csv --model vqa2-tiny
      vqa2 eval data/heldout/stage3.csv --model vqa2-tiny --json
      vqa2 eval konvid/labels.csv --predictions konvid-preds.json
    """
    from vqa2cli.evaluation import evaluate, prediction_columns, read_labels, summary_columns
    from vqa2cli.output import Reporter, default_format, make_writer

    label_set = read_labels(labels)
    if predictions_path is None:
        predictions_path = os.path.splitext(labels)[0] + ".predictions.csv"
    handle, predictions = _prediction_writer(predictions_path, prediction_columns(label_set.kind))
    reporter = Reporter.for_stderr(quiet)
    failed = 0
    warned = set()

    def on_record(record):
        nonlocal failed
        predictions.write(record)
        if record["error"]:
            failed += 1
            reporter.note(f"error: {record['error']}")
        elif record["warnings"] and record["path"] not in warned:  # once per video, not per question
            warned.add(record["path"])
            reporter.note(f"warning: {record['path']}: {'; '.join(record['warnings'])}")
        reporter.advance()

    videos = len({row.video for row in label_set.rows})
    interrupted = False
    try:
        _warm_up_decoders(workers, videos)
        model = _load_model(reporter, model_name, device, quant, task="score" if label_set.kind == "scores" else "ask")
        workers = _workers(workers, videos, model)
        reporter.start("Evaluating", total=len(label_set.rows))
        _, summary = evaluate(model, label_set, max_motion_frames=max_motion_frames, max_new_tokens=max_new_tokens,
                              on_record=on_record, batch_size=batch_size, workers=workers, strict=strict)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        reporter.stop()
        predictions.close()
        handle.close()
    if interrupted:
        reporter.note(_stop.note(f"predictions so far are in {predictions_path}"))
        return EXIT_INTERRUPTED
    summary["predictions"] = predictions_path
    columns = summary_columns(label_set.kind)
    with make_writer(fmt or default_format(sys.stdout), sys.stdout, columns, title=f"vqa2 eval ({model.name})") as out:
        out.write(summary)
    if not quiet:
        reporter.note(f"evaluated {summary['evaluated']} of {summary['items']} item(s), {failed} failed; "
                      f"predictions in {predictions_path}")
    return EXIT_FAILED if failed else 0


# --- finetune ------------------------------------------------------------------------------------


class _CommaList(click.ParamType):
    name = "list"

    def convert(self, value, param, ctx):
        return value if isinstance(value, tuple) else tuple(p.strip() for p in value.split(",") if p.strip())


def _click_type(spec, kind):
    if spec.choices is not None:
        return click.Choice([str(choice) for choice in spec.choices])
    if spec.path is not None:
        return click.Path(exists=spec.exists, file_okay=spec.path != "dir", dir_okay=spec.path != "file")
    if kind in (int, float):
        limits = dict(min=spec.min, max=spec.max, min_open=spec.min_open, max_open=spec.max_open)
        return click.IntRange(**limits) if kind is int else click.FloatRange(**limits)
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return _CommaList() if args[-1] is Ellipsis else args[0]  # (x, ...): "a,b,c"; (x, y): two values
    return kind


def dataclass_options(cls):
    """Click parameters made from the fields of dataclass `cls`, each carrying an `Option` (see
    vqa2cli.finetune.options): the default, help and limits of an option are written once, on its field."""
    hints = typing.get_type_hints(cls)

    def parameter(field):
        spec, kind = field.metadata["option"], hints[field.name]
        kind = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)  # X | None -> X
        if spec.argument:
            return click.argument(field.name, type=_click_type(spec, kind))
        flags = spec.flags or ("--" + field.name.replace("_", "-"),)
        if kind is bool:
            return click.option(*flags, field.name, is_flag=True, help=spec.help)
        required = field.default is dataclasses.MISSING
        args = typing.get_args(kind) if typing.get_origin(kind) is tuple else ()
        nargs = len(args) if args and Ellipsis not in args else 1  # (x, y): two values
        return click.option(*flags, field.name, type=_click_type(spec, kind), nargs=nargs, required=required,
                            default=None if required else field.default, show_default=not required and
                            field.default is not None, metavar=spec.metavar, help=spec.help)

    def decorate(func):
        for field in reversed(dataclasses.fields(cls)):
            func = parameter(field)(func)
        return func

    return decorate


@cli.command(short_help="Fine-tune a model on your own data (the three VQA² training stages).")
@dataclass_options(FinetuneOptions)
def finetune(**values):
    """Fine-tune a model on your own videos, one VQA² stage at a time.

    DATA is a data file or a folder holding one: the release's LLaVA-style JSON/JSONL, or a CSV
    (stage 1: video,distortion[,kind]; stage 2: video,mos with --mos-range; stage 3:
    video,question,answer). Video paths are relative to the data folder. Every record is checked
    before training; invalid ones are listed with their line numbers.

    Ctrl-C, SIGTERM or SIGHUP finishes the current step, saves a checkpoint and exits (130, 143,
    129); --resume continues
    exactly. One run at a time may use an --output folder. Several GPUs or machines: start the same
    command with `torchrun` or `accelerate launch`.

    \b
    Examples:
      vqa2 finetune --stage 2 scores.csv --mos-range 1 5 --model vqa2-tiny --output my-scorer
      vqa2 finetune --stage 3 qa.json --model q-future/VQA-Assistant-llava_qwen --method qlora -o my-assistant
      torchrun --nproc_per_node 8 -m vqa2cli finetune --stage 2 data/ -m BASE -o out --grad-accum 4
    """
    from vqa2cli.finetune import run
    from vqa2cli.output import Reporter

    options = FinetuneOptions(**values)
    reporter = Reporter.for_stderr(quiet=False, unit="steps")
    result = run(options, say=reporter.note, progress=reporter)
    # finetune's own handler caught the signal (it saves first), so the exit code comes from the result
    return 128 + (result.stopped_by or signal.SIGINT) if result.interrupted else 0


# --- serve ---------------------------------------------------------------------------------------


@cli.command(short_help="Serve a model over HTTP: POST /score and /ask for upload-gating pipelines.")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens it to the network (set a --token then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port; 0 picks a free one (the address is printed on stderr).")
@click.option("--allow-dir", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Let clients name video files under DIR instead of uploading them [default: uploads only].")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=512, show_default=True,
              help="Largest upload; larger ones get 413.")
@click.option("--queue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests that may wait behind the one being worked on; more get 503 with Retry-After.")
@click.option("--token", envvar="VQA2_SERVE_TOKEN", show_envvar=True, metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' (prefer the environment variable: arguments show in ps).")
@click.option("--tmp-dir", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Where uploads are kept while they are scored [default: the system's temporary folder].")
@sampling_options
@click.option("-q", "--quiet", is_flag=True, help="No access log: only the startup line and errors.")
def serve(model_name, device, quant, host, port, allow_dir, max_upload_mb, queue, token, tmp_dir, max_motion_frames,
          max_keyframes, quiet):
    """Keep a model loaded and answer over HTTP; needs the extra: pip install 'vqa2[serve]'.

    \b
      POST /score   a video (multipart part `file`, or JSON {"path": ...} under --allow-dir)
                    -> the record `vqa2 score --json` gives for it
      POST /ask     the same plus `question` -> the record of `vqa2 ask --json`
      GET  /health, GET /models, and the API docs at /docs

    One model call runs at a time; up to --queue requests wait, more get 503. Errors are one-line
    JSON ({"error": "..."}): 422 for a file that is not a usable video, 413 for too large an upload.
    --max-motion-frames and --max-keyframes are the defaults, and the most a request may ask for.
    SIGTERM or Ctrl-C: the request on the model finishes, waiting ones get 503, uploads are removed.

    \b
    Examples:
      vqa2 serve --model vqa2-tiny
      curl -F file=@clip.mp4 http://127.0.0.1:8000/score
      curl -F file=@clip.mp4 -F question="Is it blurry?" http://127.0.0.1:8000/ask
      VQA2_SERVE_TOKEN=s3cret vqa2 serve --host 0.0.0.0 --allow-dir /srv/videos
      curl -H "Authorization: Bearer s3cret" -H "Content-Type: application/json" \\
           -d '{"path": "new/upload.mp4"}' http://HOST:8000/score
    """
    from vqa2cli.output import Reporter

    try:
        from vqa2cli import serve as serving
    except ImportError as error:
        raise SetupError(f"vqa2 serve needs its extra: pip install 'vqa2[serve]' ({error.name} is missing)") from None
    reporter = Reporter.for_stderr(quiet)
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        reporter.note(f"warning: listening on {host} without --token: whoever reaches this port can use it")
    settings = serving.ServeSettings(host=host, port=port, token=token or None, allow_dir=allow_dir,
                                     max_upload_mb=max_upload_mb, queue=queue, tmp_dir=tmp_dir,
                                     max_motion_frames=max_motion_frames, max_keyframes=max_keyframes,
                                     access_log=not quiet)
    try:
        model = _load_model(reporter, model_name, device, quant, task="score")
        serving.run(model, settings, say=reporter.note)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


# --- entry point ---------------------------------------------------------------------------------


def main():
    """Console entry point; a command may return an int to set the exit code (1: some inputs failed)."""
    if hasattr(sys.stdout, "reconfigure"):
        # a file name that is not UTF-8 goes into CSV and JSON Lines as the bytes it is, never a crash
        sys.stdout.reconfigure(errors="surrogateescape")
    with _stop:
        exit_code = _run()
    sys.exit(_stop.exit_code if exit_code == EXIT_INTERRUPTED else exit_code)


def _run() -> int:
    try:
        exit_code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C while click parsed the command line, or end of input at a prompt
        click.echo(_stop.note() if _stop.signum else "Aborted.", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except SetupError as error:
        _error_line(error)
        return 2
    except Vqa2Error as error:
        _error_line(error)
        return 1
    except Exception as error:  # a bug: still one line for the user, the traceback on request
        if os.environ.get("VQA2_DEBUG"):
            raise
        message = " ".join(f"{type(error).__name__}: {error}".split())
        _error_line(f"internal error ({message}); run with VQA2_DEBUG=1 for the traceback")
        return 1
    return exit_code if isinstance(exit_code, int) else 0


def _error_line(message):
    from vqa2cli.output import printable

    click.echo(f"error: {printable(message)}", err=True)
