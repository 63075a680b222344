"""Decoding ahead of the model: `Prefetcher` runs `decode(item)` for a stream of items, in a background
thread or in a pool of worker processes, and hands the results back in input order.

    with Prefetcher(paths, model.sampling().load, workers=4) as prefetcher:
        for path, sample, error, seconds in prefetcher:
            ...

Every item gives exactly one `(item, result, error, seconds)`: `result` is decode's return value or
None, `error` a one-line message when decoding failed (`error_message`), `seconds` the decode time.

`workers=0` decodes in one background thread of this process (PyAV, numpy and torch release the GIL
while they work); `decode` may then be any callable. `workers=N` decodes in N worker processes, so
decoding scales past one core and past the GIL; `decode` and the items must then be picklable (a
module-level function, `Sampling.load`), and a script that uses it needs the usual
`if __name__ == "__main__":` guard, because multiprocessing imports the main module in each worker.

Memory is bounded by slots: an item takes a slot when it is handed to a decoder and gives it back when
the consumer takes its result, so at most `depth + max(workers, 1)` decoded results exist at any time
outside the consumer (being decoded, finished and waiting for their turn, queued); the consumer holds
the ones it has taken (a batch being scored).

Worker processes (a forkserver, so that starting or replacing one forks a small single-threaded
process that has already imported torch and PyAV, and inherits none of this process's threads, locks
or open files):
* a decoded sample's tensors cross over through one anonymous shared-memory file (memfd) per result,
  mapped here without a copy: receiving a 10 s 1080p clip decoded at 384 px (150 MB) cost this
  process 0.02 s of CPU, against 0.4 s pickled through the pipe (BENCHMARKS.md). A memfd is not
  limited by the size of /dev/shm (64 MB in a default Docker container), and it is freed with its
  last mapping, so nothing leaks when a process dies. Where there is no memfd (not Linux) results
  are pickled;
* a worker that dies (a decoder segfault, the OOM killer) becomes an error result for the item it
  held, and a fresh worker takes its place; workers that cannot even start are a SetupError;
* workers ignore SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C, or a stop sent to the whole process
  group, is for this process to handle), keep no copy of stdout, and exit when this process goes away
  (their pipe closes); `close()` kills them, so an interrupted run leaves no process behind.
"""

from __future__ import annotations

import io
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import Callable, Iterable

from vqa2cli.errors import InputError, SetupError

# Decoded results waiting for the consumer beyond those being decoded. Two keep the model fed when decode
# times vary from video to video; each can hold up to max_motion_frames uint8 frames (0.9 GB at
# 2000 x 384 px), so memory bounds the depth.
DEFAULT_PREFETCH = 2

# Workers in a row that die before they are ready: the pool cannot work (broken install, no memory).
_STARTUP_FAILURES = 3
_DONE = object()


def error_message(path, error: BaseException) -> str:
    """One line naming the file and the reason, for any exception raised while handling `path`."""
    path = str(path)
    message = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}".rstrip(": ")
    message = " ".join(message.splitlines())
    # a VideoError names its file (on one line even when the name holds a line break)
    names_file = getattr(error, "path", None) == path or path in message
    return message if names_file else f"{path}: {message}"


class _Raised:
    """An exception raised while producing the items (reading stdin), handed to the consumer in order."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Runs `decode(item)` for each item ahead of the consumer; iterating yields
    `(item, result, error, seconds)` in input order (see the module docstring).

    Exceptions raised while producing the items themselves (reading stdin) are re-raised in the
    consuming thread after the results before them. `close()` (also on leaving a `with` block) stops
    decoding and, with workers, ends the worker processes.
    """

    def __init__(self, items: Iterable, decode: Callable, depth: int = DEFAULT_PREFETCH, workers: int = 0):
        if depth < 1:
            raise ValueError("prefetch depth must be at least 1")
        if workers < 0:
            raise ValueError("workers must be 0 (a thread) or more (processes)")
        self._items = items
        self._decode = decode
        self._out = queue.Queue()  # bounded by the slots
        self._slots = threading.Semaphore(depth + max(workers, 1))
        self._stop = threading.Event()
        self._pool = _Pool(decode, workers, self._stop) if workers else None
        run = self._run_pool if workers else self._run_thread
        self._thread = threading.Thread(target=run, name="vqa2-prefetch", daemon=True)
        self._thread.start()

    def _take_slot(self) -> bool:
        # timed, so that close() can stop a producer waiting for room
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def _run_thread(self):
        try:
            for item in self._items:
                if not self._take_slot():
                    return
                start = time.perf_counter()
                try:
                    result, error = self._decode(item), None
                except Exception as failure:  # any decode failure is this item's result, not the end
                    result, error = None, error_message(item, failure)
                self._out.put((item, result, error, time.perf_counter() - start))
                del result
        except BaseException as failure:  # e.g. undecodable stdin: hand it to the consumer
            self._out.put(failure)
            return
        self._out.put(_DONE)

    def _run_pool(self):
        try:
            self._pool.run(self._items, self._slots, self._out.put)
        except BaseException as failure:  # workers that cannot start, or a bug here: the consumer hears of it
            self._out.put(failure)

    def __iter__(self):
        while True:
            item = self._out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            self._slots.release()
            if self._pool is not None:
                self._pool.bell.ring()  # a slot is free: the dispatcher may send out more work
            yield item
            del item

    def close(self):
        self._stop.set()
        if self._pool is not None:
            self._pool.bell.ring()
            self._thread.join(timeout=5)
            self._pool.shutdown()
        else:
            # a decode in progress cannot be interrupted; the daemon thread ends after it, unwaited
            self._thread.join(timeout=0.5)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


