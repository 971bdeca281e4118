"""The restricted head against materialising the logits, side by side.

    python benchmarks/bench_restricted.py             # paper preset + embedded trainer; writes results/
    python benchmarks/bench_restricted.py --quick     # seconds: small sizes, writes nothing (CI)

(a) loss: forward + backward at the paper preset: V = 151,936 (Qwen2.5), B·T = 128 × 32
    = 4,096 positions of rollouts of Movies_and_TV titles (padded with "\\n", as in
    bench_subtb.py), H = 1,536 (float32 on CPU, bfloat16 on CUDA):
    flowkern.linear_subtb_loss(hidden, W) against flowkern.subtb_loss(hidden @ W.T), peak
    memory above the inputs and time, for the trie policy and the full softmax (process
    form) and the Flower form, with W trained (then both paths also produce a V × H dW) and
    frozen (LoRA: no dW), both on --backend (the section names the one that ran).
(b) anchors: the same head work, a log-sum-exp over V at the R rows the loss reads and its
    gradient: flowkern's full-softmax log-likelihood (the trainer's SFT term) against the
    materialised logits with torch's cross_entropy and fused linear cross-entropy kernels:
    Liger's and Cut Cross-Entropy's (CUDA only), and on CPU Cut Cross-Entropy's
    impl="torch_compile"; flowkern's full-softmax SubTB loss is a row too.  Ratios are to
    the first row; a row names what is missing when the package (pip install
    "flowkern[bench]") or CUDA is.
(c) trainer: the embedded default of `python -m flowkern.train`: one optimiser step of its
    train_step (32 rollouts, the forward, SFT + SubTB, backward, AdamW) with the restricted
    head, with the restricted head and --sft-normalize trie, and with --full-head, taking
    turns on copies of one model; and rollout tokens/s of flowkern.sample both ways (the
    trainer's 32 rollouts, and the evaluator's 500 samples from one prompt).
Each section runs once per --threads value (torch.set_num_threads), headed by the time of a
64 × 64 matrix product at that setting: when other jobs hold the cores, a second thread makes
every parallel operator wait for one (milliseconds instead of microseconds).
"""

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flowkern  # noqa: E402
from benchmarks.bench_subtb import trajectories  # noqa: E402
from benchmarks.common import (backend_that_runs, environment, fix_malloc_threshold, flower_trainer,  # noqa: E402
                               peak_memory, sections_markdown, time_call, trainer_step, write_results)
from flowkern import eager  # noqa: E402
from flowkern.data import load_task  # noqa: E402
from flowkern.models import load_model  # noqa: E402

PRESETS = {"paper": (128, 32, 1536, 151_936), "quick": (4, 8, 64, 4_096)}  # B, T, H, V
LOSSES = [("trie policy (process form)", dict(normalize="trie"), (False, True)),
          ("full softmax (process form)", dict(normalize="full"), (False, True)),
          ("Flower form (full softmax)", dict(form="flower"), (False,))]
