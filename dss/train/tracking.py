"""Optional MLflow run tracking for dss_train.py: one MLflow run per training run.

Asked for when ``MLFLOW_TRACKING_URI`` is set or ``--mlflow-experiment NAME`` is given (``--mlflow
true`` forces it with MLflow's default store, ``--mlflow false`` turns it off). What a run logs:
every resolved setting as a param (the content of ``config.json``), the data fingerprint and the
preprocess summary counts as tags, the per-epoch fields with the epoch as step, the best epoch's
and the test metrics, and the run's files as artifacts (the model only when asked: it is large).

Tracking must never cost the training run: the MLflow calls run on one background thread in the
order they were made, each HTTP request gets a short timeout and one retry (unless the user set
``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``), and the first failure prints
one warning and turns tracking off for the rest of the run; every local output is written as usual.
The ``mlflow`` package is optional (``pip install -r requirements-mlflow.txt``); asking for
tracking without it is an error before training starts. A SageMaker managed MLflow tracking server
is addressed by its ARN as the URI; the ``sagemaker-mlflow`` plugin resolves it (see docs/sagemaker.md).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dss.cli import log

DEFAULT_EXPERIMENT = "dss-animal-classification"
# Per HTTP request to the tracking server: seconds before giving up, and retries after the first try.
REQUEST_TIMEOUT_S = "10"
REQUEST_MAX_RETRIES = "1"
# Seconds the end of a run waits for queued MLflow calls (artifact uploads) before leaving them.
FINISH_TIMEOUT_S = 120.0
# MLflow params hold at most this many characters (the REST API's limit).
PARAM_VALUE_CHARS = 6000
BATCH_SIZE = 100  # params or metrics per log_batch request (the REST API's limit for params)
OUTPUT_SUFFIXES = (".png", ".csv", ".json")  # the run's files logged as artifacts (plots, tables)


class TrackingError(RuntimeError):
    """Tracking was asked for but cannot work (the mlflow package is not installed)."""


@dataclass(frozen=True)
class TrackingSettings:
    """Whether and where to track; built by ``resolve`` from the flags and the environment."""

    enabled: bool
    tracking_uri: str | None = None     # None: MLflow's own default (MLFLOW_TRACKING_URI, else local)
    experiment: str = DEFAULT_EXPERIMENT
    log_model: bool = False


def resolve(enabled: bool | None, experiment: str | None, log_model: bool, environ=None) -> TrackingSettings:
    """``enabled`` None means: track when ``MLFLOW_TRACKING_URI`` is set or an experiment is named.

    Raises TrackingError when tracking is asked for and the mlflow package is missing.
    """
    env = os.environ if environ is None else environ
    uri = env.get("MLFLOW_TRACKING_URI") or None
    if enabled is None:
        enabled = uri is not None or experiment is not None
    if not enabled:
        return TrackingSettings(enabled=False)
    if importlib.util.find_spec("mlflow") is None:
        why = ("MLFLOW_TRACKING_URI is set" if uri and experiment is None else
               "--mlflow-experiment was given" if experiment is not None else "--mlflow true was given")
        raise TrackingError(f"MLflow tracking was asked for ({why}) but the mlflow package is not installed: "
                            "pip install -r requirements-mlflow.txt, or run with --mlflow false")
    name = experiment or env.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    return TrackingSettings(enabled=True, tracking_uri=uri, experiment=name, log_model=log_model)


def _param_text(value) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= PARAM_VALUE_CHARS else text[:PARAM_VALUE_CHARS - 3] + "..."


class RunTracker:
    """One MLflow run, or nothing (``RunTracker.disabled()``): every method is safe to call either way.

    Calls are queued to a worker thread; ``finish`` waits (bounded) for them. ``run_id`` is stored in
    the training checkpoint so a resumed training run continues the same MLflow run.
    """

    def __init__(self, client=None, run_id: str | None = None, location: str = ""):
        self.client = client
        self.run_id = run_id
        self.location = location
        # Exceptions that end the run as KILLED (it may be resumed) rather than FAILED.
        self.interruptions: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
        self._failed = client is None
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._worker = None
        if not self._failed:
            self._worker = threading.Thread(target=self._work, name="dss-mlflow", daemon=True)
            self._worker.start()

    @classmethod
    def disabled(cls) -> "RunTracker":
        return cls()

    @property
    def active(self) -> bool:
        return not self._failed

    @classmethod
    def start(cls, settings: TrackingSettings, run_name: str, resume_run_id: str | None = None) -> "RunTracker":
        """Open the experiment and create the run (or reopen ``resume_run_id``), synchronously: a
        server that is down costs one warning here, and the run goes on untracked."""
        if not settings.enabled:
            return cls.disabled()
        # Short requests unless the user tuned them: MLflow's defaults (120 s, 7 retries with
        # exponential back-off) would stall a run for minutes on a server that is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_S)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", REQUEST_MAX_RETRIES)
        from mlflow.tracking import MlflowClient

        location = settings.tracking_uri or "MLflow's default tracking store"
        try:
            client = MlflowClient(tracking_uri=settings.tracking_uri)
            if resume_run_id is not None:
                run_id = client.get_run(resume_run_id).info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                experiment = client.get_experiment_by_name(settings.experiment)
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else client.create_experiment(settings.experiment))
                run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        except Exception as exc:  # noqa: BLE001 - any tracking failure must leave the training alone
            _warn(location, exc)
            return cls.disabled()
        verb = "continuing" if resume_run_id is not None else "logging to"
        log.info(f"MLflow: {verb} run {run_id} (experiment '{settings.experiment}') at {location}")
        return cls(client, run_id, location)

    # ------------------------------------------------------------------ what a run logs
    def log_params(self, params: dict) -> None:
        """Params not logged yet (a resumed run keeps the ones it has: MLflow params are immutable)."""
        def call():
            from mlflow.entities import Param
            present = self.client.get_run(self.run_id).data.params
            new = [Param(key, _param_text(value)) for key, value in params.items() if key not in present]
            for start in range(0, len(new), BATCH_SIZE):
                self.client.log_batch(self.run_id, params=new[start:start + BATCH_SIZE])
        self._submit(call)

    def set_tags(self, tags: dict) -> None:
        def call():
            from mlflow.entities import RunTag
            self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])
        self._submit(call)

    def log_epochs(self, records: list[dict], fields: tuple[str, ...]) -> None:
        """Per-epoch ``fields`` of ``records`` with the epoch as step; epochs the run already has
        are skipped, so a resumed run neither repeats nor misses a step."""
        def call():
            from mlflow.entities import Metric
            logged = {metric.step for metric in self.client.get_metric_history(self.run_id, fields[0])}
            now = int(time.time() * 1000)
            metrics = [Metric(key, float(record[key]), now, int(record["epoch"]))
                       for record in records if int(record["epoch"]) not in logged for key in fields]
            for start in range(0, len(metrics), BATCH_SIZE):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH_SIZE])
        self._submit(call)

    def log_metrics(self, metrics: dict) -> None:
        """Run-level numbers (best epoch, test), without a step."""
        def call():
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, 0)
                                                        for key, value in metrics.items()])
        self._submit(call)

    def log_artifacts(self, paths: list[Path]) -> None:
        def call():
            for path in paths:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
        self._submit(call)

    def finish(self, status: str = "FINISHED", timeout_s: float = FINISH_TIMEOUT_S) -> None:
        """Mark the run ended (FINISHED, FAILED or KILLED) and wait for the queued calls."""
        if self._worker is None:
            return
        self._submit(lambda: self.client.set_terminated(self.run_id, status=status))
        self._calls.put(None)
        self._worker.join(timeout_s)
        if self._worker.is_alive():
            log.warning(f"warning: MLflow calls still pending after {timeout_s:.0f} s were left unsent "
                        f"({self.location}); every local output is written")
        self._worker = None

    def log_outputs(self, output_dir: Path, model_dir: Path, log_model: bool) -> None:
        """The run's files: every plot, CSV and JSON in ``output_dir``, ``config.json`` and, when
        asked, ``model.pth`` from ``model_dir``."""
        files = sorted(path for path in Path(output_dir).iterdir()
                       if path.is_file() and path.suffix in OUTPUT_SUFFIXES and not path.name.startswith("."))
        extra = [Path(model_dir) / "config.json"] + ([Path(model_dir) / "model.pth"] if log_model else [])
        self.log_artifacts(list(dict.fromkeys(files + extra)))

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Ends the run: FINISHED, KILLED (``interruptions``: it may be resumed) or FAILED."""
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, self.interruptions) else "FAILED")

    # ------------------------------------------------------------------ the worker
    def _submit(self, call: Callable[[], None]) -> None:
        if not self._failed:
            self._calls.put(call)

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            if self._failed:
                continue
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - see the module docstring
                self._failed = True
                _warn(self.location, exc)


def _warn(location: str, exc: Exception) -> None:
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    log.warning(f"warning: MLflow tracking at {location} failed ({type(exc).__name__}: {first_line}); "
                "the run goes on without tracking and writes every local output as usual")
    # MLflow's own loggers would repeat the failure on every later call; nothing else is sent now.
    logging.getLogger("mlflow").setLevel(logging.ERROR)
