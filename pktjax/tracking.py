"""Optional experiment trackers: training curves and scores in TensorBoard (through ``tensorboardX``) or W&B.

pktjax's own files (``metrics.jsonl``, ``log.jsonl``, ``scores.json``) stay the record; a tracker shows the same
numbers in the tool a researcher already watches. :func:`open_tracker` gives a :class:`Tracker` with a tiny
interface: ``log(scalars, step)`` (every number of a metrics dict, nested dicts flattened to ``a/b`` tags),
``summary(values)`` (a run's final numbers), ``scoped(prefix)`` (the same tracker with tags under ``prefix/``)
and ``close()``. ``"none"`` gives a tracker that does nothing. Neither package is a dependency: asking for a
tracker whose package is missing is a :class:`ConfigError` naming the ``pip install`` that fixes it
(:func:`require`, cheap enough to run before any work).
"""

from __future__ import annotations

import importlib.util
import numbers
import os
from pathlib import Path
from typing import Any, Mapping

from pktjax.errors import ConfigError

TRACKERS = ("none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb"}


def require(kind: str) -> None:
    """Refuse an unknown tracker, or one whose package is not installed (found without importing it)."""
    if kind not in TRACKERS:
        raise ConfigError(f"tracker {kind!r}: choose one of {', '.join(TRACKERS)}.")
    package = _PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracker {kind!r} needs the {package} package: pip install {package} "
                          "(or choose tracker none).")


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of ``values`` by tag: nested mappings joined with ``/``; text, lists and booleans left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, tag + "/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class Tracker:
    """Does nothing (``tracker: none``); the base of the real trackers, which override :meth:`_write` and
    :meth:`_summary`."""

    def __init__(self, prefix: str = "", root: "Tracker | None" = None):
        self.prefix, self.root = prefix, root or self

    def log(self, values: Mapping[str, Any], step: int) -> None:
        """Every number in ``values`` (a metrics dict; its ``step`` key is left out) at ``step``."""
        found = scalars({k: v for k, v in values.items() if k != "step"})
        if found:
            self.root._write({self.prefix + k: v for k, v in found.items()}, int(step))

    def summary(self, values: Mapping[str, Any]) -> None:
        """A run's final numbers (scores)."""
        found = scalars(values)
        if found:
            self.root._summary({self.prefix + k: v for k, v in found.items()})

    def scoped(self, prefix: str) -> "Tracker":
        """This tracker with every tag under ``prefix/`` (one run's curves among a job's)."""
        return Tracker(f"{self.prefix}{prefix.strip('/')}/", self.root)

    def close(self) -> None:
        if self.root is self:
            self._close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, tags: dict[str, float], step: int) -> None:
        pass

    def _summary(self, tags: dict[str, float]) -> None:
        pass

    def _close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files under ``folder`` (tensorboardX's ``SummaryWriter``); a summary's numbers are scalars under
    ``summary/`` at step 0."""

    def __init__(self, folder: Path):
        super().__init__()
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder))

    def _write(self, tags: dict[str, float], step: int) -> None:
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, step)

    def _summary(self, tags: dict[str, float]) -> None:
        self._write({f"summary/{k}": v for k, v in tags.items()}, 0)
        self.writer.flush()

    def _close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run (project ``pktjax`` unless ``WANDB_PROJECT`` says otherwise) with files under ``folder``."""

    def __init__(self, folder: Path, name: str, config: Mapping[str, Any] | None):
        super().__init__()
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pktjax"), name=name, dir=str(folder),
                              config=dict(config or {}))

    def _write(self, tags: dict[str, float], step: int) -> None:
        self.run.log(tags, step=step)

    def _summary(self, tags: dict[str, float]) -> None:
        self.run.summary.update(tags)

    def _close(self) -> None:
        self.run.finish()


def open_tracker(kind: str | None, folder: str | os.PathLike, name: str | None = None,
                 config: Mapping[str, Any] | None = None) -> Tracker:
    """The tracker ``kind`` (none | tensorboard | wandb; ``None`` is none) of a run whose output folder is
    ``folder``: TensorBoard writes its event files to ``folder/tensorboard``, W&B its run files under
    ``folder/wandb`` (run ``name``, default the folder's name; ``config``: the run's settings). Only process 0
    of a multi-host job tracks (the others get a tracker that does nothing)."""
    kind = kind or "none"
    require(kind)
    if kind == "none":
        return Tracker()
    from pktjax.sharding import is_main_process

    if not is_main_process():
        return Tracker()
    folder = Path(folder).expanduser()
    if kind == "tensorboard":
        return TensorBoardTracker(folder / "tensorboard")
    return WandbTracker(folder / "wandb", name or folder.name, config)