# --- worker processes ------------------------------------------------------------------------------


def warm_up():
    """Start the forkserver that worker processes are forked from (it imports torch and PyAV once) in the
    background, so that this happens while the caller does something else, such as loading a model."""
    from multiprocessing import forkserver

    if _context().get_start_method() == "forkserver":
        forkserver.ensure_running()


def _context():
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vqa2cli.video"])
    return context


class _Bell:
    """A self-pipe: other threads ring it to wake the dispatcher waiting on worker connections."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()  # never write to a closed descriptor, whose number may be reused
        self._closed = False

    def fileno(self):
        return self._read

    def ring(self):
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # full: it is ringing already
                pass

    def drain(self):
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self):
        with self._lock:
            self._closed = True
            os.close(self._read)
            os.close(self._write)


class _Worker:
    def __init__(self, context, decode_bytes: bytes):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, decode_bytes), name="vqa2-decode",
                                       daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.job = None  # (index, item) being decoded

    def died(self) -> str:
        """Why the process ended, in words (after it has)."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is None:
            self.process.kill()
            self.process.join()
            return "stopped answering"
        if code >= 0:
            return f"exited with status {code}"
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        if -code == signal.SIGKILL:
            return f"was killed ({name}; out of memory?)"
        return f"crashed ({name})"


class _Pool:
    """The worker processes and the dispatcher that feeds them; `run` executes in the Prefetcher's thread."""

    def __init__(self, decode: Callable, workers: int, stop: threading.Event):
        self.size = workers
        self.stop = stop
        self.bell = _Bell()
        self.workers: list[_Worker] = []
        self._decode_bytes = pickle.dumps(decode)  # here, so that an unpicklable decode fails at once
        self._lock = threading.Lock()  # shutdown() against a dispatcher still starting workers
        self._closed = False

    def _start_worker(self) -> _Worker | None:
        with self._lock:
            if self._closed:
                return None
            worker = _Worker(_context(), self._decode_bytes)
            self.workers.append(worker)
            return worker

    def run(self, items: Iterable, slots: threading.Semaphore, emit: Callable):
        """Decode `items` in the workers; `emit` gets each result in input order, then _DONE (or the
        exception that ended the items)."""
        incoming = queue.Queue(maxsize=self.size)
        threading.Thread(target=_read_items, args=(items, incoming, self.bell, self.stop), daemon=True,
                         name="vqa2-items").start()
        for _ in range(self.size):
            self._start_worker()
        retry = []  # items whose worker died before it was ready: not their fault, decode them again
        done = {}  # index -> result, waiting for the ones before it
        sent = emitted = 0
        end = None  # (index the items end at, what to emit there)
        failures = 0
        while not self.stop.is_set():
            # hand out work: an idle worker, a free slot and an item are needed
            for worker in [w for w in self.workers if w.job is None]:
                if end is not None and not retry:
                    break
                if retry:
                    job = retry.pop()
                elif slots.acquire(blocking=False):
                    try:
                        item = incoming.get_nowait()
                    except queue.Empty:
                        slots.release()
                        break
                    if isinstance(item, _Raised) or item is _DONE:
                        slots.release()
                        end = (sent, item.error if isinstance(item, _Raised) else _DONE)
                        break
                    job = (sent, item)
                    sent += 1
                else:
                    break
                try:
                    worker.conn.send(job)
                    worker.job = job
                except OSError:  # it has just died: the job goes to another one, its end is handled below
                    retry.append(job)
            while emitted in done:
                emit(done.pop(emitted))
                emitted += 1
            if end is not None and emitted == end[0]:
                emit(end[1])
                return
            waitables = {self.bell.fileno(): None}
            for worker in self.workers:
                waitables[worker.conn] = worker
                waitables[worker.process.sentinel] = worker
            for ready in wait(list(waitables), timeout=1.0):
                worker = waitables[ready]
                if worker is None:
                    self.bell.drain()
                elif worker in self.workers:  # a worker's message or its end (both may be ready)
                    failures = self._serve(worker, done, retry, failures)

    def _serve(self, worker: _Worker, done: dict, retry: list, failures: int) -> int:
        """Read what `worker` sent, or bury it and start another; returns the startup failures in a row."""
        try:
            if worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    return 0
                if message[0] == "fatal":
                    raise SetupError(f"decode worker cannot start: {message[1]}")
                index, item = worker.job
                result, error, seconds = _receive(worker.conn, message)
                done[index] = (item, result, error, seconds)
                worker.job = None
                return failures
            if worker.process.is_alive():
                return failures
        except (EOFError, OSError):  # died while sending
            pass
        reason = worker.died()
        self.workers.remove(worker)
        worker.conn.close()
        if worker.job is not None:
            index, item = worker.job
            if worker.ready:
                done[index] = (item, None, f"{item}: the decoder process {reason} while decoding this file", 0.0)
            else:
                retry.append(worker.job)
        if not worker.ready:
            failures += 1
            if failures >= _STARTUP_FAILURES:
                raise SetupError(f"decode worker processes cannot start: the last one {reason}; "
                                 f"try --workers 0 (decode in this process)")
        self._start_worker()
        return failures

    def shutdown(self):
        """End every worker now (they hold nothing worth waiting for) and reap them."""
        with self._lock:
            self._closed = True
            workers, self.workers = self.workers, []
        for worker in workers:
            if worker.process.is_alive():
                worker.process.kill()  # they ignore SIGTERM
        for worker in workers:
            worker.process.join()
            worker.conn.close()
        self.bell.close()


