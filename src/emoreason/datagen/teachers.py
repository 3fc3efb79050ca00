"""Teachers write rationales from seed descriptions. A registry: ``template``, ``self``, ``openai``.

* ``template``: deterministic rule-based rationales from the measured cue words and the transcript, in several
  phrasings. The offline baseline and an ablation; its output passes the filters by construction.
* ``self``: the backbone LLM of the model being trained (DeSTA-style self-generation, so the target stays in the
  LLM's own voice). ``model`` is an EmoReason checkpoint (its language model is used text-only) or a plain causal-LM
  checkpoint. Backend ``vllm`` (offline batched ``LLM.generate``; the LM is exported to a folder vLLM can load),
  ``transformers`` (batched ``generate``), or ``auto`` (vLLM when importable, else transformers).
* ``openai``: any OpenAI-compatible chat endpoint (vLLM's server, our server, a hosted API), through
  :class:`emoreason.data.endpoint.ChatEndpoint` (the one client every stage uses: key from ``$api_key_env``, timeouts,
  retries with backoff on connection errors, 408/409/429, 5xx and malformed replies, none on other 4xx). A request
  that still fails after the retries comes back as a :class:`TeacherFailure` for that prompt (the run records it and
  goes on); :class:`TeacherUnavailable` when no request of a batch could reach the endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..data.cues import CUES
from ..data.endpoint import ChatEndpoint, EndpointError
from ..data.response_format import format_response
from .seed import SeedDescription


@dataclass
class TeacherConfig:
    name: str = "template"
    model: str | None = None  # checkpoint path / hub id (self), model name (openai)
    backend: str = "auto"  # self: auto | vllm | transformers
    num_samples: int = 2  # K samples per clip (rejection sampling)
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 8  # prompts per generate call (transformers)
    device: str | None = None  # transformers: cpu / cuda (default: cuda when available)
    dtype: str = "auto"
    base_url: str | None = None  # openai
    api_key_env: str = "OPENAI_API_KEY"  # openai: the variable holding the key (never the key itself)
    concurrency: int = 4  # openai: requests in flight
    timeout: float = 120.0  # openai: seconds per attempt
    max_retries: int = 2  # openai: attempts after the first, for failures retrying can fix
    vllm_kwargs: dict = field(default_factory=dict)


@dataclass
class TeacherRequest:
    """One prompt and what the template teacher needs to answer it without an LLM."""

    key: str  # record id + purpose, also the sampling seed key
    prompt: str
    n: int
    seed: int
    description: SeedDescription
    target: str
    distribution: dict[str, float] | None = None
    kind: str = "rationale"  # "rationale" | "spurious"
    spurious: str | None = None

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class TeacherFailure:
    """In place of a prompt's samples: the request failed for good; ``reason`` says why."""

    reason: str


class TeacherUnavailable(RuntimeError):
    """The teacher cannot be reached at all (every request of a batch failed to connect): stop, resume later."""


class Teacher:
    name = "teacher"

    def __init__(self, config: TeacherConfig):
        self.config = config

    @property
    def model_id(self) -> str:
        return self.config.model or self.name

    def generate(self, requests: list[TeacherRequest]) -> list[list[str] | TeacherFailure]:
        raise NotImplementedError


# -- template -------------------------------------------------------------------------------------------------
OPENERS = (
    'The speaker says "{t}"',
    'The words are "{t}"',
    'In this clip the speaker says: "{t}"',
    'What is said is "{t}"',
)
NO_TRANSCRIPT = ("The words are hard to make out, so the voice has to carry the judgement.",
                 "There is no clear wording to rely on, so I listen to the voice itself.")
LEXICAL = {
    "positive": ("The wording itself sounds upbeat.", "The words lean positive."),
    "negative": ("The wording itself carries some strain.", "The words lean negative."),
    "neutral": ("The wording is fairly matter-of-fact, so most of the information is in how it is said.",
                "The words alone are plain, so the delivery matters most.",
                "Nothing in the wording is emotional on its own; the voice has to tell."),
}
POSITIVE_WORDS = {"great", "love", "happy", "wonderful", "thanks", "thank", "glad", "amazing", "nice", "good", "yes",
                  "fun", "excited", "awesome", "beautiful", "perfect"}
NEGATIVE_WORDS = {"hate", "terrible", "sorry", "bad", "awful", "never", "can't", "cannot", "no", "sad", "angry",
                  "stop", "wrong", "worst", "afraid", "lost", "miss", "die", "hurt", "problem"}
