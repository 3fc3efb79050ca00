"""The Ray executor (``executor: ray``): both passes of a datagen run as Ray Data pipelines on a cluster.

The run itself stays in pipeline.py (plan, calibration, shard files, resume, teacher-failure retries, merge); this
module only says where shards are computed, through the two methods of executors.LocalExecutor:

* acoustic pass: a dataset of the missing acoustic shards, ``map_batches`` over a pool of CPU actors (one shard per
  batch, the same ``acoustic_phase.analyze_clip`` per clip as the local executor);
* teacher pass: a dataset of the missing generation shards over a pool of teacher actors, each holding a
  ``generation.Generator`` with its own teacher (template; openai: a shard's requests concurrently from each actor;
  self with transformers: the model loaded once per actor, on a GPU with ``ray.teacher_gpus``). The ``self`` teacher
  goes through Ray Data's vLLM processor instead (``ray.data.llm.build_processor``) where vLLM is installed:
  ray_vllm_processor.py.

Actors send back text; only the driver writes shard files, each atomically and in the local executor's layout, so a
task that Ray retries after its worker died can never write a shard twice, and a restarted run (by either executor)
skips the shards already written. Ray Data creates its actors with ``max_restarts=-1`` and ``max_task_retries=-1``: a
killed actor is restarted and its shard computed again.

Ray is an optional dependency (``pip install emoreason[ray]``): it is imported when an executor is built.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..data.schema import EmotionRecord
from .acoustic_phase import analyze_clip
from .config import DatagenConfig
from .faults import KILL_ONCE_ENV, KillOnce
from .generation import Generator
from .ray_config import RayConfig
from .ray_vllm_processor import ProcessorGeneration
from .run_files import atomic_text, jsonl_text
from .teachers import TeacherUnavailable, get_teacher

logger = logging.getLogger(__name__)


# -- actors (constructed by Ray Data in worker processes) -------------------------------------------------------
class AcousticActor:
    """Analyses one acoustic shard per batch; returns the shard's JSONL text (the driver writes it)."""

    def __init__(self, jobs_ref: list, kill_spec: str, marker_dir: str):
        import ray

        self.jobs = ray.get(jobs_ref[0])  # {shard index: (records, root, limits)}
        self.hook = KillOnce(kill_spec, "acoustic", marker_dir)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        texts = []
        for index in batch["index"]:
            records, root, limits = self.jobs[int(index)]
            rows = []
            for record in records:
                rows.append(analyze_clip(record, root, limits))
                self.hook.tick(record.id)
            texts.append(jsonl_text(rows))
        return {"index": batch["index"], "text": np.array(texts, dtype=object)}


class TeacherActor:
    """Generates one shard per batch with its own teacher; returns the shard's outputs as JSON text."""

    def __init__(self, state_ref: list, kill_spec: str, marker_dir: str):
        import ray

        state = ray.get(state_ref[0])
        self.generator: Generator = state["generator"]
        self.generator.teacher = get_teacher(self.generator.cfg.teacher, work_dir=state["work_dir"])
        self.generator.hook = KillOnce(kill_spec, "generate", marker_dir)
        self.jobs: dict[int, list[EmotionRecord]] = state["jobs"]

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        texts, unreachable = [], []
        for index in batch["index"]:
            try:
                texts.append(json.dumps(self.generator.shard(self.jobs[int(index)]), ensure_ascii=False))
                unreachable.append("")
            except TeacherUnavailable as err:  # not worth a retry: the driver stops the run with it
                texts.append("")
                unreachable.append(str(err))
        return {"index": batch["index"], "result": np.array(texts, dtype=object),
                "unreachable": np.array(unreachable, dtype=object)}


