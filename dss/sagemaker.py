"""SageMaker conventions in one place: the SM_* environment of training jobs, the /opt/ml/config of
Processing jobs, and the files where a failed job leaves its reason.

Training jobs: paths default from the ``SM_*`` variables when they exist, so the same script runs
on a laptop and as a training job; an explicit flag always wins. A failure's reason goes to
``$SM_OUTPUT_DIR/failure``, which the job's FailureReason shows.

Processing jobs describe themselves to their containers in two JSON files under ``/opt/ml/config/``
(``DSS_PROCESSING_CONFIG_DIR`` overrides the folder, for tests and local dry runs):

- ``resourceconfig.json``: ``{"current_host": "algo-2", "hosts": ["algo-1", "algo-2", "algo-3"]}``
- ``processingjobconfig.json``: the CreateProcessingJob request, of which we read
  ``ProcessingInputs[].S3Input.{LocalPath, S3Uri, S3DataDistributionType}`` (``DatasetDefinition``
  inputs carry ``LocalPath`` and ``DataDistributionType`` instead).

An input with ``ShardedByS3Key`` gives each instance only some of the objects under its prefix; a
``FullyReplicated`` one (the default) gives every instance all of them. preprocess.py uses this to
pick its shard (host i of K) and to know when an input folder is already a shard, not to be sliced
again. A failed Processing run leaves its reason in ``/opt/ml/output/message`` (the job's ExitMessage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dss import fileio

CONFIG_DIR_ENV = "DSS_PROCESSING_CONFIG_DIR"
DEFAULT_CONFIG_DIR = "/opt/ml/config"
RESOURCE_CONFIG = "resourceconfig.json"
JOB_CONFIG = "processingjobconfig.json"
SHARDED = "ShardedByS3Key"
REPLICATED = "FullyReplicated"


class ProcessingConfigError(RuntimeError):
    """A Processing config file is unreadable or lacks a field; the message names the file and field."""


@dataclass(frozen=True)
class ProcessingInput:
    name: str
    local_path: str     # absolute folder in the container where SageMaker put the objects
    distribution: str   # SHARDED or REPLICATED
    source: str         # the S3 URI (or dataset definition kind), for messages

    @property
    def sharded(self) -> bool:
        return self.distribution == SHARDED


@dataclass(frozen=True)
class ProcessingJob:
    current_host: str
    hosts: tuple[str, ...]
    inputs: tuple[ProcessingInput, ...]
    config_dir: Path

    @property
    def num_shards(self) -> int:
        return len(self.hosts)

    @property
    def shard_index(self) -> int:
        """Host i of K, in the order of ``hosts`` (algo-1 -> 0), the same on every instance."""
        return self.hosts.index(self.current_host)

    def sharded_input_for(self, folder: str | os.PathLike) -> ProcessingInput | None:
        """The ShardedByS3Key input that ``folder`` lies in, or that lies in ``folder`` (a parent of
        sharded image folders); None when ``folder`` holds only complete copies."""
        target = _real(folder)
        for processing_input in self.inputs:
            if processing_input.sharded:
                local = _real(processing_input.local_path)
                if _within(target, local) or _within(local, target):
                    return processing_input
        return None



def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def config_dir(environ=None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR)


def write_exit_message(message: str, environ=None) -> Path | None:
    """In a Processing job, leave ``message`` (why the run failed) in ``/opt/ml/output/message``, the
    file whose first 1 KB the job's DescribeProcessingJob ExitMessage shows; the output folder is the
    config folder's sibling, so ``DSS_PROCESSING_CONFIG_DIR`` moves both. Returns the path written,
    or None outside a Processing job (no ``resourceconfig.json``)."""
    folder = config_dir(environ)
    if not (folder / RESOURCE_CONFIG).is_file():
        return None
    path = folder.parent / "output" / "message"
    fileio.write_text(path, message if message.endswith("\n") else message + "\n")
    return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProcessingConfigError(f"cannot read the SageMaker Processing config {path}: {exc}") from None
    except ValueError as exc:
        raise ProcessingConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProcessingConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _parse_input(entry, index: int, path: Path) -> ProcessingInput | None:
    where = f"{path}: ProcessingInputs[{index}]"
    if not isinstance(entry, dict):
        raise ProcessingConfigError(f"{where} is not an object")
    if isinstance(entry.get("S3Input"), dict):
        spec, distribution_field = entry["S3Input"], "S3DataDistributionType"
        source = str(spec.get("S3Uri", ""))
    elif isinstance(entry.get("DatasetDefinition"), dict):
        spec, distribution_field = entry["DatasetDefinition"], "DataDistributionType"
        source = "dataset definition"
    else:
        return None  # an app-managed input: nothing on the local disk to reason about
    local_path = spec.get("LocalPath")
    if not isinstance(local_path, str) or not local_path:
        if entry.get("AppManaged"):
            return None
        raise ProcessingConfigError(f"{where}: field 'LocalPath' is missing")
    distribution = spec.get(distribution_field) or REPLICATED  # the API's default
    if distribution not in (SHARDED, REPLICATED):
        raise ProcessingConfigError(f"{where}: field '{distribution_field}' is {distribution!r}, "
                                    f"expected {SHARDED} or {REPLICATED}")
    return ProcessingInput(str(entry.get("InputName", f"input-{index}")), local_path, distribution, source)


def load_job(environ=None) -> ProcessingJob | None:
    """The Processing job this process runs in, or None when there is no ``resourceconfig.json``
    (not a Processing job). Raises ProcessingConfigError naming the file and field when the
    config is there but unusable."""
    folder = config_dir(environ)
    resource_path = folder / RESOURCE_CONFIG
    if not resource_path.is_file():
        return None
    resources = _read_json(resource_path)
    hosts = resources.get("hosts")
    current_host = resources.get("current_host")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise ProcessingConfigError(f"{resource_path}: field 'hosts' must be a non-empty list of host names, "
                                    f"got {hosts!r}")
    if len(set(hosts)) != len(hosts):
        raise ProcessingConfigError(f"{resource_path}: field 'hosts' has duplicates: {hosts}")
    if current_host not in hosts:
        raise ProcessingConfigError(f"{resource_path}: field 'current_host' {current_host!r} is not in "
                                    f"'hosts' {hosts}")
    job_path = folder / JOB_CONFIG
    if not job_path.is_file():
        raise ProcessingConfigError(f"{resource_path} exists but {job_path} does not: a SageMaker Processing "
                                    f"job writes both (set {CONFIG_DIR_ENV} to the folder holding them)")
    entries = _read_json(job_path).get("ProcessingInputs") or []
    if not isinstance(entries, list):
        raise ProcessingConfigError(f"{job_path}: field 'ProcessingInputs' must be a list")
    inputs = tuple(parsed for index, entry in enumerate(entries)
                   if (parsed := _parse_input(entry, index, job_path)) is not None)
    return ProcessingJob(current_host, tuple(hosts), inputs, folder)


def under_sagemaker(environ: os._Environ | dict | None = None) -> bool:
    """True when SageMaker's training toolkit started us (it sets SM_* variables)."""
    env = os.environ if environ is None else environ
    return "SM_TRAINING_ENV" in env or "SM_MODEL_DIR" in env


