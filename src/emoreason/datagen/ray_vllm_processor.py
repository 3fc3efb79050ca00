"""The ``self`` teacher under the Ray executor through Ray Data's vLLM processor (``ray.data.llm``), used where vLLM
is importable (``ray.vllm_processor``). A shard asks its teacher twice (rationales, then its pairs' negatives), so the
shards are computed in rounds: CPU actors replay every pending shard with the answers known so far and hand back the
prompts still missing; the processor answers all of them together, so vLLM's batches stay full across shards."""

from __future__ import annotations

import hashlib
import json

from ..data.schema import EmotionRecord
from .faults import KillOnce
from .generation import Generator
from .ray_config import RayConfig
from .teachers import TeacherFailure, TeacherRequest, vllm_model_source


class _NeedAnswers(Exception):
    def __init__(self, requests: list[TeacherRequest]):
        super().__init__(f"{len(requests)} request(s) to send to the engine")
        self.requests = requests


def request_digest(request: TeacherRequest) -> str:
    payload = json.dumps([request.key, request.kind, request.prompt, request.n, request.seed], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ReplayTeacher:
    """Answers requests from the engine's answers of earlier rounds; the first unanswered batch stops the shard
    (``_NeedAnswers``), to be asked of the processor and the shard replayed. A shard asks twice (rationales, then
    its pairs' negatives), so it is done on its third round."""

    def __init__(self, answers: dict[str, list[str]], name: str, model_id: str, backend: str | None):
        self.answers = answers  # provenance as the driver's teacher states it
        self.name, self.model_id, self.backend = name, model_id, backend

    def generate(self, requests: list[TeacherRequest]) -> list[list[str] | TeacherFailure]:
        missing = [r for r in requests if request_digest(r) not in self.answers]
        if missing:
            raise _NeedAnswers(missing)
        return [self.answers[request_digest(r)] for r in requests]


class ReplayActor:
    """One shard per batch: its outputs when every teacher request is answered, else the requests still missing."""

    def __init__(self, state_ref: list, answers_ref: list):
        import ray

        state = ray.get(state_ref[0])
        self.generator: Generator = state["generator"]
        self.generator.teacher = ReplayTeacher(ray.get(answers_ref[0]), *state["teacher"])
        self.generator.hook = KillOnce("", "generate", ".")  # no kills: a replay is not the first attempt
        self.jobs = state["jobs"]

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results, needs = [], []
        for index in batch["index"]:
            try:
                results.append(json.dumps(self.generator.shard(self.jobs[int(index)]), ensure_ascii=False))
                needs.append("")
            except _NeedAnswers as need:
                results.append("")
                needs.append(json.dumps([{"digest": request_digest(r), "messages": r.messages, "n": r.n,
                                          "seed": r.seed} for r in need.requests], ensure_ascii=False))
        return {"index": batch["index"], "result": np.array(results, dtype=object),
                "needs": np.array(needs, dtype=object)}


def processor_config(teacher, config: RayConfig, model_source: str):
    """Ray Data's ``vLLMEngineProcessorConfig`` for the ``self`` teacher: ``ray.vllm_engines`` replicas of
    ``teacher.vllm_kwargs`` (e.g. ``tensor_parallel_size``), ``ray.vllm_batch_size`` prompts per batch."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = {"max_model_len": 4096, **teacher.vllm_kwargs, "trust_remote_code": False}
    return vLLMEngineProcessorConfig(model_source=model_source, engine_kwargs=engine_kwargs,
                                     concurrency=config.vllm_engines, batch_size=config.vllm_batch_size)


def sampling_rows(need_rows: list[dict], teacher) -> list[dict]:
    """One processor row per sample: n samples of a request are n rows seeded seed, seed+1, ... (as the openai
    teacher asks for the samples it still misses)."""
    rows = []
    for need in need_rows:
        for sample in range(need["n"]):
            rows.append({"digest": need["digest"], "sample": sample, "messages": need["messages"],
                         "sampling_params": {"n": 1, "temperature": teacher.temperature, "top_p": teacher.top_p,
                                             "max_tokens": teacher.max_new_tokens, "seed": need["seed"] + sample}})
    return rows


class ProcessorGeneration:
    """Rounds of (replay the shards on CPU actors -> ask the vLLM processor what they miss) until every shard is
    done: the processor sees every shard's prompts of a round together, as vLLM's batches want."""

    max_rounds = 3

    def __init__(self, executor, generator: Generator, processor=None):
        self.executor = executor  # the RayExecutor: its ``config`` and ``dataset``
        self.generator = generator
        self.processor = processor  # a Dataset -> Dataset callable; default: build_processor(processor_config(...))

    def _build_processor(self):
        from ray.data.llm import build_processor

        teacher, out = self.generator.cfg.teacher, self.generator.cfg.output_dir
        config = processor_config(teacher, self.executor.config, vllm_model_source(teacher.model, out))
        return build_processor(config, postprocess=lambda row: {"digest": row["digest"], "sample": row["sample"],
                                                                  "text": row["generated_text"]})

    def run(self, jobs: list[tuple[int, list[EmotionRecord]]]):
        import ray

        processor = self.processor or self._build_processor()
        portable, teacher = self.generator.without_teacher(), self.generator.teacher
        state_ref = ray.put({"generator": portable, "jobs": dict(jobs),
                             "teacher": (teacher.name, teacher.model_id, "vllm")})
        answers: dict[str, list[str]] = {}
        pending = [index for index, _ in jobs]
        for _ in range(self.max_rounds):
            answers_ref = ray.put(answers)
            ds = self.executor.dataset(pending).map_batches(
                ReplayActor, batch_size=1, num_cpus=self.executor.config.teacher_cpus,
                compute=ray.data.ActorPoolStrategy(size=max(1, min(self.executor.config.teacher_actors,
                                                                   len(pending)))),
                fn_constructor_kwargs={"state_ref": [state_ref], "answers_ref": [answers_ref]})
            needs, pending = [], []
            for row in ds.iter_rows():
                if row["result"]:
                    yield int(row["index"]), json.loads(row["result"])
                else:
                    pending.append(int(row["index"]))
                    needs.extend(json.loads(row["needs"]))
            if not pending:
                return
            samples: dict[str, dict[int, str]] = {}
            rows = sampling_rows(needs, self.generator.cfg.teacher)
            for out in processor(ray.data.from_items(rows)).iter_rows():
                samples.setdefault(out["digest"], {})[int(out["sample"])] = out["text"]
            for digest, texts in samples.items():
                answers[digest] = [texts[k] for k in sorted(texts)]
        raise RuntimeError(f"{len(pending)} shard(s) still asked the teacher after {self.max_rounds} rounds")
