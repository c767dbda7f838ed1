"""Epoch time with the three netprobe monitors (defaults, every epoch) vs none, run as a user would
(a TensorBoardLogger on both sides), on two tasks by default: ``demo`` (the MLP of examples/demo.py
on 1200 digits) and ``convnet`` (a 1-D ConvNet on 4000 MNIST-1D examples); ``--tasks resnet`` adds
a ResNet-18-style 2-D CNN on 32 x 32 images (``--resnet-width``, default 16; 64 is torchvision's
ResNet-18); see ``benchmarks/_tasks.py``.

    .venv/bin/python benchmarks/epoch_overhead.py [--tasks demo,convnet] [--rounds 3] [--epochs N] [--every 5]
    .venv/bin/python benchmarks/epoch_overhead.py --quick      # about a minute (one round, fewer repetitions)

For each task it prints:

* the median epoch time without monitors and with ``SelectivityMonitor``, ``RelianceMonitor`` and
  ``ConvergenceMonitor`` (all at their defaults, read from the monitor objects, every epoch), and
  the ratio; **target <= 1.4 on both tasks**, and the ratio of the mean epochs (the monitored runs'
  media epochs included: at the default ``media_every``, one in ten) **<= 1.5**. The variants alternate over ``--rounds`` rounds, the
  first epoch of each run (set-up, first measurement) is not timed, and the spread of the per-round
  ratios is printed, with the ratio by process CPU time and that of the fastest epochs (other
  processes only add time, so on a shared machine these are the steadier figures);
* the amortized ratio with ``every_n_epochs=--every`` (mean epoch over whole measuring cycles);
* with ``--rotate K``, the ratio with ``RelianceMonitor(layers_per_measurement=K)`` (alternated
  with the other variants) and that monitor's time per measurement;
* each monitor's share: the median of its ``netprobe/time/<Monitor>`` key, in ms and as % of a
  bare epoch;
* the cost of the TensorBoard media (figures, histograms, drawn at the first measurement and every
  ``media_every``-th after it): runs with ``media_every=1`` vs ``media_every=10**9`` alternate, and
  the difference of their median epochs is the cost of a media epoch; the time inside the
  TensorBoard writer's ``add_figure``/``add_histogram`` (timed directly by wrapping the writer's
  methods) and the difference of the ``netprobe/time`` keys (what of it the keys see);
* the floor: the arithmetic the defaults need, in plain torch (the model's own modules called
  directly; no hooks, no netprobe code): for RelianceMonitor, for each monitored layer, the layers
  after it on (distinct ablation masks) x ``num_samples`` rows, the distinct masks computed from the
  monitor's ``repeats``, ``fractions`` (and ``order``) and the layer's width; plus one forward pass
  over the probe set for the other two monitors (their linear algebra left out). Best of several
  repetitions and chunk sizes. Printed as ``1 + floor / bare epoch``: no implementation of these
  defaults gets below it on this machine;
* (convnet, resnet) the peak extra memory of one RelianceMonitor measurement: torch CPU allocations made
  during the monitor's measuring hook (torch.profiler memory events, cumulative sum in time order,
  maximum), validated on known allocations; **target <= 32 MiB**.

One torch thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)). ``--device cuda`` trains on a GPU
(timings synchronize the device; the peak memory is then the CUDA allocator's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import task  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from _common import quiet_lightning  # noqa: E402

from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor  # noqa: E402

MiB = 2**20
DEVICE = torch.device("cpu")  # --device
TARGET_RATIO = 1.4  # median epoch, monitored / bare
TARGET_MEAN = 1.5  # mean epoch (media epochs included), monitored / bare
TARGET_MIB = 32.0
DEFAULT_EPOCHS = {"demo": 11, "convnet": 6, "resnet": 6}  # 1 untimed + whole every-5 cycles
QUICK_EPOCHS = {"demo": 6, "convnet": 3, "resnet": 3}


# ---------------------------------------------------------------------------------------- runs
class EpochTimer(pl.Callback):
    """Wall time of each epoch, from one epoch's start to the next (the last one to the end of
    training), so everything the epoch loop does is in it (logger writes at the epoch's end
    included); and the ``netprobe/time/*`` keys present at each epoch's end."""

    def __init__(self) -> None:
        self.starts: List[float] = []
        self.cpu: List[float] = []
        self.shares: List[Dict[str, float]] = []
        self.writer: List[float] = []  # seconds inside the SummaryWriter's media calls, per epoch
        self._writer = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync()
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self._writer = 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.shares.append({k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("netprobe/time/")})
        self.writer.append(self._writer)

    def clock_writer(self, tr: pl.Trainer) -> None:
        """Time the TensorBoard writer's media calls (figure rendering + PNG encoding, histograms):
        the instance's methods are wrapped; netprobe is not touched."""
        exp = tr.logger.experiment
        depth = [0]  # add_figure calls add_image: count the outermost call only
        for meth in ("add_figure", "add_histogram", "add_image", "add_images"):
            orig = getattr(exp, meth, None)
            if orig is None:
                continue

            def timed(*a, _orig=orig, **k):
                t0 = time.perf_counter()
                depth[0] += 1
                try:
                    return _orig(*a, **k)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        self._writer += time.perf_counter() - t0

            setattr(exp, meth, timed)

    def on_train_end(self, trainer, pl_module) -> None:
        sync()
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())

    @property
    def times(self) -> List[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]

    @property
    def cpu_times(self) -> List[float]:
        """Process CPU time of each epoch (all threads): less sensitive to other processes."""
        return [b - a for a, b in zip(self.cpu, self.cpu[1:])]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def trainer(callbacks: Sequence[pl.Callback], epochs: int, logdir: str, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), logger=pl.loggers.TensorBoardLogger(logdir, name="bench"),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="gpu" if DEVICE.type == "cuda" else "cpu", devices=1, **kw)


def run(cls: type, loader, monitors: Sequence[pl.Callback], epochs: int, logdir: str) -> EpochTimer:
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    tr = trainer([*monitors, timer], epochs, logdir)  # the timer last: it sees this epoch's keys
    timer.clock_writer(tr)
    tr.fit(cls(), loader)
    return timer


#: ``--methods``: ConvergenceMonitor's methods (None: its default)
CONVERGENCE_METHODS: Optional[Sequence[str]] = None


def three(layers: Sequence[str], rotate: Optional[int] = None, **kw) -> List[pl.Callback]:
    conv = dict(kw, methods=tuple(CONVERGENCE_METHODS)) if CONVERGENCE_METHODS else kw
    rel = dict(kw, layers_per_measurement=rotate) if rotate else kw
    return [SelectivityMonitor(layers, **kw), RelianceMonitor(layers, **rel), ConvergenceMonitor(layers, **conv)]


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(xs[0]) if len(xs) == 1 else f"{fmt.format(min(xs))} to {fmt.format(max(xs))}"


# ---------------------------------------------------------------------------------------- floor
def stages(name: str, m: torch.nn.Module) -> Tuple[List[Tuple[str, Callable]], Callable]:
    """The task's model as ``[(monitored layer, input of the stage -> that layer's output)]`` and
    the head after the last one, calling the model's own modules directly."""
    if name == "demo":
        return [("relu1", lambda x: m.relu1(m.fc1(x))), ("relu2", lambda h: m.relu2(m.fc2(h)))], m.out
    if name == "resnet":
        return ([("layer2", lambda x: m.layer2(m.layer1(m.stem(x)))), ("layer3", m.layer3), ("layer4", m.layer4)],
                lambda h: m.fc(h.mean((2, 3))))
    if name == "convnet":
        return ([("relu1", lambda x: m.relu1(m.conv1(x[:, None] if x.ndim == 2 else x))),
                 ("relu2", lambda h: m.relu2(m.conv2(h))), ("relu3", lambda h: m.relu3(m.conv3(h)))],
                lambda h: m.out(h.flatten(1)))
    raise ValueError(f"no stages for task {name!r}")


def distinct_masks(mon: RelianceMonitor, d: int) -> int:
    """Distinct ablation masks of one layer of width ``d`` under the monitor's settings: ``round(f d)``
    units are ablated at fraction ``f`` (torch.round, as the ablation code); ablating 0 or all ``d``
    units gives the same mask for every order; any other count one mask per order (random orders
    assumed to differ on their first ``k`` units, true with overwhelming probability here)."""
    orders = mon.repeats if mon.order == "random" else 1
    ks = set(torch.round(torch.tensor(list(mon.fractions), dtype=torch.float64) * d).long().tolist())
    n = (0 in ks) + (d in ks) + orders * len(ks - {0, d})
    if getattr(mon, "noise", False):  # noise curve: every nonzero scale, every repeat (scale 0 = unablated)
        n += mon.repeats * sum(1 for s in mon.scales if s > 0)
    return n


def best_time(fn: Callable[[], None], reps: int) -> float:
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def chunked(f: Callable, h: torch.Tensor, passes: int, c: int) -> Callable[[], None]:
    """``passes`` times ``f`` over all of ``h``, ``c`` rows per call."""
    def go() -> None:
        for _ in range(passes):
            for i in range(0, h.shape[0], c):
                f(h[i: i + c])
    return go


def floor(name: str, cls: type, layers: Sequence[str], data: Dict[str, torch.Tensor], rel: RelianceMonitor, n_fwd: int, reps: int,
          chunks: Sequence[int]) -> Tuple[float, float, List[str]]:
    """(seconds of the reliance passes, seconds of one forward over the probe set, description lines)."""
    torch.manual_seed(0)
    m = cls().eval().to(DEVICE)
    st, head = stages(name, m)
    if [layer for layer, _ in st] != list(layers):
        raise RuntimeError(f"the floor's stages {[layer for layer, _ in st]} are not the task's layers {layers}")
    n = rel.num_samples if hasattr(rel, "num_samples") else 512
    x_all = data["x_train"]
    g = torch.Generator().manual_seed(0)
    x = x_all[torch.randperm(len(x_all), generator=g)[: max(n, n_fwd)]].to(DEVICE)
    lines = []
    with torch.no_grad():
        acts, h = [], x[:n]
        for _, f in st:
            h = f(h)
            acts.append(h)
        ref = m(x[:n])
        if not torch.allclose(head(h), ref, atol=1e-5):
            raise RuntimeError("the floor's stages do not reproduce the model's forward")
        rel_total = 0.0
        for i, (layer, _) in enumerate(st):
            rest = [f for _, f in st[i + 1:]]

            def tail(z, rest=rest):
                for f in rest:
                    z = f(z)
                return head(z)

            d = acts[i].shape[1]
            k = distinct_masks(rel, d)
            t = min(best_time(chunked(tail, acts[i], k, c), reps) for c in chunks if c <= n)
            rel_total += t
            lines.append(f"{layer} (d={d}): {k} distinct masks x {n} rows = {k * n} rows through the layers after it: {t * 1e3:.1f} ms")

        def full(z):
            for _, f in st:
                z = f(z)
            return head(z)

        fwd = min(best_time(chunked(full, x[:n_fwd], 1, c), reps) for c in chunks if c <= n_fwd)
    return rel_total, fwd, lines


# ---------------------------------------------------------------------------------------- memory
@contextmanager
def quiet_stderr():
    """The profiler writes start/stop lines and allocator notes to fd 2; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


_CPU_KINDS = {torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.MKLDNN, torch.autograd.DeviceType.IDEEP}


def peak_bytes(prof: profile) -> int:
    """Peak of (bytes allocated - bytes freed) over the profiled window: the profiler's raw memory
    events, in time order, cumulative sum, maximum. A block allocated before the window and freed
    inside it is not reported by the profiler, so this counts only what the window allocates."""
    ev = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() in _CPU_KINDS]
    ev.sort(key=lambda e: e.start_ns())
    s = best = 0
    for e in ev:
        s += e.nbytes()
        best = max(best, s)
    return best


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


class Window:
    """Profiles the callbacks placed between ``start`` and ``stop`` in the Trainer's list, from the
    end of the last training batch to the end of the given epochs (where the monitors measure)."""

    def __init__(self, epochs: Sequence[int]) -> None:
        self.epochs, self.peaks, self.rss, self._prof, self._q = set(epochs), {}, {}, None, None
        self.start, self.stop = _Start(self), _Stop(self)


def _last_batch(trainer, batch_idx: int) -> bool:
    return batch_idx == trainer.num_training_batches - 1


class _Start(pl.Callback):
    def __init__(self, w: Window) -> None:
        self.w = w

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch in self.w.epochs and _last_batch(trainer, batch_idx):
            self.w._q = quiet_stderr()
            self.w._q.__enter__()
            try:
                with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (peak RSS) for a cross-check
                    f.write("5")
                self.w._rss0 = rss_kib("VmRSS")
            except OSError:
                self.w._rss0 = None
            if DEVICE.type == "cuda":  # the device's allocator: its peak above what was held before
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.w._cuda0 = torch.cuda.memory_allocated()
            self.w._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.w._prof.__enter__()


class _Stop(pl.Callback):
    """Ends the window at the end of the epoch (after the callbacks before it in the list): the
    monitors measure at the last batch's end, or at the epoch's end when the batch count is unknown."""

    def __init__(self, w: Window) -> None:
        self.w = w

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.w._prof is not None:
            hwm = rss_kib("VmHWM")
            self.w._prof.__exit__(None, None, None)
            self.w._q.__exit__(None, None, None)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
                self.w.peaks[trainer.current_epoch] = torch.cuda.max_memory_allocated() - self.w._cuda0
            else:
                self.w.peaks[trainer.current_epoch] = peak_bytes(self.w._prof)
            if self.w._rss0 is not None:
                self.w.rss[trainer.current_epoch] = (hwm - self.w._rss0) * 1024
            self.w._prof = self.w._q = None


class _Allocate(pl.Callback):
    """Allocates, writes and frees a known block (validation of the window)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _last_batch(trainer, batch_idx):
            a = torch.ones(self.nbytes // 4, device=DEVICE)
            del a


def fit_window(cls: type, loader, middle: Sequence[pl.Callback], epochs: int, logdir: str, **kw) -> Window:
    w = Window(range(epochs))
    pl.seed_everything(0, verbose=False)
    try:
        trainer([w.start, *middle, w.stop], epochs, logdir, **kw).fit(cls(), loader)
    finally:
        if w._q is not None:
            w._q.__exit__(None, None, None)
    return w


def validate_peak() -> List[str]:
    def window(fn: Callable[[], None]) -> float:
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
            fn()
        return peak_bytes(p) / MiB

    def one():
        a = torch.empty(100 * MiB, dtype=torch.uint8)
        a.fill_(1)
        del a

    def seq():
        a = torch.empty(64 * MiB, dtype=torch.uint8)
        del a
        b, c = torch.ones(8 * MiB // 4), torch.ones(24 * MiB // 4)
        del b, c

    return [f"a 100 MiB tensor allocated and freed reads {window(one):.2f} MiB",
            f"64 MiB freed, then 8 + 24 MiB held together reads {window(seq):.2f} MiB (expected 64)"]


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="demo,convnet", help="comma-separated: demo, convnet, resnet")
    ap.add_argument("--resnet-width", type=int, default=None,
                    help="the resnet task's base width (default 16; 64 is torchvision's ResNet-18)")
    ap.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default per task: {DEFAULT_EPOCHS})")
    ap.add_argument("--every", type=int, default=5, help="every_n_epochs of the cheaper setting")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the alternating runs")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each floor timing (the best is kept)")
    ap.add_argument("--quick", action="store_true", help="one round, one floor repetition (about a minute)")
    ap.add_argument("--methods", default=None,
                    help="ConvergenceMonitor's methods, comma-separated (e.g. pwcca,cka; default: its default)")
    ap.add_argument("--rotate", type=int, default=None,
                    help="also time RelianceMonitor(layers_per_measurement=K) (the others at their defaults), alternated with the rest")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model trains (cuda: a GPU Trainer)")
    args = ap.parse_args()
    global DEVICE, CONVERGENCE_METHODS
    DEVICE = torch.device(args.device)
    CONVERGENCE_METHODS = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.quick:
        args.rounds, args.reps = 1, 1
    if (args.epochs is not None and args.epochs < 2) or args.rounds < 1 or args.reps < 1 or args.every < 1:
        ap.error("--epochs must be >= 2 (the first epoch is not timed); --rounds, --reps, --every >= 1")
    if args.resnet_width:
        import _tasks

        _tasks.RESNET_WIDTH = args.resnet_width
    torch.set_num_threads(1)
    quiet_lightning()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    t_start = time.perf_counter()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"netprobe epoch overhead: torch {torch.__version__}, pytorch_lightning {pl.__version__}, "
          f"torch threads = {torch.get_num_threads()} (set to 1 on purpose; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if DEVICE.type == 'cuda' else ''}, TensorBoardLogger on every run, rounds = {args.rounds}{' (--quick)' if args.quick else ''}")
    s, r, c = three(["layer"])  # settings only: nothing is resolved before a fit
    print(f"monitor defaults (read from the objects): every_n_epochs={r.every_n_epochs}, num_samples={r.num_samples}, "
          f"batch_size={r.batch_size}, media_every={r.media_every}; Reliance repeats={r.repeats}, order={r.order}, "
          f"mode={r.mode}, fractions={[round(f, 3) for f in r.fractions]}, noise={getattr(r, 'noise', None)}, "
          f"max_batch={getattr(r, 'max_batch', None)}; Convergence methods={list(getattr(c, 'methods', []))}; "
          f"Selectivity mutual_info={getattr(s, 'mutual_info', None)}")
    summary = []
    with tempfile.TemporaryDirectory() as logdir:
        for name in names:
            t_task = time.perf_counter()
            cls, loader, layers, data = task(name)
            epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS).get(name, 6)
            measure_cheap = epochs - 1 >= args.every
            print(f"\n== {name}: {cls.__name__}, {len(loader.dataset)} training examples, batch {loader.batch_size}, "
                  f"{len(loader)} batches/epoch, layers {layers}; {epochs} epochs per run, first untimed; "
                  f"load average {os.getloadavg()[0]:.2f}")
            base, full, cheap, shares, per_round, cpu_b, cpu_f = [], [], [], [], [], [], []
            rotated: List[float] = []
            rot_shares: List[Dict[str, float]] = []
            for _ in range(args.rounds):  # alternate the variants so machine drift hits all of them
                b = run(cls, loader, [], epochs, logdir)
                f = run(cls, loader, three(layers), epochs, logdir)
                base += b.times[1:]
                full += f.times[1:]
                cpu_b += b.cpu_times[1:]
                cpu_f += f.cpu_times[1:]
                shares += f.shares[1:]
                per_round.append(med(f.times[1:]) / med(b.times[1:]))
                if measure_cheap:
                    cheap += run(cls, loader, three(layers, every_n_epochs=args.every), epochs, logdir).times[1:]
                if args.rotate:
                    rt = run(cls, loader, three(layers, rotate=args.rotate), epochs, logdir)
                    rotated += rt.times[1:]
                    rot_shares += rt.shares[1:]
            tb, tf = med(base), med(full)
            ratio = tf / tb
            print(f"median epoch: no monitors {tb * 1e3:.1f} ms | all three, every epoch {tf * 1e3:.1f} ms "
                  f"(mean {statistics.mean(full) * 1e3:.1f} ms, media epochs included); {len(base)} epochs each")
            print(f"ratio (defaults, every epoch): {ratio:.2f}   per round {spread(per_round)}   target <= {TARGET_RATIO}: "
                  f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}   (by process CPU time: {med(cpu_f) / med(cpu_b):.2f})")
            mean_ratio = statistics.mean(full) / statistics.mean(base)
            print(f"ratio of the mean epochs (media epochs included): {mean_ratio:.2f}   target <= {TARGET_MEAN}: "
                  f"{'met' if mean_ratio <= TARGET_MEAN else 'NOT met'}")
            fast = min(full) / min(base)  # other processes only ever add time: the fastest epochs are the least disturbed
            print(f"fastest epochs: no monitors {min(base) * 1e3:.1f} ms | all three {min(full) * 1e3:.1f} ms -> ratio {fast:.2f} "
                  f"(least disturbed by other processes)")
            if measure_cheap:
                amort = statistics.mean(cheap) / statistics.mean(base)
                whole = (epochs - 1) % args.every == 0
                print(f"ratio (every_n_epochs={args.every}, mean epoch over epochs 1-{epochs - 1}, its first measurement "
                      f"draws media): {amort:.2f}"
                      + ("" if whole else f"  (epochs 1-{epochs - 1} are not whole cycles of {args.every}: approximate)"))
            else:
                amort = 1 + (statistics.mean(full) - statistics.mean(base)) / args.every / tb
                print(f"ratio (every_n_epochs={args.every}), estimated as 1 + (mean monitored - mean bare epoch) / {args.every} "
                      f"/ bare (too few epochs to run it): {amort:.2f}")
            if args.rotate:
                groups = -(-len(layers) // args.rotate)
                t_rel = med([sh["RelianceMonitor"] for sh in rot_shares if "RelianceMonitor" in sh])
                print(f"ratio with RelianceMonitor(layers_per_measurement={args.rotate}) ({groups} groups: each layer measured "
                      f"every {groups} epochs; median epoch): {med(rotated) / tb:.2f}; mean epochs {statistics.mean(rotated) / statistics.mean(base):.2f}; "
                      f"RelianceMonitor {t_rel * 1e3:.1f} ms/measurement")
            for mon in sorted({k for sh in shares for k in sh}):
                t = med([sh[mon] for sh in shares if mon in sh])
                print(f"  {mon:<20} {t * 1e3:8.1f} ms/measurement = {t / tb * 100:6.1f} % of a bare epoch")

            # media: media_every=1 vs never (after the first measurement, which is not timed)
            m_on, m_off, c_on, c_off, k_on, k_off, w_on, m_round = [], [], [], [], [], [], [], []
            for _ in range(args.rounds):
                on = run(cls, loader, three(layers, media_every=1), epochs, logdir)
                off = run(cls, loader, three(layers, media_every=10**9), epochs, logdir)
                m_on += on.times[1:]
                m_off += off.times[1:]
                c_on += on.cpu_times[1:]
                c_off += off.cpu_times[1:]
                k_on += [sum(sh.values()) for sh in on.shares[1:]]
                k_off += [sum(sh.values()) for sh in off.shares[1:]]
                w_on += on.writer[1:]
                m_round.append(med(on.times[1:]) - med(off.times[1:]))
            media, media_cpu = med(m_on) - med(m_off), med(c_on) - med(c_off)
            me = r.media_every
            print(f"media (TensorBoard figures + histograms of all three monitors; media_every=1 vs 10**9, {len(m_on)} epochs each):")
            print(f"  median epoch {med(m_on) * 1e3:.1f} ms with media vs {med(m_off) * 1e3:.1f} ms without: {media * 1e3:+.1f} ms per media "
                  f"epoch (per round {spread([x * 1e3 for x in m_round], '{:+.1f}')} ms; by process CPU time {media_cpu * 1e3:+.1f} ms) "
                  f"= {media / tb * 100:.0f} % of a bare epoch; fastest epochs {min(m_on) * 1e3:.1f} vs {min(m_off) * 1e3:.1f} ms: "
                  f"{(min(m_on) - min(m_off)) * 1e3:+.1f} ms")
            print(f"  of which in the SummaryWriter's add_figure/add_histogram (rendering, PNG encoding; timed directly): "
                  f"{med(w_on) * 1e3:.1f} ms (fastest {min(w_on) * 1e3:.1f}); figure preparation inside the keys "
                  f"(difference of their sums, noisy): medians {(med(k_on) - med(k_off)) * 1e3:+.1f} ms, fastest "
                  f"{(min(k_on) - min(k_off)) * 1e3:+.1f} ms")
            print(f"  at the default media_every={me} (media at the first measurement and every {me}th after it): "
                  f"{media / me * 1e3:+.1f} ms per measurement amortized = {media / me / tb * 100:.1f} % of a bare epoch")

            # floor
            n_fwd = max(getattr(s_, "num_samples", 512) for s_ in three(layers)[::2])
            chunks = (64, 256) if args.quick else (32, 64, 128, 256, 512)
            rel = RelianceMonitor(layers)
            t_rel, t_fwd, lines = floor(name, cls, layers, data, rel, n_fwd, args.reps, chunks)
            fl = t_rel + t_fwd
            print(f"floor (plain torch, model's modules called directly, eval, no_grad; best of {args.reps} x chunk sizes {list(chunks)} rows):")
            for line in lines:
                print(f"  reliance {line}")
            print(f"  one forward over the {n_fwd}-example probe set (Selectivity + Convergence; their linear algebra left out): {t_fwd * 1e3:.1f} ms")
            print(f"  total {fl * 1e3:.1f} ms = {fl / tb * 100:.0f} % of a bare epoch -> floor ratio {1 + fl / tb:.2f} "
                  f"(reliance alone {1 + t_rel / tb:.2f}); best against best, i.e. against the fastest bare epoch "
                  f"({min(base) * 1e3:.1f} ms): {1 + fl / min(base):.2f}")

            mem = None
            if name in ("convnet", "resnet"):
                w = fit_window(cls, loader, [RelianceMonitor(layers)], 2, logdir)
                v = fit_window(cls, loader, [_Allocate(100 * MiB)], 1, logdir, limit_train_batches=2)
                mem = max(w.peaks.values()) / MiB
                print("peak extra memory of one RelianceMonitor measurement (" + (
                      "CUDA allocator: max_memory_allocated above memory_allocated before the measuring hook):" if DEVICE.type == "cuda" else
                      "torch CPU allocations made inside the monitor's measuring hook, torch.profiler memory events summed in "
                      "time order, maximum):"))
                print("  " + ", ".join(f"epoch {ep} {'(first, media)' if ep == 0 else '(non-media)'} {p / MiB:.2f} MiB"
                                       for ep, p in sorted(w.peaks.items()))
                      + f"   target <= {TARGET_MIB:.0f} MiB: {'met' if mem <= TARGET_MIB else 'NOT met'}")
                if w.rss:
                    print("  cross-check, peak RSS above RSS before (whole process, includes non-torch memory; reads lower "
                          "when the measurement reuses memory freed earlier): "
                          + ", ".join(f"epoch {ep} {x / MiB:.1f} MiB" for ep, x in sorted(w.rss.items())))
                print(f"  validation: a callback allocating 100 MiB in the same window reads {v.peaks[0] / MiB:.2f} MiB; "
                      + "; ".join(validate_peak()))
            summary.append((name, tb, ratio, per_round, fast, mean_ratio, amort, 1 + fl / tb, media, med(w_on), mem))
            print(f"({name}: {time.perf_counter() - t_task:.0f} s)")

    print(f"\nsummary (ratio = median epoch with the three monitors at defaults / without, target <= {TARGET_RATIO}; "
          f"mean = the mean epochs' ratio, media included, target <= {TARGET_MEAN}):")
    for name, tb, ratio, per_round, fast, mean_ratio, amort, flr, media, wr, mem in summary:
        print(f"  {name:<8} bare {tb * 1e3:6.1f} ms  ratio {ratio:.2f} (rounds {spread(per_round)}; fastest epochs {fast:.2f})  "
              f"mean {mean_ratio:.2f}  floor {flr:.2f}  "
              f"every_n_epochs={args.every} {amort:.2f}  media epoch {media * 1e3:+.0f} ms (writer {wr * 1e3:.0f} ms)"
              + ("" if mem is None else f"  reliance peak {mem:.1f} MiB (target <= {TARGET_MIB:.0f})"))
    print(f"total {time.perf_counter() - t_start:.0f} s; load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
