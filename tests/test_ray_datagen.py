"""`emoreason datagen --executor ray` on a real Ray cluster on loopback: a head and two worker nodes
(ray.cluster_utils.Cluster), CPU only, every Ray process bound to 127.0.0.1, the dashboard off, stopped by the module's
fixture however the tests end. The Ray executor must write byte for byte what the local executor writes (template
teacher, synthetic corpus), survive a killed actor with nothing lost or duplicated, and resume either executor's
shards. The vLLM processor path is checked for its config and, with a stand-in processor, for its rounds."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

# Before Ray is imported: on Linux Ray resolves "127.0.0.1" in an address to the machine's outward IP; with this it
# stays on loopback (ray._private.services.get_node_ip_address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from emoreason.datagen import executors, pipeline  # noqa: E402
from emoreason.datagen.config import EXECUTOR_NAMES, ConfigError, load_config  # noqa: E402
from emoreason.datagen.faults import KILL_ONCE_ENV  # noqa: E402
from emoreason.datagen.pipeline import read_outputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "data_gen" / "configs" / "synthetic.yaml"
OUTPUTS = ("records.jsonl", "pairs.jsonl", "rejected.jsonl", "errors.jsonl", "teacher_chats.jsonl",
           "calibration.json", "cooccurrence.json", "plan_generate.json", "plan_acoustic.json")
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def ray_cluster():
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable above was set
    cluster = None
    try:
        node = {"node_ip_address": LOOPBACK, "object_store_memory": 80 * 2**20}
        # The head has no CPU: the work lands on the two worker nodes.
        cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                          head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(**node, num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _config(out: Path, corpus: Path, *overrides: str, executor: str = "local"):
    return load_config(CONFIG, [f"corpus.options.manifest={json.dumps(str(corpus))}",
                                f"corpus.root={json.dumps(str(corpus.parent))}", f"output_dir={json.dumps(str(out))}",
                                "limit=40", "shard_size=8", "acoustic.shard_size=32", "progress=false",
                                f"executor={executor}", "ray.acoustic_actors=2", "ray.teacher_actors=2", *overrides])


def _assert_same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for folder in ("acoustic", "shards"):
        files_a = sorted(p.relative_to(a) for p in (a / folder).rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b) for p in (b / folder).rglob("*") if p.is_file())
        assert files_a == files_b
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    summary_a.pop("elapsed_seconds"), summary_b.pop("elapsed_seconds")
    assert summary_a == summary_b


@pytest.fixture(scope="module")
def local_run(synth_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("datagen-local")
    pipeline.run(_config(out, synth_corpus))
    return out


def test_executor_settings_are_checked(monkeypatch):
    with pytest.raises(ConfigError, match="executor must be one of"):
        load_config(CONFIG, ["executor=dask"])
    with pytest.raises(ConfigError, match="leave num_workers at 1"):
        load_config(CONFIG, ["executor=ray", "num_workers=2"])
    with pytest.raises(ConfigError, match="dedup_scope: run needs the local executor"):
        load_config(CONFIG, ["executor=ray", "dedup_scope=run"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(CONFIG, ["ray.workers=3"])
    assert set(executors.EXECUTORS) == set(EXECUTOR_NAMES)

    def ray_stand_in(cfg):
        raise RuntimeError("the ray executor was opened")

    monkeypatch.setitem(executors.EXECUTORS, "ray", ray_stand_in)
    with pytest.raises(RuntimeError, match="ray executor was opened"):  # pipeline.run never falls back to local
        pipeline.run(load_config(CONFIG, ["executor=ray"]))


def test_vllm_processor_config_for_n_engines():
    pytest.importorskip("ray.data.llm")
    from emoreason.datagen.ray_config import RayConfig
    from emoreason.datagen.ray_vllm_processor import processor_config, sampling_rows
    from emoreason.datagen.teachers import TeacherConfig

    teacher = TeacherConfig(name="self", model="/ckpt", temperature=0.7, top_p=0.9, max_new_tokens=128,
                            vllm_kwargs={"tensor_parallel_size": 2, "max_model_len": 2048})
    config = processor_config(teacher, RayConfig(vllm_engines=4, vllm_batch_size=32), "/ckpt/teacher_lm")
    assert config.model_source == "/ckpt/teacher_lm" and config.batch_size == 32
    assert config.concurrency == 4
    assert config.engine_kwargs["tensor_parallel_size"] == 2 and config.engine_kwargs["max_model_len"] == 2048
    assert config.engine_kwargs["trust_remote_code"] is False
    rows = sampling_rows([{"digest": "d", "messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 7}],
                         teacher)
    assert [r["sampling_params"]["seed"] for r in rows] == [7, 8] and [r["sample"] for r in rows] == [0, 1]
    assert rows[0]["sampling_params"] == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 128, "seed": 7}


def test_the_self_teacher_takes_the_vllm_processor_only_where_vllm_imports(monkeypatch):
    import builtins
    import sys
    import types

    from emoreason.datagen.ray_executor import RayExecutor

    real_import = builtins.__import__

    def without_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("no vLLM here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_vllm)

    def uses(*overrides):
        cfg = load_config(CONFIG, ["executor=ray", "teacher.name=self", "teacher.model=/ckpt", *overrides])
        return RayExecutor(cfg.ray, cfg)._use_processor()

    assert not uses()  # auto without vLLM: the transformers actor pool
    assert not uses("teacher.name=template") and not uses("ray.vllm_processor=off")
    with pytest.raises(ValueError, match="needs vLLM"):
        uses("ray.vllm_processor=on")
    with pytest.raises(ValueError, match="needs vLLM"):
        uses("teacher.backend=vllm")
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # vLLM importable
    assert uses() and not uses("teacher.backend=transformers")


def _ray_listeners() -> list[tuple[str, str]]:
    import psutil

    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or not conn.pid:
            continue
        try:
            proc = psutil.Process(conn.pid)
            name = " ".join(proc.cmdline()[:2]) or proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if conn.pid == os.getpid() or any(key in name for key in ("raylet", "gcs_server", "ray::", "ray/")):
            found.append((conn.laddr.ip, name[:80]))
    return found


@pytest.mark.slow
def test_a_local_ray_started_by_the_executor_listens_on_loopback_only(tmp_path, monkeypatch):
    """Runs before the module's cluster exists: the executor starts (and stops) its own local Ray."""
    from ray._private import ray_constants

    from emoreason.datagen.config import DatagenConfig
    from emoreason.datagen.ray_executor import RayExecutor

    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # as on any Linux machine
    cfg = DatagenConfig(output_dir=str(tmp_path), executor="ray")
    with RayExecutor(cfg.ray, cfg):
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {LOOPBACK}
        listeners = _ray_listeners()
    assert not ray.is_initialized()  # it disconnected what it connected
    assert listeners and all(ip in (LOOPBACK, f"::ffff:{LOOPBACK}") for ip, _ in listeners), listeners