CUE_PHRASES = {
    "pitch_level": ("The pitch is {v}", "Its pitch sounds {v}", "The voice has a {v} pitch"),
    "energy_level": ("the volume is {v}", "the loudness is {v}", "the volume sounds {v}"),
    "rate_level": ("the speaking rate is {v}", "the pace is {v}", "the tempo is {v}"),
    "intonation": ("the intonation is {v}", "the intonation contour is {v}", "the melody of the sentence is {v}"),
    "pitch_variation": ("pitch variation is {v}",),
}
# Prosodic profile that each emotion tends to have (in the cue words); used to say which cues support the answer.
PROFILES = {
    "happy": {"pitch_level": {"high"}, "energy_level": {"loud", "normal"}, "rate_level": {"fast"},
              "pitch_variation": {"expressive"}},
    "angry": {"energy_level": {"loud"}, "rate_level": {"fast"}, "pitch_level": {"normal", "high"},
              "pitch_variation": {"expressive"}},
    "sad": {"pitch_level": {"low"}, "energy_level": {"soft"}, "rate_level": {"slow"},
            "pitch_variation": {"monotone"}},
    "neutral": {"pitch_level": {"normal"}, "energy_level": {"normal"}, "rate_level": {"normal"},
                "intonation": {"flat", "falling"}},
    "calm": {"energy_level": {"soft", "normal"}, "rate_level": {"slow", "normal"}, "pitch_variation": {"monotone"}},
    "fearful": {"pitch_level": {"high"}, "rate_level": {"fast"}, "energy_level": {"soft", "normal"}},
    "surprised": {"pitch_level": {"high"}, "intonation": {"rising", "rise-fall"}, "pitch_variation": {"expressive"}},
    "disgusted": {"rate_level": {"slow"}, "pitch_level": {"low"}},
    "contempt": {"rate_level": {"slow"}, "intonation": {"falling"}},
    "frustrated": {"energy_level": {"loud", "normal"}, "intonation": {"falling"}},
    "other": {},
}
CUE_NAMES = {key: CUES[key].noun for key in ("pitch_level", "energy_level", "rate_level", "intonation",
                                             "pitch_variation")}
LINKS = (
    "Together, the {cues} {fit} {e} speech.",
    "The {cues} {point} toward {e}.",
    "That {cues} is typical of someone who feels {e}.",
)
LINKS_WEAK = (
    "None of the cues is strongly marked, and the overall delivery fits {e} best.",
    "The cues are mixed, but on balance the delivery sounds {e}.",
)
CAVEATS = ("The {cues} is less typical of {e}, but it does not outweigh the rest.",
           "Only the {cues} fits less well with {e}.")
SECONDARY = ("There is also a trace of {s} in the delivery.", "Some listeners might hear a little {s} as well.")
CONCLUSIONS = ("Overall the speaker sounds {e}.", "So the emotion is most likely {e}.",
               "Weighing these cues, I judge the emotion to be {e}.")


def _lexical_tone(text: str | None) -> str:
    words = set((text or "").lower().replace(".", " ").replace(",", " ").replace("!", " ").split())
    pos, neg = len(words & POSITIVE_WORDS), len(words & NEGATIVE_WORDS)
    return "positive" if pos > neg else "negative" if neg > pos else "neutral"


def _opener(rng: random.Random, transcript: str | None) -> str:
    if not transcript:
        return rng.choice(NO_TRANSCRIPT)
    text = rng.choice(OPENERS).format(t=transcript.strip())
    return text if transcript.strip()[-1:] in ".!?" else text + "."


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class TemplateTeacher(Teacher):
    """Rule-based rationales: grounded in the (given) cue words and transcript, several phrasings per part."""

    name = "template"

    @property
    def model_id(self) -> str:
        return "rule-based"

    def generate(self, requests: list[TeacherRequest]) -> list[list[str]]:
        return [[self.write(r, i) for i in range(r.n)] for r in requests]

    def write(self, request: TeacherRequest, sample: int) -> str:
        digest = hashlib.sha1(f"{request.seed}:{request.key}:{sample}".encode()).hexdigest()
        rng = random.Random(int(digest[:12], 16))
        d, e = request.description, request.target
        if request.kind == "spurious":
            rationale = (f"{_opener(rng, d.transcript)}"
                         f" The key detail here is the {request.spurious or 'recording itself'}, and that is what "
                         f"tells me how the speaker feels. {rng.choice(CONCLUSIONS).format(e=e)}")
            return format_response(rationale, e)
        sentences = [_opener(rng, d.transcript)]
        sentences.append(rng.choice(LEXICAL[_lexical_tone(d.transcript)]))
        cue_keys = [k for k in ("pitch_level", "energy_level", "rate_level", "intonation") if d.cues.get(k)]
        if d.cues.get("pitch_variation") and rng.random() < 0.5:
            cue_keys.append("pitch_variation")
        rng.shuffle(cue_keys)
        clauses = [rng.choice(CUE_PHRASES[k]).format(v=d.cues[k]) for k in cue_keys]
        if clauses:
            clauses = [c[0].lower() + c[1:] for c in clauses]
            clauses[0] = clauses[0][0].upper() + clauses[0][1:]
            sentences.append(_join(clauses) + ".")
        profile = PROFILES.get(e, {})
        support = [CUE_NAMES[k] for k in cue_keys if d.cues.get(k) in profile.get(k, set())]
        against = [CUE_NAMES[k] for k in cue_keys if k in profile and d.cues.get(k) not in profile[k]]
        if support:
            plural = len(support) > 1
            links = LINKS[:2] if plural else LINKS
            sentences.append(rng.choice(links).format(cues=_join(support), e=e, fit="fit" if plural else "fits",
                                                      point="point" if plural else "points"))
            if against and rng.random() < 0.7:
                sentences.append(rng.choice(CAVEATS).format(cues=_join(against[:1]), e=e))
        else:
            sentences.append(rng.choice(LINKS_WEAK).format(e=e))
        dist = request.distribution or {}
        runner_up = sorted(((s, k) for k, s in dist.items() if k != e), reverse=True)
        if runner_up and runner_up[0][0] >= 0.3:
            sentences.append(rng.choice(SECONDARY).format(s=runner_up[0][1]))
        sentences.append(rng.choice(CONCLUSIONS).format(e=e))
        return format_response(" ".join(sentences), e, request.distribution)


