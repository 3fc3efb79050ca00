"""Records, labels and audio I/O shared by every stage."""

from .audio import AudioError, load_audio, prepare_waveform, write_wav
from .labels import EMOTIONS, consensus_label, entropy, multi_label, normalize_emotion, vote_distribution
from .schema import EmotionRecord, RecordError, UnsafePathError, Vote, iter_records, read_records, write_records

__all__ = [
    "AudioError", "load_audio", "prepare_waveform", "write_wav",
    "EMOTIONS", "consensus_label", "entropy", "multi_label", "normalize_emotion", "vote_distribution",
    "EmotionRecord", "RecordError", "UnsafePathError", "Vote", "iter_records", "read_records", "write_records",
]