SECTIONS = ("loss", "anchors", "trainer")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one run of each")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after a first one (memory, warm-up)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="of both loss paths (auto: Triton on CUDA)")
    parser.add_argument("--print-only", action="store_true", help="print the tables, write no result files")
    parser.add_argument("--quick", action="store_true", help="small sizes, no result files")
    args = parser.parse_args()
    preset = "quick" if args.quick else "paper"
    if args.quick:
        args.threads, args.repeats, args.print_only = args.threads[:1], 1, True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()  # the code that runs is the code at the start
    fix_malloc_threshold()
    batch, steps, hidden_size, vocab = PRESETS[preset]
    shape = f"V = {vocab:,}, B·T = {batch} × {steps} = {batch * steps:,}, H = {hidden_size:,}"
    backend = backend_that_runs(args.backend, device)
    sections, rows, targets = [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        setting = f"{threads} thread(s), a 64 × 64 matmul in {operator_latency() * 1e6:,.0f} µs"
        added = []
        if "loss" in args.sections:
            loss_rows, read = bench_loss(PRESETS[preset], device, args.repeats, args.backend)
            added.append((f"Loss forward + backward, {setting}, backend {backend} (the full softmax's chunks are "
                          f"matrix products on either): {shape} ({read:,} positions up to the rows' termination "
                          f"tokens)", loss_rows))
        if "anchors" in args.sections:
            added.append((f"Anchors: the head's log-sum-exp over V and its gradient at the rows the loss reads, "
                          f"{setting}: {shape}", bench_anchors(PRESETS[preset], device, args.repeats, args.backend)))
        if "trainer" in args.sections:
            step_rows, rollout_rows = bench_trainer(device, args.repeats, args.quick)
            added += [(f"Embedded trainer step, {setting}", step_rows),
                      (f"Rollouts (flowkern.sample), {setting}", rollout_rows)]
        if "loss" in args.sections and "trainer" in args.sections:
            dw_bytes = vocab * hidden_size * (2 if device.type == "cuda" else 4)
            targets += target_lines(threads, loss_rows, step_rows, dw_bytes)
        sections += added
        rows += [dict(row, section=title) for title, part in added for row in part]
    body = sections_markdown(sections)
    if targets:
        body += "\n\n## Targets of issue 7\n\n" + "\n".join(targets)
    body += (f"\n\nPeak memory is the {'CUDA allocation' if device.type == 'cuda' else 'resident set'} above what "
             f"was in use before the call (inputs excluded, gradients included), sampled every millisecond; times "
             f"are medians of {args.repeats} calls after a first one.  Command: python benchmarks/bench_restricted.py "
             f"{' '.join(sys.argv[1:])}")
    if args.print_only:
        print(body)
        return
    write_results("restricted", "flowkern benchmark: the restricted head", env, body, rows)


def operator_latency():
    """Median seconds of a 64 × 64 float32 matrix product on the CPU."""
    a = torch.randn(64, 64)
    return time_call(lambda: a @ a, repeats=50, warmup=5)["median_s"]


# ---- (a) the loss --------------------------------------------------------------------------------

def head_inputs(preset, device):
    """(hidden (B, T, H), weight (V, H), trie, tokens (B, T)) on `device`, bfloat16 on CUDA."""
    batch, steps, hidden_size, vocab = preset
    catalogue, tokens = trajectories(batch, steps, vocab)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, steps, hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(device, dtype)
    return hidden, weight, catalogue.trie().to(device), tokens.to(device)


def bench_loss(preset, device, repeats, backend):
    """Rows of the loss table, and the number of positions the loss reads."""
    hidden, weight, trie, tokens = head_inputs(preset, device)
    rows = []
    for label, options, frozen_too in LOSSES:
        options = dict(options, backend=backend)
        paths = {"materialised": lambda h, w: flowkern.subtb_loss(h @ w.T, trie, tokens=tokens, **options),
                 "restricted": lambda h, w: flowkern.linear_subtb_loss(h, w, trie, tokens=tokens, **options)}
        for frozen in frozen_too:
            measured = {}
            for path, loss_fn in paths.items():
                measured[path] = _measure(_fwd_bwd(loss_fn, hidden, weight, frozen), device, repeats)
            (value, peak, timing), (want, want_peak, want_timing) = measured["restricted"], measured["materialised"]
            rows.append({"loss": label, "W": "frozen" if frozen else "trained",
                         "materialised s": _seconds(want_timing), "restricted s": _seconds(timing),
                         "time ratio": f"{want_timing['median_s'] / timing['median_s']:.1f}x",
                         "materialised peak": _mib(want_peak), "restricted peak": _mib(peak),
                         "memory ratio": f"{want_peak / max(peak, 1):.1f}x",
                         "loss values agree to": f"{abs(value - want) / abs(want):.1e}"})
    return rows, int(trie.walk(tokens).length.add(1).sum())


def _measure(run, device, repeats):
    """(value of a first call, its peak memory, timing of `repeats` more)."""
    peak = peak_memory(run, device)
    return run(), peak, time_call(run, repeats=repeats, warmup=0)


# ---- (b) anchors ---------------------------------------------------------------------------------

def bench_anchors(preset, device, repeats, backend):
    """flowkern's full-softmax head (SubTB) against fused linear cross-entropy on its R rows."""
    hidden, weight, trie, tokens = head_inputs(preset, device)
    b, t = eager.used_rows(trie.walk(tokens).length, tokens.shape[1])
    rows_hidden, targets = hidden[b, t].contiguous(), tokens[b, t].long()
    cuda = device.type == "cuda"
    anchors = [("flowkern.linear_sequence_log_probs, full softmax (the SFT term)", None, True, hidden,
                lambda h, w: -flowkern.linear_sequence_log_probs(h, w, trie, tokens=tokens, normalize="full").sum()),
               ("flowkern.linear_subtb_loss, full softmax (process form)", None, True, hidden,
                lambda h, w: flowkern.linear_subtb_loss(h, w, trie, tokens=tokens, normalize="full", backend=backend)),
               ("materialised logits, torch cross_entropy", None, True, rows_hidden,
                lambda h, w: torch.nn.functional.cross_entropy(h @ w.T, targets, reduction="sum")),
               ("Liger fused linear cross-entropy", "liger_kernel", cuda, rows_hidden,
                lambda h, w: _liger()(h, w, targets)),
               ("Cut Cross-Entropy, impl='cce' (its default gradient filter)", "cut_cross_entropy", cuda, rows_hidden,
                lambda h, w: _cce()(h, w, targets, impl="cce")),
               ("Cut Cross-Entropy, impl='torch_compile' (materialises the logits)", "cut_cross_entropy",
                not cuda, rows_hidden, lambda h, w: _cce()(h, w, targets, impl="torch_compile"))]
    rows, flowkern_seconds = [], {}
    for label, package, runs_here, inputs, loss_fn in anchors:
        if package and importlib.util.find_spec(package) is None:
            rows.append({"anchor": label, "W": f"skipped: {package} not installed"})
            continue
        if not runs_here:  # the kernels need CUDA; on CUDA, (a)'s materialised path stands for torch_compile's
            rows.append({"anchor": label, "W": "skipped: no CUDA" if not cuda else "skipped on CUDA: see (a)"})
            continue
        for frozen in (False, True):
            try:
                run = _fwd_bwd(loss_fn, inputs, weight, frozen)
                run()  # compiles what compiles, so that the peak is the call's own
                _, peak, timing = _measure(run, device, repeats)
            except Exception as error:  # an anchor that cannot run is reported, not hidden
                rows.append({"anchor": label, "W": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"})
                break
            if frozen not in flowkern_seconds:  # the first row, the SFT term, is what the others are set against
                flowkern_seconds[frozen] = timing["median_s"]
            ratio = timing["median_s"] / flowkern_seconds[frozen] if frozen in flowkern_seconds else None
            rows.append({"anchor": label, "W": "frozen" if frozen else "trained", "s": _seconds(timing),
                         "vs flowkern": f"{ratio:.2f}x" if ratio else "n/a", "peak": _mib(peak)})
    return rows


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def _fwd_bwd(loss_fn, hidden, weight, frozen):
    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_(not frozen)
        loss = loss_fn(h, w)
        loss.backward()
        return loss.item()
    return run


def _seconds(timing):
    return f"{timing['median_s']:.3g} ({timing['min_s']:.3g}-{timing['max_s']:.3g})"


def _mib(size):
    return f"{size / 2**20:,.0f} MiB"


# ---- (c) the embedded trainer --------------------------------------------------------------------

STEPS = [("restricted head (default)", {}), ("restricted head, --sft-normalize trie", {"sft_normalize": "trie"}),
         ("full head (--full-head)", {"full_head": True})]


def bench_trainer(device, repeats, quick):
    """Rows of the trainer-step table and of the rollout table."""
    batch = 4 if quick else 32
    loaded = load_model(None, seed=0)
    task = load_task(None, loaded.tokenizer)
    trie = task.trie().to(device)
    setups = {name: flower_trainer(copy.deepcopy(loaded.model).to(device), task, per_device_train_batch_size=batch,
                                   **options) for name, options in STEPS}
    seconds = {name: [] for name in setups}
    for step in range(1 + max(repeats, 3)):  # the setups take turns; step 0 warms up
        for name, trainer in setups.items():
            start = time.perf_counter()
            trainer_step(trainer)
            if step:
                seconds[name].append(time.perf_counter() - start)
    full = statistics.median(seconds[STEPS[-1][0]])
    step_rows = [{"step": name, "median s": f"{statistics.median(times):.3f}",
                  "min-max s": f"{min(times):.3f}-{max(times):.3f}",
                  "full / this": f"{full / statistics.median(times):.1f}x"} for name, times in seconds.items()]
    model = setups[STEPS[0][0]].model
    model.eval()
    prompt = task.train[0].prompt
    rollout_rows = []
    for label, prompts, count in ((f"trainer: {batch} prompts x 1", [prompt] * batch, 1),
                                  (f"evaluation: 1 prompt x {50 if quick else 500}", [prompt], 50 if quick else 500)):
        measured = {}
        for restricted in (True, False):
            def run():
                return flowkern.sample(model, prompts, trie, num_samples=count, temperature=1.2,
                                       generator=torch.Generator().manual_seed(0), restricted_head=restricted)
            measured[restricted] = (int(run().lengths.sum()), time_call(run, repeats=max(repeats, 3), warmup=0))
        for restricted, (tokens, timing) in measured.items():
            rate = tokens / timing["median_s"]
            rollout_rows.append({"rollouts": label, "head": "restricted" if restricted else "full",
                                 "tokens": tokens, "median s": f"{timing['median_s']:.3f}", "tokens/s": f"{rate:,.0f}",
                                 "vs full": f"{measured[False][1]['median_s'] / timing['median_s']:.1f}x"})
    return step_rows, rollout_rows


def target_lines(threads, loss_rows, step_rows, dw_bytes):
    """Where the figures stand against the issue's targets (benchmark figures, not tests)."""
    def ratio(text):
        return float(text.rstrip("x"))

    memory = {f"{row['loss']}, W {row['W']}": ratio(row["memory ratio"]) for row in loss_rows}
    trie_time = [ratio(row["time ratio"]) for row in loss_rows if row["loss"].startswith("trie")]
    step = ratio(step_rows[0]["full / this"])
    lines = [f"- {threads} thread(s), loss peak memory at least 10x below the materialised path: "
             + "; ".join(f"{name} {value:.1f}x ({'met' if value >= 10 else 'not met'})" for name, value in memory.items())
             + f".  With W trained both paths return its V × H gradient, {_mib(dw_bytes)} of the restricted "
               f"path's peak",
             f"- {threads} thread(s), trie-policy loss time at least 3x lower: "
             + "; ".join(f"{value:.1f}x ({'met' if value >= 3 else 'not met'})" for value in trie_time),
             f"- {threads} thread(s), embedded trainer step at least 5x faster with the restricted head: {step:.1f}x "
             f"({'met' if step >= 5 else 'not met'}; with --sft-normalize trie "
             f"{ratio(step_rows[1]['full / this']):.1f}x)"]
    return lines


if __name__ == "__main__":
    main()
