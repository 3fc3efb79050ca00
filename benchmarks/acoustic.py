"""Acoustic analysis speed and pitch agreement: our vectorised-YIN analysis vs. a librosa.pyin-based one, one run.

    python benchmarks/acoustic.py [--sentences-per-speaker 2] [--repeats 3] [--corpus-dir DIR]

Renders the espeak-ng corpus (9 speakers x 4 emotions x N clips, 22.05 kHz like real files), decodes every clip to
16 kHz once, then times on one core (torch/BLAS threads pinned to 1):
  * ours: ``emoreason.datagen.acoustic.analyze`` (pitch, energy, rate, pauses, intonation);
  * pyin: ``librosa.pyin`` F0 + ``librosa.feature.rms`` energy (the common pyin-based analysis).
Prints x real time for both (best of ``--repeats`` passes, so other processes on a shared machine disturb less),
their ratio, librosa.yin alone as a reference for this machine's load, and the agreement of voiced-frame median F0
per clip (share within 5%, mean and worst relative error).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def pyin_analysis(waveform: np.ndarray, sampling_rate: int) -> dict:
    import librosa

    f0, voiced, _ = librosa.pyin(waveform, fmin=60.0, fmax=500.0, sr=sampling_rate, frame_length=1024,
                                 hop_length=sampling_rate // 100)
    rms = librosa.feature.rms(y=waveform, frame_length=400, hop_length=sampling_rate // 100)[0]
    n = min(len(rms), len(voiced))
    energy = float(10 * np.log10(np.mean(rms[:n][voiced[:n]] ** 2) + 1e-12)) if voiced.any() else None
    return {"pitch_hz": float(np.median(f0[voiced])) if voiced.any() else None, "energy_dbfs": energy}


def best_pass(fn, clips, repeats: int) -> tuple[float, list]:
    best, results = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        results = [fn(clip) for clip in clips]
        best = min(best, time.perf_counter() - start)
    return best, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences-per-speaker", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus-dir", default=None, help="reuse a rendered corpus (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from emoreason.data.audio import load_audio
    from emoreason.data.schema import read_records
    from emoreason.datagen.acoustic import analyze
    from emoreason.testing.synth_corpus import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = args.corpus_dir or os.path.join(tmp, "corpus")
        manifest = synthesize(root, sentences_per_speaker=args.sentences_per_speaker)
        records = read_records(manifest)
        clips = [(load_audio(r.audio_path(root)), r.transcript) for r in records]
    seconds = sum(len(w) for w, _ in clips) / 16_000

    ours_time, ours = best_pass(lambda c: analyze(c[0], 16_000, transcript=c[1]), clips, args.repeats)
    pyin_analysis(clips[0][0], 16_000)  # numba compiles on the first call; keep that out of the timing
    pyin_time, ref = best_pass(lambda c: pyin_analysis(c[0], 16_000), clips, max(1, args.repeats - 2))

    yin_time, _ = best_pass(lambda c: __import__("librosa").yin(c[0], fmin=60.0, fmax=500.0, sr=16_000,
                                                                frame_length=1024, hop_length=160), clips, args.repeats)

    errors = [abs(o.pitch_hz - r["pitch_hz"]) / r["pitch_hz"] for o, r in zip(ours, ref)
              if o.pitch_hz and r["pitch_hz"]]
    errors = np.asarray(errors)
    print(f"clips: {len(clips)}  audio: {seconds:.1f} s  (espeak-ng corpus, 16 kHz, one core)")
    print(f"ours (vectorised YIN + energy/rate/pauses/intonation): {seconds / ours_time:8.1f} x real time")
    print(f"pyin-based (librosa.pyin + rms):                       {seconds / pyin_time:8.1f} x real time")
    print(f"librosa.yin alone (F0 only, reference):            {seconds / yin_time:8.1f} x real time")
    print(f"speed ratio ours / pyin: {pyin_time / ours_time:.1f}x")
    print(f"voiced median F0 agreement: {np.mean(errors <= 0.05) * 100:.1f}% of {len(errors)} clips within 5%; "
          f"mean rel. error {errors.mean() * 100:.2f}%, worst {errors.max() * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
