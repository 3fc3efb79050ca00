"""The audio verifier: an audio LLM behind an OpenAI-compatible endpoint hears the clip and scores one candidate
rationale + answer (ALM-as-verifier, for ``alm_verifier`` and ``weighted_alm_verifier``).

The rubric (``audio_verifier``, or any rubric the suite names), the fencing of the candidate's text and the reading of
the verdict are :mod:`emoreason.data.judging`'s; this module only puts the clip in front of the rubric's text. The
fence id is random per request, so the endpoint's request cache cannot recognise a repeated verification: verdicts
are cached here under a key of what is verified (endpoint, model, rubric, record and its audio, candidate text and
answer), in the same response cache file. Only readable verdicts are cached: a reply without one is asked again on
the next run.
"""

from __future__ import annotations

import hashlib
import json

from ..data.judging import Rubric, load_rubric
from ..data.schema import EmotionRecord
from .client import EndpointClient
from .judge import RubricScore, graded


class AudioVerifier:
    def __init__(self, client: EndpointClient, rubric: str | Rubric = "audio_verifier", max_tokens: int = 128):
        self.client = client
        self.rubric = rubric if isinstance(rubric, Rubric) else load_rubric(str(rubric))
        self.max_tokens = max_tokens

    def messages(self, audio_part: dict, rationale: str, answer: str | None):
        """The rubric's messages with the clip placed before the text of the user turn, and the request (for the
        verdict's reading)."""
        request = self.rubric.render(rationale=rationale or "(empty)", answer=answer or "(none)")
        messages = [dict(m) for m in request.messages]
        user = messages[-1]
        user["content"] = [dict(audio_part), {"type": "text", "text": user["content"]}]
        return messages, request

    def _key(self, record: EmotionRecord, audio_part: dict, rationale: str, answer: str | None) -> str:
        audio = hashlib.sha256(json.dumps(audio_part, sort_keys=True).encode("utf-8")).hexdigest()
        payload = json.dumps({"endpoint": self.client.base_url, "model": self.client.model,
                              "rubric": [self.rubric.system, self.rubric.user, list(self.rubric.scale)],
                              "record": record.id, "audio": audio, "rationale": rationale, "answer": answer,
                              "max_tokens": self.max_tokens}, sort_keys=True)
        return "verifier:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()

    async def score(self, record: EmotionRecord, audio_part: dict, rationale: str, answer: str | None,
                    seed: int | None = None) -> RubricScore:
        messages, request = self.messages(audio_part, rationale, answer)
        body = {"messages": messages, "temperature": 0.0, "max_completion_tokens": self.max_tokens}
        if seed is not None:
            body["seed"] = seed
        return await graded(self.client, self.rubric, request, self._key(record, audio_part, rationale, answer),
                            **body)