# -- the executor ---------------------------------------------------------------------------------------------
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def keep_on_loopback() -> None:
    """On Linux Ray swaps 127.0.0.1 in an address for the machine's outward IP, and a local Ray binds its servers to
    every interface even with ``_node_ip_address="127.0.0.1"``. Ray's switch for Windows/macOS (the variable, read by
    the processes Ray spawns, and its constant, read by this one) keeps a local Ray on loopback."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


class RayExecutor:
    """``analyze`` and ``generate`` of executors.LocalExecutor, on Ray. Use as a context manager: it connects to
    ``config.address`` (or starts a local Ray on 127.0.0.1) unless Ray is already initialised in this process, and
    disconnects what it connected."""

    def __init__(self, config: RayConfig, cfg: DatagenConfig):
        self.config = config
        self.cfg = cfg
        self.marker_dir = str(Path(cfg.output_dir).resolve())
        self.kill_spec = os.environ.get(KILL_ONCE_ENV, "")
        self._connected = False

    def __enter__(self) -> RayExecutor:
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"runtime_env": self.config.runtime_env or None, "log_to_driver": False}
            address = self.config.address
            if not address or address.rsplit(":", 1)[0] in LOOPBACK_HOSTS:
                keep_on_loopback()
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)
            self._connected = True
        ray.data.DataContext.get_current().enable_progress_bars = bool(self.cfg.progress)
        return self

    def __exit__(self, *exc) -> None:
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False

    def dataset(self, indices: list[int]):
        """One row per shard index, one block each (a batch of one shard per actor call)."""
        import ray

        return ray.data.from_items([{"index": i} for i in indices], override_num_blocks=max(1, len(indices)))

    def analyze(self, jobs: list[tuple], cfg: DatagenConfig):
        if not jobs:
            return
        import ray

        shard_dir = Path(jobs[0][4])
        by_index = {index: (records, root, limits) for index, records, root, limits, _ in jobs}
        jobs_ref = ray.put(by_index)
        actors = max(1, min(self.config.acoustic_actors, len(jobs)))
        ds = self.dataset(sorted(by_index)).map_batches(
            AcousticActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.config.acoustic_cpus, fn_constructor_kwargs={
                "jobs_ref": [jobs_ref], "kill_spec": self.kill_spec, "marker_dir": self.marker_dir})
        for row in ds.iter_rows():
            index, text = int(row["index"]), row["text"]
            atomic_text(shard_dir / f"{index:05d}.jsonl", text)
            yield index, [json.loads(line) for line in text.splitlines() if line.strip()]

    def generate(self, generator: Generator, jobs: list[tuple[int, list[EmotionRecord]]]):
        if not jobs:
            return
        if self._use_processor():
            yield from ProcessorGeneration(self, generator).run(jobs)
            return
        import ray

        state_ref = ray.put({"generator": generator.without_teacher(), "jobs": dict(jobs),
                             "work_dir": str(Path(self.cfg.output_dir).resolve())})
        actors = max(1, min(self.config.teacher_actors, len(jobs)))
        ds = self.dataset([index for index, _ in jobs]).map_batches(
            TeacherActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=self.config.teacher_cpus, num_gpus=self.config.teacher_gpus or None,
            fn_constructor_kwargs={"state_ref": [state_ref], "kill_spec": self.kill_spec,
                                   "marker_dir": self.marker_dir})
        for row in ds.iter_rows():
            if row["unreachable"]:  # stop the run, as the local executor does (the finished shards stay)
                raise TeacherUnavailable(row["unreachable"])
            yield int(row["index"]), json.loads(row["result"])

    def _use_processor(self) -> bool:
        teacher = self.cfg.teacher
        mode = self.config.vllm_processor
        mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode  # YAML reads off as false
        if teacher.name != "self" or mode == "off" or teacher.backend == "transformers":
            return False
        if mode not in ("auto", "on"):
            raise ValueError(f"ray.vllm_processor must be auto, on or off, got {mode!r}")
        try:
            import vllm  # noqa: F401
        except ImportError:
            if mode == "on" or teacher.backend == "vllm":
                raise ValueError("ray.vllm_processor: on (or teacher.backend: vllm) needs vLLM on the driver "
                                 "(requirements-vllm.txt); without it use teacher.backend: transformers") from None
            return False
        return True
