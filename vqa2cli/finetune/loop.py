"""`run()`: one fine-tuning run, from the options to the fine-tuned model in the output folder.

One process or many: under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) accelerate's `Accelerator`
sets up the process group (NCCL on GPUs, gloo on CPUs) and DistributedDataParallel; each process takes its
share of every epoch's order (`schedule`), and the main process alone writes the log, the checkpoints'
shared files and the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

from vqa2cli import __version__
from vqa2cli.data import Dataset, format_problems, load_dataset
from vqa2cli.errors import STOP_SIGNALS, DataError, SetupError
from vqa2cli.finetune.checkpoints import Checkpoints, checkpoint_dirs
from vqa2cli.finetune.examples import ExampleLoader, FeatureCache, LoadedBatch, answer_loss, answer_span
from vqa2cli.finetune.export import save_dtype, write_model
from vqa2cli.finetune.options import FinetuneOptions
from vqa2cli.finetune.output_folder import INVALID_REPORT, OutputFolder
from vqa2cli.finetune.parts import VISION_PREFIX, configure_model, load_base, set_train_mode, stage_parts
from vqa2cli.finetune.schedule import MicroBatch, Position, lr_schedule, micro_batches, shard_order

REPORT_EVERY_S = 30  # a progress line at least this often (and every 5% of the steps)


@dataclass
class FinetuneResult:
    output: Path
    step: int
    total_steps: int
    loss: float | None  # mean training loss of the last optimizer step that had one
    interrupted: bool  # stopped by a signal; a checkpoint of `step` was written
    checkpoint: Path | None
    stopped_by: int | None = None  # the signal that stopped it


def run(options: FinetuneOptions, say=None, progress=None) -> FinetuneResult:
    """Train, checkpoint, and write the fine-tuned model into `options.output`. `say(text)` gets one-line
    messages (default: stderr); `progress`, a `vqa2cli.output.Reporter`, shows a bar of the steps."""
    options.check()
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    with _accelerator(options.device) as accelerator:
        main = accelerator.is_main_process
        say = say if main else (lambda text: None)
        folder = OutputFolder(options.output)
        _claim(folder, options.resume, accelerator, say)
        try:
            return Run(options, accelerator, folder, say, progress if main else None).execute()
        finally:
            if main:
                folder.release()


@contextlib.contextmanager
def _accelerator(device: str):
    """The Accelerator of one run (DDP when launched as several processes)."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

    if device == "cuda" and not torch.cuda.is_available():
        raise SetupError("device cuda: CUDA is not available")
    cpu = device == "cpu" or not torch.cuda.is_available()
    amp = not cpu and torch.cuda.is_bf16_supported()
    # accelerate keeps its state in process-wide singletons: without a process group to keep, an earlier
    # run's (another device, another precision) is dropped, and this run's after it
    own_state = not (dist.is_available() and dist.is_initialized())
    if own_state:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    accelerator = Accelerator(
        cpu=cpu, mixed_precision="bf16" if amp else "no",
        kwargs_handlers=[
            # SlowFast's slow pathway is trained in stages 2-3 but never computed
            DistributedDataParallelKwargs(find_unused_parameters=True),
            # the main process alone writes the final model (minutes for a 7B one) while the others wait
            InitProcessGroupKwargs(timeout=timedelta(hours=2)),
        ],
    )
    try:
        if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                DistributedType.MULTI_GPU):
            raise SetupError(f"vqa2 finetune trains with DistributedDataParallel; this accelerate configuration "
                             f"asks for {accelerator.distributed_type.value}")
        yield accelerator
    finally:
        if own_state:
            accelerator.end_training()  # destroys the process group it made
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def _claim(folder: OutputFolder, resume: bool, accelerator, say) -> None:
    """The main process locks and checks the output folder; every process stops if it may not be used."""
    from accelerate.utils import broadcast_object_list

    refusal = [None]
    if accelerator.is_main_process:
        try:
            note = folder.claim(resume)
            if note:
                say(note)
        except SetupError as error:
            refusal = [str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0]:
        raise SetupError(refusal[0])