@pytest.mark.slow
def test_cluster_has_three_nodes_all_on_loopback(ray_cluster):
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 3 and {n["NodeManagerAddress"] for n in nodes} == {LOOPBACK}
    assert ray.cluster_resources()["CPU"] == 2
    listeners = _ray_listeners()
    assert listeners and all(ip in (LOOPBACK, f"::ffff:{LOOPBACK}") for ip, _ in listeners), listeners


@pytest.mark.slow
def test_ray_executor_writes_what_the_local_executor_writes(ray_cluster, local_run, synth_corpus, tmp_path):
    out = tmp_path / "ray"
    summary = pipeline.run(_config(out, synth_corpus, executor="ray"))
    assert summary["complete"] and summary["inputs"] == 40 and summary["kept"] > 30 and summary["pairs"] > 30
    _assert_same_outputs(local_run, out)


@pytest.mark.slow
def test_a_killed_actor_is_retried_and_nothing_is_lost_or_duplicated(ray_cluster, local_run, synth_corpus, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "ray-killed"
    # SIGKILL an acoustic actor at its 20th clip and a teacher actor at its 5th record, once each
    monkeypatch.setenv(KILL_ONCE_ENV, "acoustic:20,generate:5")
    summary = pipeline.run(_config(out, synth_corpus, executor="ray"))
    kills = {phase: json.loads((out / f"ray-killed-{phase}").read_text()) for phase in ("acoustic", "generate")}
    assert kills["acoustic"]["count"] == 20 and kills["generate"]["count"] == 5
    outputs = read_outputs(out)
    ids = [r.id for r in outputs["records"]]
    planned = [i for shard in json.loads((out / "plan_generate.json").read_text()) for i in shard]
    dropped = {r["id"] for r in outputs["rejected"] if r["outcome"] == "dropped"}
    assert len(ids) == len(set(ids)) and not set(ids) & dropped  # 0 duplicated
    assert sorted(set(ids) | dropped) == sorted(planned) and summary["inputs"] == 40  # 0 lost
    analysed = [json.loads(line)["id"] for p in sorted((out / "acoustic").glob("*.jsonl"))
                for line in p.read_text().splitlines()]
    clips = sum(len(shard) for shard in json.loads((out / "plan_acoustic.json").read_text()))
    assert len(analysed) == len(set(analysed)) == clips
    _assert_same_outputs(local_run, out)
    print(f"\nkill test: acoustic actor pid {kills['acoustic']['pid']} killed at clip {kills['acoustic']['count']}, "
          f"teacher actor pid {kills['generate']['pid']} killed at record {kills['generate']['count']}; "
          f"{len(analysed)} clips analysed once each, {len(ids)} records kept + {len(dropped)} dropped of "
          f"{len(planned)} planned: 0 lost, 0 duplicated")


@pytest.mark.slow
def test_a_restart_skips_finished_shards_of_either_executor(ray_cluster, local_run, tmp_path, synth_corpus):
    out = tmp_path / "half-done"
    shutil.copytree(local_run, out)
    for name in ("records.jsonl", "records.parquet", "pairs.jsonl", "pairs.parquet", "summary.json"):
        (out / name).unlink()
    for index in (1, 3):  # two generation shards and two acoustic shards missing, as after a kill
        shutil.rmtree(out / "shards" / f"{index:05d}")
    for index in (0, 5):
        (out / "acoustic" / f"{index:05d}.jsonl").unlink()
    (out / "calibration.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.jsonl")}
    kept.update({p: p.stat().st_mtime_ns for p in (out / "acoustic").glob("*.jsonl")})
    pipeline.run(_config(out, synth_corpus, executor="ray"))
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # finished shards were not redone
    _assert_same_outputs(local_run, out)


