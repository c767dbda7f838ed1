"""Rank the runs of a sweep by a logged netprobe signal, and check the ranking against a reference.

A *run* is a directory holding TensorBoard event files (``events.out.tfevents.*``). Its scalars
are read with TensorBoard's own event-reading code; event files in sub-directories of a run (as
``SummaryWriter.add_hparams`` writes them) belong to that run. Hyperparameters come from the
HParams plugin data in the events and from Lightning's ``hparams.yaml`` beside them.

Which value of a series is used (``at``):

* ``"last"``: the value at the largest step;
* ``"best"``: the best value (max or min by ``mode``);
* an int ``E``: the value logged during epoch ``E`` (0-based). When the run also logged an
  ``epoch`` scalar (Lightning does), steps map to epochs through it; otherwise the ``E``-th logged
  value of the series is taken. A run that stopped before epoch ``E`` is skipped, with the reason.

The reference (``against``, e.g. a test accuracy logged once at the end) is read at its last value.

Conditions (``where``, e.g. ``"netprobe/probe_accuracy>=0.99"``) keep only the runs that meet
them; each is read at the same epoch as the signal when ``at`` is an epoch, at each
measurement's epoch with ``"best"`` (the best value among the measurements that meet them; at the
same step when no ``epoch`` scalar was logged), else at its last value; a key logged only after
that epoch (a test accuracy at the end) is read at its last value. A run that fails a condition, or lacks its key, is listed as skipped with the
reason. NaN values (what the monitors log for a diverged network) count as no signal: such a run
is skipped at its last value and its NaN measurements never count as best.
Reliance should be compared between networks that fit their training data about equally well
(its AUC is normalized by the unablated accuracy, so an underfit network scores high): filter on
``netprobe/probe_accuracy``, which ``RelianceMonitor`` logs beside it.

A run with a corrupt or truncated event file (a record whose checksum fails, or that ends early)
is skipped, with the reason: TensorBoard's reader stops at such a record without a word, and the
values before it would misrepresent the run.

Statistics over the runs that have both values: Spearman's rho and Kendall's tau-b between signal
and reference, oriented by ``mode`` and ``against_mode`` so that a positive value means agreement
(ties handled; written here in numpy and tested against scipy), the reference rank of
the run the signal picks, and **top-k hit probabilities**: draw ``n_draws`` random subsets of
``subset_size`` runs (without replacement, a seeded numpy Generator), pick the run with the best
signal in each subset, and count how often it is among the ``k`` best runs *of that subset* by the
reference. With ``subset_size`` equal to the number of runs this is the exact 0/1 outcome of
picking among all runs. Morcos et al.'s talk reports, for choosing among 48 configurations by
ablation robustness, the pick in the top 5 by test accuracy 83 % of the time and in the top 10
98 %: the same quantity with subsets of 48 drawn from a larger pool.

Beside each hit rate, a random pick's rate ``k / m``; percentile bootstrap intervals over runs
(:func:`bootstrap_intervals`) on rho, tau and the hit rates. Runs whose ``netprobe/probe_accuracy``
is far below the others' are flagged (not dropped).

**Several seeds per configuration** (``group=`` a regex on the run names, ``group_by=``
hyperparameter names: :func:`group_labels`): the bootstrap resamples groups (a cluster bootstrap)
and the cross-validation splits groups, since the seeds of one configuration are not independent
runs. :func:`tau_difference` (``rank_signals(compare=...)``) gives tau(A) - tau(B) with a paired
bootstrap interval.

**Which signal to trust** (:func:`rank_signals`, ``netprobe rank --signals/--baseline``): one row
per signal (every netprobe key the runs logged, glob patterns, ``KEY:min``/``KEY:max`` baselines
such as the training loss), and a cross-validated choice (:func:`cross_validate_choice`): choose the
signal with the best tau on half of the runs, judge it on the other half, over random splits.
Choosing on the runs it is judged on would overfit.

**Layers**: ``netprobe/<metric>@deepest`` reads, per run, the deepest monitored layer's key (the
order from ``netprobe/layer_index/<layer>`` scalars when logged, else from the order of the
monitors' records in the event files: :func:`layer_order`); ``@<layer>`` names one.

Everything returned is plain data (dicts, lists, floats).
"""

from netprobe.select.errors import SelectionError
from netprobe.select.events import Run, find_runs, load_run, load_runs
from netprobe.select.grouping import UNDERFIT_FRACTION as UNDERFIT_FRACTION
from netprobe.select.grouping import UNDERFIT_KEY as UNDERFIT_KEY
from netprobe.select.grouping import UNDERFIT_MIN_GAP as UNDERFIT_MIN_GAP
from netprobe.select.grouping import _underfit as _underfit
from netprobe.select.grouping import group_labels
from netprobe.select.keys import LAYER_INDEX_PREFIX as LAYER_INDEX_PREFIX
from netprobe.select.keys import key_direction, parse_condition, parse_signal
from netprobe.select.layers import layer_order
from netprobe.select.rank import rank_runs, rank_signals
from netprobe.select.stats import (
    bootstrap_intervals, cross_validate_choice, kendall_tau, spearman_rho, tau_difference, top_k_hits, top_k_intervals,
)

__all__ = ["SelectionError", "Run", "find_runs", "load_run", "load_runs", "rank_runs", "rank_signals", "parse_condition", "parse_signal",
           "key_direction", "layer_order", "spearman_rho", "kendall_tau", "top_k_hits", "top_k_intervals", "bootstrap_intervals", "cross_validate_choice",
           "tau_difference", "group_labels"]