def _read_items(items: Iterable, incoming: queue.Queue, bell: _Bell, stop: threading.Event):
    """Move items to the dispatcher, which must not block on a slow source such as stdin."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                incoming.put(item, timeout=0.1)
                bell.ring()
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put(item):
                return
    except BaseException as failure:  # e.g. undecodable stdin
        put(_Raised(failure))
        return
    put(_DONE)


def _worker_main(conn, decode_bytes: bytes):
    """A decode worker: one job at a time from `conn`, results back the same way, until it closes."""
    # Ctrl-C, a terminal hangup or a stop signal sent to the whole process group is for the consumer to
    # handle (it ends the workers); a worker killed here would be reported as a crash of its file.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # Our stdout is the user's data stream: nothing a decoder library prints may land in it.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    try:
        decode = pickle.loads(decode_bytes)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)  # workers are the parallelism; the decoder has its own threads
    except Exception as failure:
        conn.send(("fatal", " ".join(f"{type(failure).__name__}: {failure}".split())))
        return
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the consumer is gone
            return
        index, item = job
        start = time.perf_counter()
        try:
            result, error = decode(item), None
        except Exception as failure:
            result, error = None, error_message(item, failure)
        try:
            _send(conn, index, result, error, time.perf_counter() - start)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            return
        del result


# --- results across processes: tensors through shared memory ---------------------------------------

_ALIGN = 64


class _TensorPickler(pickle.Pickler):
    """Pickles everything but tensors, which it lays out for one shared-memory file (persistent ids)."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.torch = sys.modules.get("torch")
        self.tensors = []
        self.size = 0

    def persistent_id(self, obj):
        if self.torch is None or not isinstance(obj, self.torch.Tensor):
            return None
        tensor = obj.detach().cpu().contiguous()
        offset = -(-self.size // _ALIGN) * _ALIGN
        nbytes = tensor.numel() * tensor.element_size()
        self.tensors.append((tensor, offset, nbytes))
        self.size = offset + nbytes
        return offset, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file, memory):
        super().__init__(file)
        self.memory = memory

    def persistent_load(self, pid):
        import torch

        offset, dtype_name, shape = pid
        dtype = getattr(torch, dtype_name)
        count = 1
        for size in shape:
            count *= size
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        nbytes = count * dtype.itemsize
        # the tensor keeps the mapping alive; it is unmapped when the last tensor on it is freed
        return torch.frombuffer(self.memory, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def _send(conn, index: int, result, error, seconds: float):
    if not hasattr(os, "memfd_create"):
        conn.send(("result", index, error, seconds, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), None))
        return
    buffer = io.BytesIO()
    pickler = _TensorPickler(buffer)
    pickler.dump(result)
    conn.send(("result", index, error, seconds, buffer.getvalue(), pickler.size))
    if not pickler.size:
        return
    import torch
    from multiprocessing.reduction import send_handle

    fd = os.memfd_create("vqa2-decoded", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, pickler.size)
        with mmap.mmap(fd, pickler.size) as memory:
            for tensor, offset, nbytes in pickler.tensors:
                if nbytes:
                    target = torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=offset)
                    target.copy_(tensor.view(-1).view(torch.uint8))
                    del target
        send_handle(conn, fd, None)
    finally:
        os.close(fd)


def _receive(conn, message):
    """The (result, error, seconds) of a "result" message, with its tensors mapped from shared memory."""
    _, _, error, seconds, payload, size = message
    if size is None:  # pickled whole
        return pickle.loads(payload), error, seconds
    memory = None
    if size:
        from multiprocessing.reduction import recv_handle

        fd = recv_handle(conn)
        try:
            # populated: the page faults happen here, in the dispatcher thread, not in the model's first touch
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
    return _TensorUnpickler(io.BytesIO(payload), memory).load(), error, seconds