# -- self: the backbone LLM -----------------------------------------------------------------------------------
def is_emoreason_checkpoint(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "emoreason"


def load_language_model(path: str, device: str | None = None, dtype: str = "auto"):
    """(causal LM, tokenizer) for text-only generation from an EmoReason checkpoint or a plain LLM checkpoint.

    For an EmoReason checkpoint the composite model's ``model.language_model`` and ``lm_head`` are placed in a
    causal-LM shell built from its ``text_config`` (no weights copied, no audio towers used).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype not in (None, "auto") else "auto"
    if is_emoreason_checkpoint(path):
        from ..modeling import load_pretrained, text_only_lm

        model, processor = load_pretrained(path, dtype=torch_dtype)
        lm = text_only_lm(model)
        lm.generation_config.audio_token_id = None
        tokenizer = processor.tokenizer
        if not tokenizer.chat_template:
            tokenizer.chat_template = processor.chat_template
        # The composite never writes an <audio> placeholder; the text-only LM must not either.
        lm.generation_config.suppress_tokens = [model.config.audio_token_id]
    else:
        from ..modeling.loading import safe_load_kwargs

        lm = AutoModelForCausalLM.from_pretrained(path, **safe_load_kwargs(dtype=torch_dtype))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return lm.to(device).eval(), tokenizer


def export_language_model(path: str, out_dir: str | Path) -> Path:
    """Save the text-only LM of an EmoReason checkpoint as a plain checkpoint (what vLLM's ``LLM`` loads).

    Safe for datagen workers sharing a run: each writes a private folder and renames it into place (one atomic
    step), so ``out_dir`` either does not exist or is complete; a worker that loses the race drops its copy."""
    out = Path(out_dir)
    if out.is_dir():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        lm, tokenizer = load_language_model(path, device="cpu")
        lm.generation_config.suppress_tokens = None
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not out.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def vllm_model_source(model: str, work_dir: str | Path | None) -> str:
    """What vLLM loads for the ``self`` teacher's ``model``: an EmoReason checkpoint's text-only LM, exported once to
    ``work_dir/teacher_lm`` (shared by every engine of the run), else ``model`` itself (a plain LLM checkpoint)."""
    if is_emoreason_checkpoint(model):
        return str(export_language_model(model, Path(work_dir or ".") / "teacher_lm"))
    return model


class SelfTeacher(Teacher):
    name = "self"

    def __init__(self, config: TeacherConfig, work_dir: str | Path | None = None):
        super().__init__(config)
        if not config.model:
            raise ValueError("the self teacher needs teacher.model: the EmoReason checkpoint (or its LLM) to use")
        self.work_dir = Path(work_dir) if work_dir else None
        backend = config.backend
        if backend == "auto":
            try:
                import vllm  # noqa: F401

                backend = "vllm"
            except ImportError:
                backend = "transformers"
        if backend not in ("vllm", "transformers"):
            raise ValueError(f"self teacher backend must be auto, vllm or transformers, got {backend!r}")
        self.backend = backend
        self._engine = None

    def _load(self):
        if self._engine is not None:
            return self._engine
        if self.backend == "vllm":
            from vllm import LLM

            model = self.config.model
            if is_emoreason_checkpoint(model):
                # Like the transformers backend, never let the text-only LM write an <audio> placeholder.
                self._banned_tokens = [json.loads((Path(model) / "config.json").read_text())["audio_token_id"]]
            self._engine = LLM(model=vllm_model_source(model, self.work_dir), trust_remote_code=False,
                               **self.config.vllm_kwargs)
        else:
            self._engine = load_language_model(self.config.model, self.config.device, self.config.dtype)
        return self._engine

    def generate(self, requests: list[TeacherRequest]) -> list[list[str]]:
        if not requests:
            return []
        engine = self._load()
        return self._generate_vllm(engine, requests) if self.backend == "vllm" else self._generate_hf(engine, requests)

    def _generate_vllm(self, llm, requests):
        # One offline batched call for the whole shard: vLLM schedules all prompts (and their n samples) together.
        from vllm import SamplingParams

        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                   for r in requests]
        banned = {token: -100.0 for token in getattr(self, "_banned_tokens", [])} or None
        params = [SamplingParams(n=r.n, temperature=self.config.temperature, top_p=self.config.top_p,
                                 max_tokens=self.config.max_new_tokens, seed=r.seed, logit_bias=banned)
                  for r in requests]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [[o.text for o in result.outputs] for result in outputs]

    def _generate_hf(self, engine, requests):
        import torch

        lm, tokenizer = engine
        results: list[list[str]] = []
        size = max(1, self.config.batch_size)
        for start in range(0, len(requests), size):
            batch = requests[start: start + size]
            texts = [tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                     for r in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
            n = max(r.n for r in batch)
            torch.manual_seed(batch[0].seed)
            with torch.no_grad():
                # temperature 0: greedy, as vLLM's SamplingParams reads it (the backends then agree token for token)
                sampling = (dict(do_sample=True, temperature=self.config.temperature, top_p=self.config.top_p)
                            if self.config.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None))
                out = lm.generate(**enc, **sampling,
                                  max_new_tokens=self.config.max_new_tokens, num_return_sequences=n,
                                  pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, r in enumerate(batch):
                results.append(decoded[i * n: i * n + r.n])
        return results


# -- openai: any OpenAI-compatible endpoint -------------------------------------------------------------------
class OpenAITeacher(Teacher):
    name = "openai"

    def __init__(self, config: TeacherConfig, work_dir=None):
        super().__init__(config)
        if not config.base_url:
            raise ValueError("the openai teacher needs teacher.base_url (e.g. http://127.0.0.1:8000/v1)")
        if not config.model:
            raise ValueError("the openai teacher needs teacher.model (the served model name)")
        self.client = ChatEndpoint(config.base_url, config.model, api_key_env=config.api_key_env,
                                   timeout=config.timeout, max_retries=config.max_retries, backoff=0.5,
                                   max_backoff=8.0)

    def _one(self, request: TeacherRequest) -> list[str]:
        texts: list[str] = []
        while len(texts) < request.n:  # a server may return fewer choices than asked: ask for the rest
            response = self.client.chat(
                messages=request.messages, n=request.n - len(texts), temperature=self.config.temperature,
                top_p=self.config.top_p, max_completion_tokens=self.config.max_new_tokens,
                seed=request.seed + len(texts))
            texts.extend(c["message"]["content"] for c in response["choices"])
        return texts[: request.n]

    def _one_or_failure(self, request: TeacherRequest) -> list[str] | EndpointError:
        try:
            return self._one(request)
        except EndpointError as err:  # kept as it is, to tell "unreachable" apart
            return err

    def generate(self, requests: list[TeacherRequest]) -> list[list[str] | TeacherFailure]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool:
            results = list(pool.map(self._one_or_failure, requests))
        unreachable = [r for r in results if isinstance(r, EndpointError) and r.unreachable]
        if len(unreachable) == len(results):
            raise TeacherUnavailable(f"the teacher endpoint {self.config.base_url} cannot be reached "
                                     f"({unreachable[0]}); the run stops here and resumes where it stopped")
        return [TeacherFailure(str(r)) if isinstance(r, EndpointError) else r for r in results]


TEACHERS: dict[str, type[Teacher]] = {
    "template": TemplateTeacher,
    "self": SelfTeacher,
    "openai": OpenAITeacher,
}


def get_teacher(config: TeacherConfig, work_dir: str | Path | None = None) -> Teacher:
    if config.name not in TEACHERS:
        raise ValueError(f"unknown teacher {config.name!r}; known: {', '.join(TEACHERS)}")
    cls = TEACHERS[config.name]
    return cls(config) if cls is TemplateTeacher else cls(config, work_dir=work_dir)
