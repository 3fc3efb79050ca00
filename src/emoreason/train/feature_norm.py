"""Measure the statistics of the projector's global mean-variance normalisation (``feature_norm: global_mvn``).

Frozen encoders emit features whose dimensions differ wildly in offset and scale (a few large dimensions dominate a
freshly initialised projector). Standardising each dimension with statistics of the training data, as speech toolkits
do for their input features (ESPnet's ``GlobalMVN``, Kaldi's global CMVN), lets the projector weigh every dimension
alike. The statistics are measured once, before SFT, over the training clips (from the feature cache when it has them,
else by running the towers), and saved in the projector's buffers: GRPO, DPO, export and both servers reuse them.

In a distributed run (:func:`fit_feature_norm_once`) only the main process measures, with the towers on its
accelerator, and broadcasts the statistics: the other ranks wait instead of each redoing the same minutes of encoding
on CPU before training starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping

import torch

from ..data.schema import resolve_under_root
from .feature_cache import audio_encoder_of

logger = logging.getLogger(__name__)


class _Moments:
    """Running sum and sum of squares in float64 over the first (frame) axis of (..., frames, dim) tensors."""

    def __init__(self):
        self.total = self.squares = None
        self.count = 0

    def add(self, states: torch.Tensor) -> None:
        x = states.double()
        s, q = x.sum(-2), (x * x).sum(-2)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.count += states.shape[-2]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp(min=0.0)
        return mean.float(), var.sqrt().float()


def _projector(model):
    """(the audio encoder, its projector) of a (PEFT-wrapped) model."""
    encoder = audio_encoder_of(model)
    return encoder, encoder.projector


def fit_feature_norm(model, processor, clips: Iterable[Mapping], data_root: str | os.PathLike,
                     feature_cache=None, max_clips: int = 256, show_progress: bool = True,
                     batch_size: int | None = None) -> dict:
    """Measure and install the statistics over up to ``max_clips`` distinct clips (rows with ``clip_id``/``id`` and
    ``audio``). Returns a summary ({clips, frames, from_cache}); a model with ``feature_norm: none`` is left alone.

    Clips are encoded as the feature cache encodes them: in batches (``batch_size``, default
    ``feature_cache.encode_batch_size``) sorted by length, each clip's states cut at its own length and independent of
    its batch, so padding never enters the statistics. Deterministic for a given list of clips: every rank of a
    distributed run computes the same numbers.
    """
    from tqdm.auto import tqdm

    from .feature_cache import encode_in_batches

    inner, projector = _projector(model)
    if projector.feature_norm != "global_mvn":
        return {"clips": 0, "frames": 0, "from_cache": 0}
    chosen, seen = [], set()
    for row in clips:
        clip_id = row.get("clip_id") or row.get("id")
        if clip_id in seen:
            continue
        seen.add(clip_id)
        chosen.append((clip_id, row["audio"]))
        if len(chosen) >= max_clips:
            break
    if not chosen:
        raise ValueError("fit_feature_norm: no clips to measure the feature statistics on")
    content, para = _Moments(), _Moments()

    def add(states):
        content.add(states["content"])
        p = states["paralinguistic"]
        para.add(p if p.dim() == 3 else p[None])  # (layers, frames, D) or (frames, D) -> one layer

    cached, live = [], []
    for clip in chosen:
        (cached if feature_cache is not None and clip[0] in feature_cache else live).append(clip)
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(chosen), desc="feature statistics", unit="clip", disable=not show_progress)
    for clip_id, _ in cached:
        add(feature_cache.get(clip_id))
        progress.update(1)

    def load(item):
        clip_id, audio = item
        return processor.load(str(resolve_under_root(audio, data_root, record=clip_id)))

    for _, states in encode_in_batches(inner, processor, load, live, batch_size=batch_size):
        add(states)
        progress.update(1)
    progress.close()
    from_cache = len(cached)
    model.train(was_training)
    content_mean, content_std = content.result()
    para_mean, para_std = para.result()
    if para_mean.shape[0] != projector.paralinguistic_mean.shape[0]:  # cached all layers, the model uses the last
        para_mean, para_std = para_mean[-1:], para_std[-1:]
    projector.set_feature_stats(content_mean, content_std, para_mean, para_std, frames=content.count)
    logger.info("feature normalisation: statistics from %d clips (%d content frames, %d from the feature cache)",
                len(chosen), content.count, from_cache)
    return {"clips": len(chosen), "frames": content.count, "from_cache": from_cache}


STAT_BUFFERS = ("content_mean", "content_std", "paralinguistic_mean", "paralinguistic_std", "feature_norm_frames")


@contextlib.contextmanager
def _towers_on(encoder, device):
    """The audio encoder (the towers and the projector: what encoding needs) on ``device`` for the duration; each
    part back where it was afterwards. The language model, the bulk of the weights, stays put."""
    if device is None:
        yield
        return
    device = torch.device(device)
    parts = list(encoder.children())
    homes = [next(module.parameters(), torch.empty(0)).device for module in parts]
    if all(home == device for home in homes):
        yield
        return
    try:
        for module in parts:
            module.to(device)
        yield
    finally:
        for module, home in zip(parts, homes):
            module.to(home)


def _distributed_world() -> tuple[bool, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank()
    return False, 0


def fit_feature_norm_once(model, processor, clips: Iterable[Mapping], data_root: str | os.PathLike,
                          feature_cache=None, max_clips: int = 256, show_progress: bool = True,
                          device: torch.device | str | None = None) -> dict:
    """:func:`fit_feature_norm` on the main process only, with the towers on ``device`` (the accelerator: pass
    ``training_args.device``), then the statistics broadcast to every rank. Without a process group it is
    :func:`fit_feature_norm` on ``device``. Other ranks never read ``clips``.

    A failure on the main process is raised on every rank (no rank is left waiting in a collective).
    """
    import torch.distributed as dist

    distributed, rank = _distributed_world()
    inner, projector = _projector(model)
    if projector.feature_norm != "global_mvn":
        return {"clips": 0, "frames": 0, "from_cache": 0}
    summary, error = None, None
    if rank == 0:
        try:
            with _towers_on(inner, device):
                summary = fit_feature_norm(model, processor, clips, data_root, feature_cache=feature_cache,
                                           max_clips=max_clips, show_progress=show_progress)
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after telling the other ranks
            if not distributed:
                raise
            error = exc
    if not distributed:
        return summary
    shared = [summary, None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(shared, src=0)
    summary, message = shared
    if message is not None:
        if error is not None:
            raise error
        raise RuntimeError(f"feature normalisation failed on the main process: {message}")
    # NCCL broadcasts device tensors only; gloo takes CPU tensors.
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    with torch.no_grad():
        for name in STAT_BUFFERS:
            buffer = getattr(projector, name)
            tensor = buffer.detach().to(comm_device).contiguous()
            dist.broadcast(tensor, src=0)
            buffer.copy_(tensor.to(buffer.device))
    if rank != 0:
        logger.info("feature normalisation: statistics received from the main process (%d frames)",
                    int(projector.feature_norm_frames))
    return summary
