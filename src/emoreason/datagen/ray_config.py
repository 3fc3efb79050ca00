"""Settings of the Ray executor (``executor: ray``; docs/data.md "Ray"). Plain data: importing it needs no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RayConfig:
    # "auto" or "HOST:PORT" of a running cluster (`ray start --head`); None starts a local Ray bound to 127.0.0.1.
    address: str | None = None
    acoustic_actors: int = 2  # CPU actors analysing acoustic shards
    acoustic_cpus: float = 1.0  # CPUs each acoustic actor reserves
    teacher_actors: int = 1  # actors running the teacher (template, openai, self with transformers), one shard each
    teacher_cpus: float = 1.0
    teacher_gpus: float = 0.0  # self teacher with transformers on GPU nodes: 1
    # self teacher: Ray Data's vLLM processor (ray.data.llm) when vLLM is importable on the driver; "off" uses the
    # transformers actor pool above; "on" insists (an error without vLLM). Engine kwargs: teacher.vllm_kwargs.
    vllm_processor: str | bool = "auto"  # (YAML reads on/off as true/false: both spellings work)
    vllm_engines: int = 1  # engine replicas (data parallel); each takes tensor_parallel_size GPUs
    vllm_batch_size: int = 64  # prompts per batch sent to an engine
    runtime_env: dict = field(default_factory=dict)  # passed to ray.init (env_vars, working_dir, ...)