# -- the vLLM processor path, with a stand-in processor --------------------------------------------------------
def echo_answer(prompt: str, seed: int) -> str:
    """What the stand-in engine answers: a function of the prompt and the seed only (as a seeded engine)."""
    from emoreason.data.response_format import format_response

    match = re.search(r"the emotion is (\w+)", prompt)
    target = match.group(1) if match else "neutral"
    if seed % 3 == 0:  # some answers fail the filters, so that the next sample is used
        return format_response(f"It sounds {target} to me (draw {seed % 97}).", target)
    return format_response(f"I listen to how the sentence is delivered (draw {seed % 97}). Overall the speaker "
                           f"sounds {target}.", target)


class EchoTeacher:
    name, model_id, backend = "self", "stand-in-engine", "vllm"

    def __init__(self, config, work_dir=None):
        self.config = config

    def generate(self, requests):
        return [[echo_answer(r.prompt, r.seed + k) for k in range(r.n)] for r in requests]


def echo_processor(ds):
    def answer(row):
        return {"digest": row["digest"], "sample": row["sample"],
                "text": echo_answer(row["messages"][0]["content"], row["sampling_params"]["seed"])}

    return ds.map(answer)


@pytest.mark.slow
def test_processor_rounds_give_what_one_teacher_call_per_shard_gives(ray_cluster, synth_corpus, tmp_path,
                                                                     monkeypatch):
    """The self teacher's Ray path (replay the shards, ask the processor what they miss, again) against the local
    executor with a teacher answering the same function of (prompt, seed) in place: the same outputs."""
    from emoreason.datagen.ray_executor import RayExecutor
    from emoreason.datagen.ray_vllm_processor import ProcessorGeneration

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(pipeline, "get_teacher", lambda config, work_dir=None: EchoTeacher(config))
    local = tmp_path / "local"
    pipeline.run(_config(local, synth_corpus, "teacher.num_samples=2"))
    out = tmp_path / "processor"
    cfg = _config(out, synth_corpus, "teacher.num_samples=2", executor="ray")
    rounds = []

    class StandIn(RayExecutor):
        def generate(self, generator, jobs):
            run = ProcessorGeneration(self, generator, processor=lambda ds: rounds.append(1) or echo_processor(ds))
            yield from run.run(jobs)

    with StandIn(cfg.ray, cfg) as executor:
        summary = pipeline.run(cfg, executor)
    assert summary["kept"] > 0 and summary["pairs"] > 0 and len(rounds) == 2  # rationales, then pair negatives
    _assert_same_outputs(local, out)


