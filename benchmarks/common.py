"""Timing, memory and reporting shared by the benchmarks: every figure comes from one run
that times the alternatives side by side on the same inputs, and is reported with the
machine, its load, the library versions and the git commit."""

import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_call(fn, repeats=10, warmup=2, setup=None):
    """Median, min and max wall time of fn() in seconds (CUDA synchronised when present);
    setup(), if given, runs untimed before every call (e.g. to refill what fn overwrites)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    setup = setup or (lambda: None)
    for _ in range(warmup):
        setup()
        fn()
    sync()
    times = []
    for _ in range(repeats):
        setup()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def environment():
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here).stdout.strip()
        except OSError:  # no git (a bare GPU machine)
            return ""

    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + (
        "+uncommitted changes" if git("status", "--porcelain", "--", "..", ":!results") else "")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    try:
        triton_version = importlib.metadata.version("triton")  # without importing it (TRITON_INTERPRET)
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "triton": triton_version, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "commit": commit, "load_average": [round(x, 2) for x in os.getloadavg()]}


def backends(device):
    """{backend: the words that name it} of the subtb_loss backends that run on `device`:
    "torch" always, "triton" on CUDA or, on CPU, under the Triton interpreter."""
    found = {"torch": "PyTorch"}
    try:
        from flowkern import kernels
    except ImportError:  # no triton
        return found
    if device.type == "cuda":
        found["triton"] = "Triton"
    elif kernels.INTERPRETED:
        found["triton"] = "Triton interpreter"
    return found


def backend_that_runs(backend, device):
    """"torch" or "triton": what backend=`backend` ("auto" resolved as subtb_loss does) runs on `device`."""
    from flowkern import eager
    from flowkern.ops import _backend

    return "torch" if _backend(backend, device) is eager else "triton"


def peak_memory(fn, device):
    """Peak memory of one call of fn above what was in use before it, in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _rss()) - before


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fix_malloc_threshold():
    """Large blocks from mmap, so that freed memory leaves the resident set (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except OSError:
        pass


def markdown_table(rows, columns=None):
    """Rows (dicts) as a markdown table; columns default to every key, in first-seen order."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def sections_markdown(sections):
    """(title, rows) pairs as markdown sections, one table each."""
    return "\n\n".join(f"## {title}\n\n{markdown_table(rows)}" for title, rows in sections)


def command_note(note):
    """`note` (a paragraph, or empty), then the command line that is running, quoted to rerun."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(os.path.dirname(RESULTS)))
    command = " ".join(f"'{a}'" if " " in a else a for a in sys.argv[1:])
    return (note + "\n\n" if note else "") + f"Command: python {script} {command}"


def result_name(prefix, env):
    """<prefix>-<device>-<date>, device "cpu" or "gpu-<name>": the name of a results file."""
    device = "cpu" if env["device"].startswith("cpu") else "gpu-" + env["device"].replace(" ", "_")
    return "-".join(part for part in (prefix, device, env["date"]) if part)


def environment_line(env):
    """The machine, versions, commit and load of `env` (environment()) in one line."""
    versions = f"torch {env['torch']}" + (f", triton {env['triton']}" if env.get("triton") else "")
    return f"{env['date']}, {env['device']}, {versions} ({env['threads']} threads), commit {env['commit']}, " \
           f"load average {' '.join(map(str, env['load_average']))} at the start"


def write_results(prefix, title, env, body, rows):
    """Print `body` (markdown) under a heading that names the machine, and write it to
    results/<prefix>-<device>-<date>.md, with `rows` and the environment in the .json twin
    (device: "cpu" or "gpu-<name>")."""
    name = result_name(prefix, env)
    text = f"# {title}\n\n{environment_line(env)}\n\n{body.strip()}\n"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    print(text)


def flower_trainer(model, task, **options):
    """A FlowerTrainer on `model` for timing single optimiser steps (`trainer_step`): a
    temporary output directory, no reporting, the embedded model's learning rate."""
    import tempfile

    from flowkern.trainer import FlowerConfig, FlowerTrainer

    config = FlowerConfig(output_dir=tempfile.mkdtemp(prefix="flowkern-bench-"), learning_rate=3e-3,
                          report_to=["none"], disable_tqdm=True, **options)
    trainer = FlowerTrainer(model, config, task)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, which these steps bypass
    trainer.batches = iter(trainer.get_train_dataloader())
    return trainer


def trainer_step(trainer):
    """One optimiser step of `trainer` on its next batch: rollouts, forward, backward, AdamW."""
    trainer.training_step(trainer.model, next(trainer.batches))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def print_counts(what, counts, outcomes):
    """'N <what>:' then one '  outcome: count' line per outcome, in order (zeros included)."""
    print(f"{sum(counts.values())} {what}:")
    for name in outcomes:
        print(f"  {name}: {counts[name]}")
