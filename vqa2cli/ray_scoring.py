"""Scoring on a Ray cluster with Ray Data: paths -> decode tasks (CPU) -> model actors (GPU or CPU) -> records.

    >>> import ray
    >>> from vqa2cli.ray_scoring import score_dataset
    >>> ray.init()                                           # or ray.init("ray://head:10001")
    >>> records = score_dataset(["a.mp4", "b.mp4"], model="vqa2-tiny", actors=2)
    >>> records.write_parquet("scores/")                     # or records.iter_rows(), .to_pandas(), ...

Each actor loads the model once and scores batches of decoded videos; decoding runs in separate Ray tasks,
so the GPUs are fed by every CPU of the cluster. Rows are the records `vqa2 score` writes (`ScoreRecord`),
in input order: a file that cannot be decoded or scored is a row with `error` set, never a failed job.
A model actor that dies (a crashed process, a lost node) is restarted by Ray and its unfinished batches are
run again; decode tasks are retried the same way. Every node needs vqa2 (and the model's weights, or
access to the Hub) installed: the workers import `vqa2cli` and load the model by name.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from dataclasses import fields
from typing import Iterable, Iterator

from vqa2cli.batch import EmptyFolder, Loader, ScoreRecord, error_message, score_decoded

RECORD_FIELDS = tuple(f.name for f in fields(ScoreRecord))


class _Decode:
    """Ray Data `map` function: {"path"} -> {"path", "sample" (pickled VideoSample or None), "error", "seconds"}."""

    def __init__(self, sampling):
        self.load = Loader(sampling)

    def __call__(self, row: dict) -> dict:
        path = row["path"]
        if row.get("empty"):
            path = EmptyFolder(path, row["empty"])
        start = time.perf_counter()
        try:
            # pickled, because a VideoSample's tensors vary in shape from video to video; it only travels
            # between this job's own workers
            sample, error = pickle.dumps(self.load(path)), None
        except Exception as failure:  # this file's record, not the job's end
            sample, error = None, error_message(path, failure)
        return {"path": str(path), "sample": sample, "error": error, "seconds": time.perf_counter() - start}


class _Scorer:
    """Ray Data actor: holds one loaded model and turns batches of decoded rows into records."""

    def __init__(self, model: str | None, device: str, quant: str, prompt: str | None, strict: bool):
        from vqa2cli.pipeline import load_model

        self.model = load_model(model, device=device, quant=quant, task="score")
        self.prompt, self.strict = prompt, strict
        self.schema = record_schema(self.model.config.level_words)

    def __call__(self, batch) -> dict:
        # a pyarrow batch: its binary column comes back as the exact bytes (numpy would pad them)
        columns = [batch.column(name).to_pylist() for name in ("path", "sample", "error", "seconds")]
        decoded = [(path, pickle.loads(sample) if sample is not None else None, error, seconds)
                   for path, sample, error, seconds in zip(*columns)]
        import pyarrow

        records = [record.to_dict() for record in score_decoded(self.model, decoded, self.prompt, self.strict)]
        # an explicit schema: a batch of failures alone would otherwise type `score` as null, and Parquet
        # files written from different batches would not read back as one table
        return pyarrow.Table.from_pylist(records, schema=self.schema)


def record_schema(level_words):
    """The Arrow schema of the records (`ScoreRecord`'s fields, `probs` a struct of the model's level words,
    `segments` a list of `vqa2cli.timeline.segment` structs)."""
    import pyarrow as pa

    probs = pa.struct([(word.strip(), pa.float64()) for word in level_words])
    segment = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("score", pa.float64()),
                         ("level", pa.string())])
    types = {"path": pa.string(), "score": pa.float64(), "level": pa.string(), "probs": probs, "model": pa.string(),
             "duration_s": pa.float64(), "keyframes": pa.int64(), "motion_frames": pa.int64(),
             "seconds": pa.float64(), "warnings": pa.list_(pa.string()), "error": pa.string(),
             "segments": pa.list_(segment), "explanation": pa.string()}
    return pa.schema([(name, types[name]) for name in RECORD_FIELDS])


def model_config(model: str | None):
    """(the name records give the model, its config), read without loading weights: the driver only plans."""
    from vqa2cli.checkpoint import read_config

    resolved, config = read_config(model, "score")
    return resolved.name, config


def connect(address: str | None = None) -> None:
    """Join the cluster Ray's own convention names (`address`, else RAY_ADDRESS), else start a local one.
    Ray's progress bars and logs stay off stderr, which carries vqa2's own notes."""
    import logging

    import ray

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if not ray.is_initialized():
        with _native_stderr_silenced():  # the core worker announces that level on fd 2 as it starts
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def score_dataset(
    paths,
    model: str | None = None,
    *,
    device: str = "auto",
    quant: str = "auto",
    prompt: str | None = None,
    max_motion_frames: int | None = None,
    max_keyframes: int | None = None,
    batch_size: int = 1,
    strict: bool = False,
    actors: int = 1,
    gpus_per_actor: float | None = None,
    decode_cpus: float = 1,
):
    """A `ray.data.Dataset` of score records for `paths` (an iterable of paths, or a Dataset with a `path`
    column), computed lazily when the dataset is consumed. `actors` model actors each hold the model;
    `gpus_per_actor` defaults to 1 when the cluster has GPUs (and `device` is not cpu), else 0.
    `batch_size` videos go through the model in one forward pass; `strict` makes damaged videos errors. Call `ray.init` first (or let Ray start
    a local cluster on first use). The rows keep the input order."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = paths if isinstance(paths, ray.data.Dataset) else ray.data.from_items(
        [{"path": str(p), "empty": getattr(p, "reason", None)} for p in paths])  # an EmptyFolder keeps its reason
    if gpus_per_actor is None:
        gpus_per_actor = 1 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    sampling = model_config(model)[1].sampling(max_motion_frames, max_keyframes)
    decoded = dataset.map(_Decode(sampling), num_cpus=decode_cpus)
    return decoded.map_batches(
        _Scorer,
        fn_constructor_kwargs={"model": model, "device": device, "quant": quant, "prompt": prompt, "strict": strict},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=actors,
        num_gpus=gpus_per_actor,
        num_cpus=0 if gpus_per_actor else 1,
    )  # Ray Data's defaults restart a dead actor (reloading the model) and rerun its unfinished batches


def score_records(paths, model: str | None = None, parquet: str | None = None, **options) -> Iterator[dict]:
    """`score_dataset(paths, model, **options)` run to records, in input order; with `parquet`, the records are
    also written there as a Parquet dataset (one run of the pipeline for both)."""
    dataset = score_dataset(paths, model, **options)
    if parquet:
        dataset = dataset.materialize()
        dataset.write_parquet(parquet)
    yield from records(dataset)


@contextlib.contextmanager
def _native_stderr_silenced():
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def records(dataset) -> Iterable[dict]:
    """The rows of a `score_dataset` dataset as plain records (the field order and types of `vqa2 score`)."""
    for row in dataset.iter_rows():
        record = {name: _plain(row.get(name)) for name in RECORD_FIELDS}
        if record["probs"] is not None:  # Arrow gives the struct's fields in its own order: keep the model's
            record["probs"] = dict(record["probs"])
        yield record


def _plain(value):
    """Arrow's values as `vqa2 score` writes them: numpy arrays -> lists, numpy scalars -> Python numbers,
    NaN for a missing float -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return None
    return value