@pytest.mark.slow
def test_openai_teacher_from_actors_gives_what_the_local_run_gives(ray_cluster, synth_corpus, tmp_path):
    """The openai teacher in Ray's teacher actors (each sends its shard's requests concurrently) against a scripted
    endpoint on 127.0.0.1 that answers a function of (prompt, seed): the local executor's outputs, and the same
    number of requests (none asked twice)."""
    from emoreason.eval.scripted import create_scripted_app, last_user_text
    from emoreason.serve.background import BackgroundServer

    def script(body):
        return [echo_answer(last_user_text(body), body["seed"] + k) for k in range(body.get("n", 1))]

    app = create_scripted_app(script, model="served")
    with BackgroundServer(app) as server:
        teacher = ["teacher.name=openai", "teacher.model=served", f"teacher.base_url={server.url}/v1",
                   "teacher.concurrency=4", "limit=24"]
        pipeline.run(_config(tmp_path / "local", synth_corpus, *teacher))
        local_hits = app.state.hits
        summary = pipeline.run(_config(tmp_path / "ray", synth_corpus, *teacher, executor="ray"))
    assert summary["kept"] > 0 and summary["pairs"] > 0 and summary["teacher_failures"] == 0
    assert app.state.hits == 2 * local_hits
    _assert_same_outputs(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow
def test_self_teacher_with_transformers_in_an_actor_pool(ray_cluster, synth_corpus, tiny_model_dir, tmp_path):
    """Without vLLM the self teacher runs in the teacher actors, the model loaded once per actor; greedy, it writes
    what the local executor writes."""
    teacher = ["teacher.name=self", f"teacher.model={json.dumps(str(tiny_model_dir))}", "teacher.backend=transformers",
               "teacher.device=cpu", "teacher.temperature=0", "teacher.num_samples=1", "teacher.max_new_tokens=12",
               "limit=6", "shard_size=3"]
    pipeline.run(_config(tmp_path / "local", synth_corpus, *teacher))
    summary = pipeline.run(_config(tmp_path / "ray", synth_corpus, *teacher, executor="ray"))
    assert summary["inputs"] == 6 and summary["shards"] == 2
    rejected = read_outputs(tmp_path / "ray")["rejected"]
    assert rejected and all(r["text"] is not None for r in rejected if r["sample"] is not None)
    _assert_same_outputs(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow
def test_an_unreachable_teacher_stops_the_run_as_locally(ray_cluster, synth_corpus, tmp_path):
    import socket

    from emoreason.datagen.teachers import TeacherUnavailable

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    teacher = ["teacher.name=openai", "teacher.model=served", f"teacher.base_url=http://{LOOPBACK}:{port}/v1",
               "teacher.timeout=5", "limit=8"]
    with pytest.raises(TeacherUnavailable, match="cannot be reached"):
        pipeline.run(_config(tmp_path / "ray", synth_corpus, *teacher, executor="ray"))
    assert not (tmp_path / "ray" / "summary.json").exists() and (tmp_path / "ray" / "acoustic").is_dir()
