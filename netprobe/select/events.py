"""Finding runs under a log directory and reading them from their TensorBoard event files.

A run is a directory with event files whose ancestors have none (:func:`find_runs`); its event
files in sub-directories belong to it. :func:`load_run` reads every scalar with TensorBoard's
reader and the hyperparameters (HParams plugin data and ``hparams.yaml``). Each record's checksums
are verified first (:func:`_check_event_file`): a corrupt or truncated file sets ``Run.error``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from netprobe.select.errors import SelectionError


@dataclass
class Run:
    """One run's logs as read from its event files: its scalars by tag (``[(step, value)]``), its hyperparameters and why it cannot be ranked (``error``)."""
    name: str
    path: str
    scalars: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)] by step
    hparams: Dict[str, Any] = field(default_factory=dict)
    #: why the run cannot be ranked (a corrupt or truncated event file), else None
    error: Optional[str] = None


def _is_event_file(name: str) -> bool:
    return name.startswith("events.out.tfevents")


def find_runs(logdir: Union[str, os.PathLike]) -> List[str]:
    """Run directories under ``logdir`` (directories with event files whose ancestors have none)."""
    logdir = os.fspath(logdir)
    if not os.path.isdir(logdir):
        raise SelectionError(f"{logdir!r} is not a directory. Pass the directory holding the sweep's runs.")
    dirs = sorted(root for root, _, files in os.walk(logdir) if any(_is_event_file(f) for f in files))
    runs: List[str] = []
    for d in dirs:
        if not any(d != r and d.startswith(r.rstrip(os.sep) + os.sep) for r in runs):
            runs.append(d)
    return runs


def _hparams_from_plugin(acc: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    try:
        from tensorboard.plugins.hparams import plugin_data_pb2

        content = acc.PluginTagToContent("hparams")
    except (ImportError, KeyError):
        return out
    for raw in content.values():
        try:
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        except Exception:  # noqa: BLE001 - unreadable plugin data is skipped
            continue
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                kind = v.WhichOneof("kind")
                out[k] = getattr(v, kind) if kind else None
    return out


def _hparams_from_yaml(path: str) -> Dict[str, Any]:
    f = os.path.join(path, "hparams.yaml")
    if not os.path.isfile(f):
        return {}
    try:
        import yaml

        with open(f) as fh:
            data = yaml.safe_load(fh) or {}
        return {str(k): v for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None}
    except Exception:  # noqa: BLE001 - a malformed yaml leaves hparams empty, never fails the ranking
        return {}


def _check_event_file(path: str) -> Optional[str]:
    """Why the TFRecord file at ``path`` cannot be read to its end (None when it can).

    TensorBoard's reader stops silently at the first corrupt or truncated record (it takes it for
    a record still being written), which would rank a run by the values logged before it. Each
    record is ``uint64 length, uint32 masked CRC-32C of the length, data, uint32 masked CRC-32C of
    the data``; every checksum is verified here.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            offset = 0
            while True:
                head = fh.read(12)
                if not head:
                    return None
                if len(head) < 12:
                    return f"truncated record at byte {offset} of {name}"
                if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                    return f"corrupt record at byte {offset} of {name} (length checksum mismatch)"
                (length,) = struct.unpack("<Q", head[:8])
                data = fh.read(length)
                crc = fh.read(4)
                if len(data) < length or len(crc) < 4:
                    return f"truncated record at byte {offset} of {name}"
                if struct.unpack("<I", crc)[0] != masked_crc32c(data):
                    return f"corrupt record at byte {offset} of {name} (data checksum mismatch)"
                offset += 16 + length
    except OSError as err:
        return f"cannot read {name}: {err}"


def load_run(path: str, name: Optional[str] = None) -> Run:
    """Read every scalar and the hyperparameters of the run at ``path`` (sub-directories included).

    An event file with a corrupt or truncated record sets ``run.error`` (the run is then skipped by
    :func:`rank_runs`, with that reason): its values after the bad record are lost, so whatever was
    read before it would misrepresent the run.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(name or os.path.basename(os.path.normpath(path)), path)
    series: Dict[str, Dict[int, float]] = {}
    for root, _, files in sorted(os.walk(path)):
        if not any(_is_event_file(f) for f in files):
            continue
        for f in sorted(files):
            if not _is_event_file(f):
                continue
            why = _check_event_file(os.path.join(root, f))
            if why and run.error is None:
                rel = os.path.relpath(root, path)
                run.error = (why if rel == "." else f"{why} in {rel}") + \
                    " (the values after it are lost; rerun or delete the run, or move the file away)"
        acc = EventAccumulator(root, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            s = series.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                if tag == "epoch":  # the first write at a step wins: `trainer.test()` after `fit` logs the
                    s.setdefault(int(ev.step), float(ev.value))  # next epoch's number at the last step
                else:
                    s[int(ev.step)] = float(ev.value)  # a later write at the same step wins
        run.hparams.update(_hparams_from_plugin(acc))
        run.hparams.update(_hparams_from_yaml(root))
    run.scalars = {t: sorted(v.items()) for t, v in series.items()}
    return run


def load_runs(logdir: Union[str, os.PathLike]) -> List[Run]:
    """Every run under ``logdir`` (:func:`find_runs`), read with :func:`load_run`, sorted by name; a run whose event file is corrupt has ``error`` set instead of raising."""
    paths = find_runs(logdir)
    if not paths:
        raise SelectionError(
            f"No runs under {os.fspath(logdir)!r}: no TensorBoard event files (events.out.tfevents.*) were found. "
            "Point LOGDIR at the directory that holds one sub-directory per run."
        )
    base = os.fspath(logdir)
    return [load_run(p, os.path.relpath(p, base) if p != base else os.path.basename(base)) for p in paths]

