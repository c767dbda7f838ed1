"""Cost and noise of the reliance AUC (cumulative ablation curves, `netprobe/reliance_auc`) over a
grid of RelianceMonitor settings, side by side in one run, to choose its defaults.

    .venv/bin/python benchmarks/reliance_precision.py [--quick]

ONE torch thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)); about 5-6 minutes on the 2-core
development machine at the default settings with nothing else running (more when other jobs
compete: the load average is printed), about 1 minute with --quick (a smoke test: too few draws
to decide anything). Most of the time goes to the convnet task.

For each task of `benchmarks/_tasks.py` (``demo``: MLP on digits, layers relu1-2; ``convnet``:
1-D ConvNet on MNIST-1D, layers relu1-3) the network is trained with a plain loop (Adam, lr 1e-3)
and the state of its last 4 epochs is kept. For every setting -- probe-set size ``num_samples``,
``repeats`` (random unit orders averaged), the ablation fractions, and how orders are drawn across
epochs (``fixed``: the same orders every epoch, common random numbers; ``per_epoch``: new orders
every epoch, as the monitor does today) -- it prints, for the mean AUC over the monitored layers
(what `netprobe/reliance_auc` logs):

* cost of one measurement (all layers): median wall time of several runs (time.perf_counter,
  settings interleaved) and multiply-adds (torch.utils.flop_counter.FlopCounterMode, flops / 2),
  with their ratio to today's default (512 samples, 3 repeats, 11 fractions 0, 0.1, ..., 1);
* sd over order draws (same probe set, last checkpoint);
* sd over probe sets (random training subsets, each from its own torch.Generator; orders fixed);
* epoch-to-epoch sd: sd over draws of AUC(e+1) - AUC(e) for the consecutive checkpoint pairs
  (variance averaged over the pairs), with fixed and with per-epoch orders, same probe set at both
  epochs; and the same for a frozen net (the last checkpoint twice);
* the mean AUC (fewer fractions shift it: the trapezoid over a coarser grid).

How the draws are computed (cheaply, and exactly as separate calls would give them): the AUC is
the trapezoid of the accuracy curve averaged over the orders, divided by the unablated accuracy,
which every order shares; so the AUC of ``r`` orders is the mean of the AUCs of the single orders.
For each layer, checkpoint and probe set, ``ablation_curve`` is called with a stack of M
permutations (``order=(M, d) tensor``, split into as few calls as keep its stacked pass, see
``orders_per_call``) and the union of all fraction grids, and per-order AUCs are formed for each
fraction grid; draw ``g`` of a setting with ``r`` repeats is the mean over block ``[g r, (g + 1) r)``
of the pool (M // r independent draws), averaged over the layers (each layer has its own orders). Probe sets of different sizes are nested prefixes of one random permutation of
the training set (their counts are summed from disjoint chunks). The script checks this against
direct ``ablation_curve`` calls for a few settings and prints the largest difference.

Per-epoch orders at consecutive epochs must be independent: the pool ``F`` (the fixed orders) is
evaluated at every checkpoint and a second, independent pool ``P`` at every other checkpoint; the
per_epoch change of pair (e, e+1) uses ``F`` at one epoch and ``P`` at the other.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings

os.environ["OMP_NUM_THREADS"] = "1"
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from scipy import stats  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tasks import task  # noqa: E402

from netprobe.metrics import ablation_curve  # noqa: E402

MAX_ELEMENTS = 2**20
DEFAULT = (512, 3, 11)  # today's num_samples, repeats, number of fractions (orders per_epoch)
N_CKPT = 4
SD_UNIT = 1e3  # sds printed in units of 1e-3 AUC


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def int_list(s: str):
    return [int(v) for v in s.split(",") if v]


def fraction_grid(step: float):
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise SystemExit(f"--fractions: step {step} does not divide 1")
    return tuple(i / n for i in range(n + 1))


# ----------------------------------------------------------------------------------------- stats
def sd_ci(var: float, df: int, level: float = 0.90):
    """sd and its chi-square interval (normal data) from a variance estimate with df degrees."""
    a = (1 - level) / 2
    sd = math.sqrt(var)
    return sd, math.sqrt(df * var / stats.chi2.ppf(1 - a, df)), math.sqrt(df * var / stats.chi2.ppf(a, df))


def fmt_sd(t) -> str:
    sd, lo, hi = t
    return f"{sd * SD_UNIT:5.2f} {lo * SD_UNIT:5.2f}-{hi * SD_UNIT:<5.2f}"


# ---------------------------------------------------------------------------------- measurements
def layer_width(model, layer, x, y) -> int:
    r = ablation_curve(model, layer, (x[:2], y[:2]), fractions=[0.0, 1.0], repeats=1, max_elements=MAX_ELEMENTS)
    return int(r.order.shape[1])


def orders_per_call(model, x, n_points: int) -> int:
    """How many orders one pool call may stack. ablation_curve stacks all masks of a call in one
    pass, running the layers before the ablated one once, only while at least 2 samples fit in its
    row budget (min(4096, max_elements // largest module output per input row)); with more masks
    it falls back to one sample per pass with the inputs repeated, about 10x slower per mask (no
    grid setting comes near: at most 4 x 11 masks). The pools are split to stay under it."""
    sizes = []

    def hook(_m, _a, o):
        ts = [o] if isinstance(o, torch.Tensor) else [t for t in (o if isinstance(o, (tuple, list)) else []) if isinstance(t, torch.Tensor)]
        sizes.append(sum(t.numel() for t in ts))

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hs:
            h.remove()
    budget = min(4096, MAX_ELEMENTS // max(max(sizes), 1))
    return max(1, (budget // 2 - 2) // max(n_points - 2, 1))


def pooled_counts(model, layer, x, y, orders, union, cuts, per_call):
    """Correct counts ``(len(cuts), M, K)`` of every order in ``orders`` at every fraction of
    ``union``, on the nested probe sets ``x[:c]`` for ``c`` in ``cuts`` (disjoint chunks, summed),
    in calls of at most ``per_call`` orders."""
    n_calls = -(-orders.shape[0] // per_call)
    parts, a = [], 0
    for b in cuts:
        row = []
        for o in orders.tensor_split(n_calls):
            r = ablation_curve(model, layer, (x[a:b], y[a:b]), fractions=list(union), order=o, max_elements=MAX_ELEMENTS)
            if r.count != b - a:
                raise RuntimeError("unexpected sample count")
            row.append(r.correct.double())
        parts.append(torch.cat(row))
        a = b
    return torch.stack(parts).cumsum(0)


def per_order_auc(counts, n, union, grid):
    """Per-order normalized AUC ``(M,)`` on fraction grid ``grid`` from counts ``(M, K)``."""
    idx = [union.index(f) for f in grid]
    xs = torch.tensor(grid, dtype=torch.float64)
    acc = counts[:, idx] / n
    if not torch.equal(acc[:, 0], acc[:1, 0].expand_as(acc[:, 0])):
        raise RuntimeError("unablated accuracy differs between orders")
    return torch.trapezoid(acc, xs, dim=1) / (acc[:, 0] * (xs[-1] - xs[0]))


def block_means(a_lm: torch.Tensor, r: int) -> torch.Tensor:
    """``(L, M)`` per-layer per-order AUCs -> ``(M // r,)`` mean-over-layers AUC of each draw."""
    n = a_lm.shape[1] // r
    return a_lm[:, : n * r].reshape(a_lm.shape[0], n, r).mean(2).mean(0)


def measure(model, layers, x, y, orders, grid) -> float:
    """One monitor measurement: every layer's ablation curve; mean AUC over layers."""
    return statistics.fmean(float(ablation_curve(model, l, (x, y), fractions=list(grid), order=orders[l],
                                                 max_elements=MAX_ELEMENTS).auc) for l in layers)


def peak_extra_bytes(fn) -> tuple:
    """Peak of the running sum of every CPU allocation/free event recorded by torch.profiler
    (profile_memory=True) during ``fn()``, in time order, and the net at the end."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up, lazy initialisations not counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev = []

    def walk(n):
        if n.tag == _EventType.Allocation:
            ev.append((n.start_time_ns, n.extra_fields.alloc_size))
        for c in n.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    ev.sort()
    run = peak = 0
    for _, s in ev:
        run += s
        peak = max(peak, run)
    return peak, run, len(ev)


# --------------------------------------------------------------------------------------- a task
def train(name, epochs, seed):
    cls, loader, layers, data = task(name, seed=seed)
    torch.manual_seed(seed)
    model = cls()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ckpts, losses = [], []
    for ep in range(epochs):
        model.train()
        tot, n = 0.0, 0
        for x, y in loader:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            tot, n = tot + float(loss.detach()) * len(y), n + len(y)
        losses.append(tot / n)
        if ep >= epochs - N_CKPT:
            ckpts.append(copy.deepcopy(model.state_dict()))
    models = []
    for sd in ckpts:
        m = cls()
        m.load_state_dict(sd)
        m.eval().requires_grad_(False)
        models.append(m)
    return models, layers, data, losses


def run_task(name, args, grids, settings):
    t_task = time.perf_counter()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    epochs = args.epochs_demo if name == "demo" else args.epochs_convnet
    models, layers, data, losses = train(name, epochs, args.seed)
    last = models[-1]
    t_train = time.perf_counter() - t0
    log(f"{name}: trained {epochs} epochs in {t_train:.1f} s")
    xs, ys = data["x_train"], data["y_train"]
    ntr = len(xs)
    ns_list = sorted(args.num_samples)
    nmax = ns_list[-1]
    union = sorted(set(f for g in grids.values() for f in g))
    rmax = max(args.repeats)
    M = args.pool
    task_seed = {"demo": 1, "convnet": 2}[name]

    # the fixed probe set (nested prefixes of one permutation) and the order pools
    perm = torch.randperm(ntr, generator=torch.Generator().manual_seed(10_000 * task_seed + args.seed))[:nmax]
    px, py = xs[perm], ys[perm]
    widths = {l: layer_width(last, l, px, py) for l in layers}
    per_call = orders_per_call(last, px, len(union))
    pools = {}
    for pi, pool in enumerate(("F", "P")):
        pools[pool] = {}
        for li, l in enumerate(layers):
            g = torch.Generator().manual_seed(1_000_003 * (task_seed * 10 + pi) + 101 * li + args.seed)
            pools[pool][l] = torch.stack([torch.randperm(widths[l], generator=g) for _ in range(M)])

    # per-order AUCs: pool F at every checkpoint, pool P at odd checkpoints
    t0 = time.perf_counter()
    auc = {}  # (pool, ckpt) -> {ns: {grid: (L, M)}}
    base_acc = {}
    evals = [("F", c) for c in range(N_CKPT)] + [("P", c) for c in range(1, N_CKPT, 2)]
    for pool, c in evals:
        per_layer = [pooled_counts(models[c], l, px, py, pools[pool][l], union, ns_list, per_call) for l in layers]
        auc[pool, c] = {ns: {gn: torch.stack([per_order_auc(cnt[i], ns, union, g) for cnt in per_layer])
                             for gn, g in grids.items()} for i, ns in enumerate(ns_list)}
        if pool == "F":
            base_acc[c] = {ns: float(per_layer[0][i, 0, 0]) / ns for i, ns in enumerate(ns_list)}
        log(f"{name}: pool {pool} at checkpoint {c} done ({time.perf_counter() - t0:.0f} s)")
    t_pools = time.perf_counter() - t0

    # sd over probe sets: Q independent probe sets, orders fixed (first rmax orders of F)
    t0 = time.perf_counter()
    probe = {ns: {gn: [] for gn in grids} for ns in ns_list}  # -> list over q of (L, rmax)
    for q in range(args.probe_sets):
        pq = torch.randperm(ntr, generator=torch.Generator().manual_seed(10_000 * task_seed + 1000 + q))[:nmax]
        per_layer = [pooled_counts(last, l, xs[pq], ys[pq], pools["F"][l][:rmax], union, ns_list, per_call) for l in layers]
        for i, ns in enumerate(ns_list):
            for gn, g in grids.items():
                probe[ns][gn].append(torch.stack([per_order_auc(cnt[i], ns, union, g) for cnt in per_layer]))
    t_probe = time.perf_counter() - t0
    log(f"{name}: {args.probe_sets} probe sets done in {t_probe:.0f} s")

    # check the pooled draws against direct ablation_curve calls
    checks = [s for s in [DEFAULT, (256, 1, 6), (128, 2, 5)] if s in settings]
    max_diff, frozen_fixed_direct = 0.0, None
    for ns, r, k in checks:
        gn = k
        for gi in range(min(2, M // r)):
            orders = {l: pools["F"][l][gi * r:(gi + 1) * r] for l in layers}
            direct = measure(last, layers, px[:ns], py[:ns], orders, grids[gn])
            pooled = float(block_means(auc["F", N_CKPT - 1][ns][gn], r)[gi])
            max_diff = max(max_diff, abs(direct - pooled))
            if (ns, r, k) == DEFAULT and gi == 0:
                again = measure(last, layers, px[:ns], py[:ns], orders, grids[gn])
                frozen_fixed_direct = again - direct

    # cost: MACs (one counted run each; also the warm-up), then interleaved timing
    t0 = time.perf_counter()
    cost = {}
    ord_cost = {r: {l: pools["F"][l][:r] for l in layers} for r in args.repeats}
    for s in settings:
        ns, r, k = s
        with FlopCounterMode(display=False) as fc:
            measure(last, layers, px[:ns], py[:ns], ord_cost[r], grids[k])
        cost[s] = {"macs": fc.get_total_flops() / 2, "t": []}
    for _ in range(args.reps):
        for s in settings:
            ns, r, k = s
            tt = time.perf_counter()
            measure(last, layers, px[:ns], py[:ns], ord_cost[r], grids[k])
            cost[s]["t"].append(time.perf_counter() - tt)
    for s in settings:
        cost[s]["ms"] = 1e3 * statistics.median(cost[s]["t"])
    t_cost = time.perf_counter() - t0
    log(f"{name}: cost of {len(settings)} settings x {args.reps} reps in {t_cost:.0f} s")

    # statistics per setting
    rows = {}
    last_c = N_CKPT - 1
    for s in settings:
        ns, r, k = s
        gn = k
        fixed = [block_means(auc["F", c][ns][gn], r) for c in range(N_CKPT)]
        nd = fixed[0].numel()
        v_ord = float(fixed[last_c].var())
        pq = torch.stack([a[:, :r].mean(1).mean(0) for a in probe[ns][gn]])
        v_probe = float(pq.var())
        d_fixed = [fixed[c + 1] - fixed[c] for c in range(N_CKPT - 1)]
        on = {c: (block_means(auc["P", c][ns][gn], r) if c % 2 else fixed[c]) for c in range(N_CKPT)}
        d_pe = [on[c + 1] - on[c] for c in range(N_CKPT - 1)]
        v_fixed = statistics.fmean(float(d.var()) for d in d_fixed)
        v_pe = statistics.fmean(float(d.var()) for d in d_pe)
        frozen_pe = block_means(auc["P", last_c][ns][gn], r) - fixed[last_c]
        frozen_fixed = fixed[last_c] - fixed[last_c]
        npairs = N_CKPT - 1
        rows[s] = {
            "ms": cost[s]["ms"], "macs": cost[s]["macs"], "draws": nd,
            "mean": float(auc["F", last_c][ns][gn].mean()),
            "ord": sd_ci(v_ord, nd - 1), "probe": sd_ci(v_probe, len(pq) - 1),
            "fixed": sd_ci(v_fixed, npairs * (nd - 1)), "per_epoch": sd_ci(v_pe, npairs * (nd - 1)),
            "frozen_pe": sd_ci(float(frozen_pe.var()), nd - 1), "frozen_fixed": float(frozen_fixed.abs().max()),
            "df": {"ord": nd - 1, "probe": len(pq) - 1, "fixed": npairs * (nd - 1), "per_epoch": npairs * (nd - 1)},
            "probe_draws": pq,
            "epoch_means": [float(auc["F", c][ns][gn].mean()) for c in range(N_CKPT)],
        }
    d0 = rows[DEFAULT]
    for s, row in rows.items():
        row["ms_x"], row["macs_x"] = row["ms"] / d0["ms"], row["macs"] / d0["macs"]

    t_all = time.perf_counter() - t_task
    info = dict(per_call=per_call, load=(load0, os.getloadavg()[0]), name=name, layers=layers, widths=widths, epochs=epochs, losses=losses, base_acc=base_acc, t_train=t_train,
                t_pools=t_pools, t_probe=t_probe, t_cost=t_cost, t_all=t_all, max_diff=max_diff,
                frozen_fixed_direct=frozen_fixed_direct, checks=checks, M=M, ntr=ntr,
                measure_last=lambda s: measure(last, layers, px[: s[0]], py[: s[0]], ord_cost[s[1]], grids[s[2]]))
    return rows, info


def print_task(rows, info, args, settings):
    name = info["name"]
    print()
    lay = ", ".join(f"{l} (d={w})" for l, w in info["widths"].items())
    print(f"=== task {name}: layers {lay}; "
          f"{info['epochs']} epochs on {info['ntr']} training examples (Adam lr 1e-3, batch 64); "
          f"checkpoints = epochs {info['epochs'] - N_CKPT + 1}-{info['epochs']}")
    print(f"    train loss per epoch: {' '.join(f'{v:.3f}' for v in info['losses'])}")
    nmax = max(args.num_samples)
    accs = " ".join(f"{info['base_acc'][c][nmax]:.4f}" for c in range(N_CKPT))
    print(f"    unablated accuracy on the fixed {nmax}-example probe set at the 4 checkpoints: {accs}")
    print(f"    mean AUC (default setting, all {info['M']} orders) at the 4 checkpoints: "
          f"{' '.join(f'{v:.4f}' for v in rows[DEFAULT]['epoch_means'])}")
    print(f"    pooled draws vs direct ablation_curve calls ({len(info['checks'])} settings x 2 draws): "
          f"max |difference| = {info['max_diff']:.2e}; frozen net, fixed orders, direct calls: "
          f"AUC(2nd) - AUC(1st) = {info['frozen_fixed_direct']!r}; pool calls stack <= {info['per_call']} orders")
    print(f"    load average (1 min) before / after this task: {info['load'][0]:.2f} / {info['load'][1]:.2f} (2 cores; > 1 means other processes competed)")
    print(f"    time: training {info['t_train']:.0f} s, order pools {info['t_pools']:.0f} s, probe sets {info['t_probe']:.0f} s, "
          f"cost {info['t_cost']:.0f} s, task total {info['t_all']:.0f} s")
    print(f"    sds in units of 1e-3 AUC, each with its 90 % chi-square interval (lo-hi); "
          f"order draws per setting = {info['M']} // repeats; probe sets = {args.probe_sets}; "
          f"epoch-to-epoch: variance averaged over {N_CKPT - 1} consecutive pairs")
    print("    flag: D = today's default (per_epoch orders); c = cost <= 1/3 of the default on this task (ms and MACs)")
    hdr = (f"    {'ns':>4} {'r':>2} {'k':>3} {'':1} | {'ms':>7} {'x def':>5} | {'GMAC':>6} {'x def':>5} | {'mean AUC':>8} | {'draws':>5} | "
           f"{'sd orders':<17} | {'sd probe sets':<17} | {'e2e fixed':<17} | {'e2e per_epoch':<17} | {'frozen per_epoch':<17}")
    print(hdr)
    print("    " + "-" * (len(hdr) - 4))
    for s in settings:
        row = rows[s]
        ns, r, k = s
        flag = "D" if s == DEFAULT else ("c" if row["ms_x"] <= 1 / 3 and row["macs_x"] <= 1 / 3 else "")
        print(f"    {ns:>4} {r:>2} {k:>3} {flag:1} | {row['ms']:7.1f} {row['ms_x']:5.2f} | {row['macs'] / 1e9:6.3f} {row['macs_x']:5.2f} | "
              f"{row['mean']:8.4f} | {row['draws']:>5} | {fmt_sd(row['ord'])} | {fmt_sd(row['probe'])} | {fmt_sd(row['fixed'])} | "
              f"{fmt_sd(row['per_epoch'])} | {fmt_sd(row['frozen_pe'])}")
    ff = max(row["frozen_fixed"] for row in rows.values())
    ratio = statistics.fmean(rows[s]["frozen_pe"][0] / (math.sqrt(2) * rows[s]["ord"][0]) for s in settings)
    print(f"    frozen net, fixed orders: max |change| over all settings and draws = {ff!r} (exactly 0 expected); "
          f"frozen per_epoch / (sqrt(2) x sd orders), mean over settings = {ratio:.3f} (1 expected)")
    # is a smaller probe set measurably noisier? paired bootstrap over the (nested) probe sets
    ns_list = sorted(args.num_samples)
    if len(ns_list) > 1:
        g = torch.Generator().manual_seed(0)
        ref = rows[DEFAULT]["probe_draws"]
        Q = len(ref)
        idx = torch.randint(0, Q, (2000, Q), generator=g)
        parts = []
        for ns in ns_list[:-1]:
            s = (ns, DEFAULT[1], DEFAULT[2])
            if s not in rows:
                continue
            other = rows[s]["probe_draws"]
            bs = (other[idx].std(1) / ref[idx].std(1)).sort().values
            parts.append(f"{ns}: {float(other.std() / ref.std()):.2f} (90 % paired bootstrap {float(bs[100]):.2f}-{float(bs[1899]):.2f}; "
                         f"sqrt({nmax}/{ns}) = {math.sqrt(nmax / ns):.2f})")
        print(f"    sd over probe sets relative to {nmax} samples (r={DEFAULT[1]}, k={DEFAULT[2]}; the smaller sets are "
              f"prefixes of the same {Q} random subsets): " + "; ".join(parts))


def recommend(all_rows, args, settings):
    print()
    print("=== chosen defaults")
    crit = ("ord", "probe")
    names = {"ord": "sd orders", "probe": "sd probe sets", "e2e": "epoch-to-epoch sd"}
    print("Rule: reference = today's default (num_samples=512, repeats=3, 11 fractions, per_epoch orders).")
    print("  A candidate (setting, orders) qualifies when, on BOTH tasks, (a) its ms and its MACs per measurement are <= 1/3 of")
    print("  the reference's, and (b) each of sd orders, sd probe sets and the epoch-to-epoch sd (with the candidate's own orders")
    print("  mode, compared with the reference's per_epoch one) is not significantly larger than the reference's: sd_c <=")
    print("  sd_ref x sqrt(F_0.95(df_c, df_ref)) (one-sided F test at 5 % on the variances, estimates taken as independent,")
    print("  although rows share draws). The cheapest qualifier is chosen (largest MAC ratio over the tasks, then ms ratio).")
    print("  Strict variant: point estimates sd_c <= sd_ref on every criterion, same cost limit.")
    tasks = list(all_rows)
    cands = []
    for s in settings:
        if s == DEFAULT:
            continue
        for om in args.orders:
            ok_cost = all(all_rows[t][s]["ms_x"] <= 1 / 3 and all_rows[t][s]["macs_x"] <= 1 / 3 for t in tasks)
            ratios, margin_ok, strict_ok = {}, True, True
            for t in tasks:
                row, ref = all_rows[t][s], all_rows[t][DEFAULT]
                for c in crit + ("e2e",):
                    kc, kr = (om, "per_epoch") if c == "e2e" else (c, c)
                    sd_c, sd_r = row[kc][0], ref[kr][0]
                    m = math.sqrt(stats.f.ppf(0.95, row["df"][kc], ref["df"][kr]))
                    ratios[t, c] = (sd_c / sd_r, m)
                    margin_ok &= sd_c <= sd_r * m
                    strict_ok &= sd_c <= sd_r
            key = (max(all_rows[t][s]["macs_x"] for t in tasks), max(all_rows[t][s]["ms_x"] for t in tasks))
            cands.append(dict(s=s, om=om, ok_cost=ok_cost, margin=margin_ok, strict=strict_ok, ratios=ratios, key=key))

    def line(c):
        ns, r, k = c["s"]
        rat = "  ".join(f"{t}: " + " ".join(f"{names[x].split()[-1] if x != 'e2e' else 'e2e'} {c['ratios'][t, x][0]:.2f}/{c['ratios'][t, x][1]:.2f}"
                                            for x in crit + ("e2e",)) for t in tasks)
        cst = " ".join(f"{t} ms x{all_rows[t][c['s']]['ms_x']:.2f} MAC x{all_rows[t][c['s']]['macs_x']:.2f}" for t in tasks)
        return f"    num_samples={ns:<3} repeats={r} fractions={k:<2} orders={c['om']:<9} | {cst} | sd ratio/limit: {rat}"

    print("  (sd ratio/limit: candidate sd / reference sd, and the F margin it must not exceed; orders/probe/e2e)")
    cheap = sorted([c for c in cands if c["ok_cost"]], key=lambda c: c["key"])
    qual = [c for c in cheap if c["margin"]]
    strict = [c for c in cheap if c["strict"]]
    print(f"  {len(cheap)} (setting, orders) candidates meet the cost limit on both tasks; {len(qual)} qualify with the margin, "
          f"{len(strict)} strictly.")
    if qual:
        print("  Qualifying (cheapest first):")
        for c in qual[:10]:
            print(line(c))
        best = qual[0]
        ns, r, k = best["s"]
        print(f"  CHOSEN (margin rule): num_samples={ns}, repeats={r}, {k} fractions, orders={best['om']}.")
    else:
        print("  CHOSEN (margin rule): none -- no setting at <= 1/3 of the cost is within the margin on every criterion.")
    if strict:
        ns, r, k = strict[0]["s"]
        print(f"  Strict rule: num_samples={ns}, repeats={r}, {k} fractions, orders={strict[0]['om']}.")
    else:
        print("  Strict rule: none qualifies.")
    if not qual:
        worst = lambda c: max(v[0] / v[1] for v in c["ratios"].values())  # noqa: E731
        print("  Closest (cost-qualified, smallest worst sd ratio / margin):")
        for c in sorted(cheap, key=worst)[:6]:
            print(line(c) + f" | worst ratio/margin {worst(c):.2f}")
    return (qual[0]["s"] if qual else (sorted(cheap, key=lambda c: max(v[0] / v[1] for v in c["ratios"].values()))[0]["s"] if cheap else None))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about 1 minute: smaller grid and pools (smoke test)")
    ap.add_argument("--num-samples", type=int_list, default=None, help="probe-set sizes (default 128,256,512)")
    ap.add_argument("--repeats", type=int_list, default=None, help="orders averaged (default 1,2,3,4)")
    ap.add_argument("--fractions", default=None, help="fraction grid steps (default 0.1,0.2,0.25)")
    ap.add_argument("--orders", default="fixed,per_epoch", help="orders modes considered for the choice")
    ap.add_argument("--pool", type=int, default=None, help="orders per pool M; draws = M // repeats (default 64)")
    ap.add_argument("--probe-sets", type=int, default=None, help="probe sets for the sd over probe sets (default 24)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per setting, median (default 3)")
    ap.add_argument("--epochs-demo", type=int, default=15)
    ap.add_argument("--epochs-convnet", type=int, default=8)
    ap.add_argument("--tasks", default="demo,convnet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args()
    q = args.quick
    args.num_samples = args.num_samples or ([256, 512] if q else [128, 256, 512])
    args.repeats = args.repeats or ([1, 3] if q else [1, 2, 3, 4])
    steps = [float(v) for v in (args.fractions or ("0.1,0.25" if q else "0.1,0.2,0.25")).split(",")]
    args.pool = args.pool or (9 if q else 64)
    args.probe_sets = args.probe_sets or (4 if q else 24)
    args.reps = args.reps or (2 if q else 3)
    args.orders = [o for o in args.orders.split(",") if o]
    if any(o not in ("fixed", "per_epoch") for o in args.orders):
        raise SystemExit("--orders: 'fixed' and/or 'per_epoch'")
    # today's default row is always measured
    args.num_samples = sorted(set(args.num_samples) | {DEFAULT[0]})
    args.repeats = sorted(set(args.repeats) | {DEFAULT[1]})
    grids = {len(g): g for g in (fraction_grid(st) for st in sorted(set(steps) | {0.1}))}
    if args.pool < max(args.repeats):
        raise SystemExit("--pool must be >= the largest repeats")
    torch.set_num_threads(1)
    settings = [(ns, r, k) for ns in sorted(args.num_samples, reverse=True) for r in sorted(args.repeats, reverse=True)
                for k in sorted(grids, reverse=True)]

    t_start = time.perf_counter()
    print("reliance_precision: cost and noise of the reliance AUC (mean over layers of ablation_curve(...).auc, max_elements=2**20)")
    print(f"torch {torch.__version__}, cpu, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, torch threads = {torch.get_num_threads()} "
          f"(set to 1 on purpose){'; QUICK run: few draws, wide intervals, a smoke test only' if q else ''}")
    print(f"grid: num_samples {args.num_samples}, repeats {args.repeats}, fractions "
          f"{', '.join(f'{k} points (step {1 / (k - 1):g})' for k in sorted(grids, reverse=True))}, orders {args.orders}; "
          f"pool of {args.pool} orders per layer (draws = {', '.join(f'{args.pool // r} at r={r}' for r in args.repeats)}), "
          f"{args.probe_sets} probe sets, timing = median of {args.reps} interleaved runs")
    all_rows, infos = {}, {}
    for name in [t for t in args.tasks.split(",") if t]:
        rows, info = run_task(name, args, grids, settings)
        all_rows[name], infos[name] = rows, info
        print_task(rows, info, args, settings)
        sys.stdout.flush()
    pick = recommend(all_rows, args, settings)
    if q:
        print("  (QUICK run: with this few draws the F margins are wide; the choice above is not a decision)")

    if not args.no_memory and "convnet" in infos:
        print()
        print("=== peak extra memory of one measurement, convnet task (all layers)")
        print("  measured with torch.profiler(profile_memory=True): every CPU allocation and free event of the run (after a warm-up")
        print("  run), summed in time order; peak of that running sum = memory held beyond what existed before the call")
        mem_settings = [DEFAULT] + [s for s in [pick, (256, 1, 6), (128, 1, 6)] if s is not None and s in settings and s != DEFAULT]
        seen = []
        for s in mem_settings:
            if s in seen:
                continue
            seen.append(s)
            try:
                peak, net, nev = peak_extra_bytes(lambda: infos["convnet"]["measure_last"](s))
                print(f"    num_samples={s[0]:<3} repeats={s[1]} fractions={s[2]:<2}: peak {peak / 2**20:6.1f} MiB "
                      f"(net at the end {net / 2**20:+.2f} MiB, {nev} events)")
            except Exception as e:  # private profiler API; report instead of failing the benchmark
                print(f"    not measured ({type(e).__name__}: {e})")
                break
    print()
    print(f"total wall time {time.perf_counter() - t_start:.0f} s (CPU time of this process {time.process_time():.0f} s; "
          f"load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