def validated_data(options: FinetuneOptions, folder: OutputFolder, main: bool, say) -> Dataset:
    dataset = load_dataset(options.data, options.stage, mos_range=options.mos_range, say=say if main else None)
    if main:
        folder.report_invalid(dataset.problems)
    if dataset.problems:
        for line in format_problems(dataset):
            say(line)
        if not options.skip_invalid:
            raise DataError(
                f"{len(dataset.problems)} of {dataset.total} records in {dataset.path} are invalid (full list in "
                f"{folder.path / INVALID_REPORT}); fix them, or pass --skip-invalid to train without them"
            )
        say(f"skipping {len(dataset.problems)} invalid records; training on {len(dataset.records)}")
    if not dataset.records:
        raise DataError(f"{dataset.path}: no usable records")
    if options.mos_range and not (options.stage == 2 and dataset.path.suffix.lower() == ".csv"):
        say("note: --mos-range only applies to stage-2 CSV data; ignored")
    if options.part and (options.stage != 1 or options.train):
        say("note: --part only applies to stage 1 without --train; ignored")
    return dataset


def fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for record in dataset.records:
        # relative paths: the same data resumed from another mount point is still the same data
        digest.update(json.dumps([str(record.video.relative_to(dataset.root)), record.turns]).encode())
    return digest.hexdigest()[:16]


def check_resume(saved: dict, run: dict, say) -> None:
    """Refuse to continue a checkpoint with options that would make it another run."""
    keys = [*FinetuneOptions.resume_keys(), "parts", "base_model", "data"]
    # a checkpoint written before an option existed ran with its default
    defaults = {f.name: f.default for f in fields(FinetuneOptions) if f.default is not MISSING}
    then = {k: saved.get(k, defaults.get(k)) for k in keys}
    different = [k for k in keys if then[k] != run.get(k)]
    if different:
        listing = "; ".join(f"{k}: {then[k]!r} then, {run.get(k)!r} now" for k in different)
        raise SetupError(f"--resume: this run differs from the checkpoint's ({listing}); use the same options "
                         "and data, or a new --output")
    if saved.get("world") != run["world"]:
        say(f"note: the checkpoint was written by {saved.get('world')} processes, this run has {run['world']}; "
            "the data order from here on differs from an uninterrupted run")
    if saved.get("total_steps") != run["total_steps"]:
        say(f"note: the run length changed ({saved.get('total_steps')} -> {run['total_steps']} steps); the learning "
            "rate schedule follows the new length")