def training_channel(environ=None) -> str | None:
    """The training channel: SM_CHANNEL_TRAINING, else SM_CHANNEL_TRAIN."""
    env = os.environ if environ is None else environ
    return env.get("SM_CHANNEL_TRAINING") or env.get("SM_CHANNEL_TRAIN")


def model_dir(environ=None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("SM_MODEL_DIR")


def output_data_dir(environ=None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get("SM_OUTPUT_DATA_DIR")


def checkpoint_dir(environ=None) -> str | None:
    """/opt/ml/checkpoints is where SageMaker syncs spot checkpoints; only used under SageMaker."""
    env = os.environ if environ is None else environ
    if not under_sagemaker(env):
        return None
    return env.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")


JOB_NAME_FIELD = "{job_name}"  # in --checkpoint-dir: replaced by the training job's name


def job_name(environ=None) -> str | None:
    """The training job's name: ``TRAINING_JOB_NAME`` (set by SageMaker in every training container),
    else the ``job_name`` of the toolkit's ``SM_TRAINING_ENV``; None outside SageMaker."""
    env = os.environ if environ is None else environ
    if env.get("TRAINING_JOB_NAME"):
        return env["TRAINING_JOB_NAME"]
    try:
        return json.loads(env.get("SM_TRAINING_ENV") or "{}").get("job_name") or None
    except (ValueError, AttributeError):
        return None


def expand_job_name(path: str, environ=None) -> str:
    """``path`` with ``{job_name}`` replaced by this training job's name, so that the jobs of a
    hyperparameter tuning job (which share one checkpoint_s3_uri) keep their checkpoints apart while
    a restarted spot job (same name) finds its own. An error when the name is unknown."""
    if JOB_NAME_FIELD not in path:
        return path
    name = job_name(environ)
    if not name:
        raise ValueError(f"--checkpoint-dir {path} contains {JOB_NAME_FIELD}, but no training job name is known "
                         "(TRAINING_JOB_NAME is not set): use it only in SageMaker training jobs")
    return path.replace(JOB_NAME_FIELD, name)


def write_failure(reason: str, environ=None) -> Path | None:
    """Write the failure reason where SageMaker shows it (``$SM_OUTPUT_DIR/failure``).

    Does nothing outside SageMaker. Returns the path written, if any.
    """
    env = os.environ if environ is None else environ
    if not under_sagemaker(env):
        return None
    output_dir = Path(env.get("SM_OUTPUT_DIR", "/opt/ml/output"))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "failure"
        path.write_text(reason.rstrip() + "\n", encoding="utf-8")
        return path
    except OSError:
        return None


def report_failure(message: str) -> None:
    """Leave the reason a run failed where SageMaker shows it: a training job's failure file, or a
    Processing job's exit message (nothing outside SageMaker; stderr has it either way)."""
    write_failure(message)
    with contextlib.suppress(OSError):  # a read-only /opt/ml must not hide the real error
        write_exit_message(message)


class ArgumentParser(argparse.ArgumentParser):
    """An argument error is a failed job too: SageMaker shows the reason from the failure file."""

    def error(self, message: str):
        write_failure(f"invalid arguments: {message}")
        super().error(message)