class Run:
    """One run's objects and where it stands; `execute()` goes from the data to the saved model."""

    def __init__(self, options: FinetuneOptions, accelerator, folder: OutputFolder, say, progress):
        self.options, self.accelerator, self.folder, self.say, self.progress = (
            options, accelerator, folder, say, progress)
        self.main = accelerator.is_main_process
        self.cuda = accelerator.device.type == "cuda"
        self.position = Position()
        self.cache: FeatureCache | None = None
        self.skipped = 0  # records that failed in training (validation passed them)

    def execute(self) -> FinetuneResult:
        from accelerate.utils import set_seed

        options = self.options
        self.dataset = validated_data(options, self.folder, self.main, self.say)
        self.parts = tuple(options.train) if options.train else stage_parts(options.stage, options.part,
                                                                             self.dataset.records)
        set_seed(options.seed)  # before the model is touched: fresh LoRA adapters draw from these generators
        self.load_model()
        self.prepare_training()
        latest = self.resume()
        self.scheduler = lr_schedule(self.torch_optimizer, self.total, start=self.position.step)
        if self.main:
            self.folder.trim_metrics(self.position.step)
        saved, interrupted, self.stopped_by = None, False, None
        if self.position.step < self.total:
            self.say(f"{len(self.dataset.records)} records, {self.accelerator.num_processes} process(es), "
                     f"{self.steps_per_epoch} steps per epoch, {self.total} steps")
            saved, interrupted = self.train()
        step, loss = self.position.step, self.position.loss
        if interrupted:
            if saved:
                self.say(f"interrupted at step {step} of {self.total}; checkpoint {saved}. Continue with --resume.")
            return FinetuneResult(self.folder.path, step, self.total, loss, True, saved, self.stopped_by)
        self.finish()
        shown = f", final loss {loss:.4f}" if loss is not None else ""
        self.say(f"done: {step} steps{shown}; use it with `vqa2 score --model {self.folder.path}`")
        return FinetuneResult(self.folder.path, step, self.total, loss, False, saved or latest)

    def load_model(self) -> None:
        from vqa2cli.quantization import Precision

        options = self.options
        # Frozen weights may stay in bf16 on a GPU (computed in bf16 under autocast anyway); trained ones are
        # made float32 in configure_model.
        dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32
        precision = Precision("4bit" if options.method == "qlora" else "none", dtype)
        self.say(f"loading {options.model} ({options.method}, {precision.describe()}) on {self.accelerator.device}")
        base = load_base(options, self.accelerator.device, precision)
        self.raw_model, self.tokenizer, self.base_name = base.model, base.tokenizer, base.name
        self.trainable = configure_model(self.raw_model, options, self.parts)
        self.saved_names = self.trainable + [n for n in base.fresh if n not in self.trainable]  # in checkpoints
        if options.gradient_checkpointing:
            for module in (self.raw_model.language_model, self.raw_model.vision_tower):
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        set_train_mode(self.raw_model)
        self.named = dict(self.raw_model.named_parameters())
        n_trained = sum(self.named[n].numel() for n in self.trainable)
        adapters = any(".lora_" in n for n in self.trainable)
        self.say(f"training {', '.join(self.parts)} ({n_trained:,} parameters in {len(self.trainable)} tensors"
                 f"{', LoRA on the language model' if adapters else ''})")
        if options.method != "full" and not adapters:
            self.say(f"note: no language-model layer is trained, so --method {options.method} has nothing to "
                     "adapt: the selected parts train fully")

    def prepare_training(self) -> None:
        options, accelerator = self.options, self.accelerator
        groups = [
            {"params": [self.named[n] for n in self.trainable if not n.startswith(VISION_PREFIX)], "lr": options.lr},
            {"params": [self.named[n] for n in self.trainable if n.startswith(VISION_PREFIX)],
             "lr": options.effective_vision_lr},
        ]
        self.torch_optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8,
                                                 weight_decay=options.weight_decay)
        n = len(self.dataset.records)
        self.shard_len = len(shard_order(n, 0, options.seed, accelerator.process_index, accelerator.num_processes))
        self.steps_per_epoch = math.ceil(self.shard_len / (options.batch_size * options.grad_accum))
        self.total = options.max_steps or max(1, math.ceil(options.epochs * self.steps_per_epoch))
        self.model = accelerator.prepare_model(self.raw_model, device_placement=False)
        self.optimizer = accelerator.prepare_optimizer(self.torch_optimizer, device_placement=False)
        self.checkpoints = Checkpoints(self.folder.path, accelerator, options.keep)
        self.run_info = {
            **options.resume_values(), "parts": list(self.parts), "base_model": self.base_name,
            "data": fingerprint(self.dataset), "data_file": str(self.dataset.path),
            "world": accelerator.num_processes, "total_steps": self.total,
        }

    def resume(self) -> Path | None:
        """Continue from the newest checkpoint when asked to; the checkpoint resumed from."""
        if not self.options.resume:
            return None
        latest = checkpoint_dirs(self.folder.path)[-1:]
        if not latest:
            self.say(f"--resume: no checkpoint in {self.checkpoints.root}; starting from the beginning")
            return None
        check_resume(self.checkpoints.read_meta(latest[0])["run"], self.run_info, self.say)
        tensors, meta = self.checkpoints.load(latest[0], self.saved_names)
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.named[name].copy_(tensor)
        self.position = Position(**meta["position"])
        self.say(f"resuming from {latest[0]} (step {self.position.step} of {self.total})")
        return latest[0]

    def train(self) -> tuple[Path | None, bool]:
        """Optimizer steps until the last one or a stop signal: (the last checkpoint written, interrupted)."""
        options, accelerator = self.options, self.accelerator
        # the model's own sizes, and the motion cap held within its position table
        sampling = self.raw_model.config.sampling(options.max_motion_frames, views=False)
        if options.random_fragments and not sampling.keyframe_fragments:
            raise SetupError(f"--random-fragments: {self.base_name} takes whole keyframes, not fragments")
        # random fragments make every encoding of a clip new, so none is worth keeping
        if options.feature_cache_gb > 0 and not options.random_fragments and \
                FeatureCache.applies(self.raw_model, self.trainable):
            self.cache = FeatureCache(self.raw_model, int(options.feature_cache_gb * 2**30), accelerator.autocast)
            self.say(f"the encoders are frozen: each video is encoded once (up to {options.feature_cache_gb:g} GB "
                     "kept)")
        loader = ExampleLoader(self.dataset.records, sampling, self.tokenizer, self.cache,
                               options.seed if options.random_fragments else None)
        jobs = micro_batches(len(self.dataset.records), options.batch_size, options.grad_accum, options.seed,
                             accelerator.process_index, accelerator.num_processes, self.position)
        self.began, self.started_at, self.reported = time.monotonic(), self.position.step, 0.0
        if self.progress:
            self.progress.start(f"Training (steps {self.position.step + 1}-{self.total})",
                                total=self.total - self.position.step)
        from vqa2cli.batch import Prefetcher

        saved, losses, stop_now = None, [], False
        # depth 1: the next micro-batch waits decoded while the one after it decodes and this one computes
        with StopSignal(self.say, abort_on_second=accelerator.num_processes == 1) as stop, \
                Prefetcher(jobs, loader, depth=1) as prefetched:
            try:
                for micro, batch, _, _ in prefetched:  # (the micro-batches never end)
                    loss = self.micro_step(batch)
                    if loss is not None:
                        losses.append(loss)
                    if not micro.last:
                        continue
                    self.optimizer_step(micro, losses, last_ran=loss is not None)
                    losses = []
                    stop_now = self.on_all(stop.requested)
                    step = self.position.step
                    if step % options.save_every == 0 or step == self.total or stop_now:
                        saved = self.checkpoint() or saved
                    if stop_now or step >= self.total:
                        break
            finally:
                if self.progress:
                    self.progress.stop()
        self.stopped_by = stop.signum
        return saved, self.position.step < self.total

    def on_all(self, flag: bool) -> bool:
        """Whether `flag` is set in any process."""
        flag = torch.tensor(float(flag), device=self.accelerator.device)
        return float(self.accelerator.reduce(flag, "max")) > 0

    def micro_step(self, batch: LoadedBatch) -> float | None:
        """Forward and backward of one micro-batch; its loss, or None when every process had to skip it."""
        if batch.error:
            raise batch.error
        examples = [self.cache.encoded(e) for e in batch.examples] if self.cache else batch.examples
        for failure in batch.failures:
            self.say(f"warning: skipped {failure}")
        self.skipped += len(batch.failures)
        # every process must run the same micro-steps (DDP's collective calls): skip one only all together
        if self.on_all(not examples):
            return None
        micro, labels = batch.micro, [e.labels for e in examples]
        # gradients are averaged across processes once a step, in its last micro-batch's backward
        with contextlib.nullcontext() if micro.last else self.accelerator.no_sync(self.model):
            with self.accelerator.autocast():
                keep = answer_span(labels)
                out = self.model(input_ids=[e.ids for e in examples], videos=[self.encoded(e) for e in examples],
                                 logits_to_keep=keep, motion_splits=[e.splits for e in examples])
                loss = answer_loss(out.logits, labels, keep)
                del out  # the logits of a long video are large: free them before the next forward
            self.accelerator.backward(loss / micro.count)
        return float(loss.detach())

    def encoded(self, example):
        """The example's video through the encoders (with gradients where they train), unless the feature cache
        already holds its encoding. Outside the DDP forward: the gradients still reach the encoders."""
        from vqa2cli.modeling import EncodedVideo

        sample, model = example.sample, self.raw_model
        if isinstance(sample.keyframes, EncodedVideo):
            return sample.keyframes
        return model.encode_video(sample.keyframes, sample.motion if model.places_motion(example.ids) else None)

    def optimizer_step(self, micro: MicroBatch, losses: list[float], last_ran: bool) -> None:
        accelerator, params = self.accelerator, [self.named[n] for n in self.trainable]
        if losses and not last_ran and accelerator.num_processes > 1:
            # the step's last micro-batch was skipped, so its backward never averaged the gradients
            for param in params:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                param.grad = accelerator.reduce(grad, "mean")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.options.max_grad_norm)) if losses else 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        if losses:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # processes skip micro-batches together, so they agree on whether this step had any
        loss = None
        if losses:
            mean = torch.tensor(sum(losses) / len(losses), dtype=torch.float64, device=accelerator.device)
            loss = float(accelerator.reduce(mean, "mean"))
        self.position = replace(micro.after, loss=loss if loss is not None else self.position.loss)
        if self.main:
            step = self.position.step
            self.folder.append_metrics({
                "step": step, "epoch": round(micro.after.epoch + micro.after.offset / self.shard_len, 4),
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "elapsed_s": round(time.monotonic() - self.began, 3),
                "skipped": self.skipped,
            })
            self.report(step, loss, lr)

    def report(self, step: int, loss: float | None, lr: float) -> None:
        """The bar moves every step; a line with the loss every 5% of the steps or REPORT_EVERY_S."""
        if self.progress:
            self.progress.advance()
        now = time.monotonic()
        if not (step == self.total or step % max(1, self.total // 20) == 0 or now - self.reported > REPORT_EVERY_S):
            return
        self.reported = now
        rate = (step - self.started_at) / max(now - self.began, 1e-9)
        eta = timedelta(seconds=round((self.total - step) / rate)) if rate > 0 else "?"
        shown = f"{loss:.4f}" if loss is not None else "n/a (all videos failed)"
        self.say(f"step {step}/{self.total}  loss {shown}  lr {lr:.2e}  {rate:.2f} step/s  ETA {eta}")

    def checkpoint(self) -> Path | None:
        meta = {"position": asdict(self.position), "run": self.run_info, "vqa2": __version__,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        return self.checkpoints.save(self.position.step, {n: self.named[n] for n in self.saved_names}, meta)

    def finish(self) -> None:
        """Write the fine-tuned model (the main process; the others wait)."""
        self.accelerator.wait_for_everyone()
        if not self.main:
            return
        self.say(f"writing the fine-tuned model to {self.folder.path}")
        # trained weights go to the CPU in the saved precision at once (a 7B model's fp32 copy is 30 GB)
        dtype = save_dtype(self.options, self.cuda)
        final = {n: self.named[n].detach().to("cpu", dtype=self.named[n].dtype if ".lora_" in n else dtype, copy=True)
                 for n in self.saved_names}
        del self.model, self.raw_model, self.optimizer, self.torch_optimizer, self.scheduler, self.named
        self.cache = None
        self.accelerator.free_memory()
        write_model(self.options, self.parts, final, self.folder.path, self.dataset, self.position.step,
                    self.position.loss, dtype)


class StopSignal:
    """First stop signal (SIGINT, SIGTERM, SIGHUP): finish the optimizer step, save, stop. A second SIGINT
    aborts at once, except under torchrun/accelerate, whose launcher forwards the user's Ctrl-C to processes
    that already got it."""

    def __init__(self, say, abort_on_second: bool):
        self.say = say
        self.abort_on_second = abort_on_second
        self.signum = None
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):  # nohup's SIGHUP stays ignored
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if self.abort_on_second and signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        again = " (Ctrl-C again to abort at once)" if self.abort_on_second else ""
        self.say(f"\nstopping: finishing this step and saving a checkpoint{again}")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
