"""Tag vocabularies of the paper's datasets (specification §1).

Public: :data:`MTAT_TOP50_TAGS`, :data:`MSD_TOP50_TAGS`.
"""

from __future__ import annotations

__all__ = ["MTAT_TOP50_TAGS", "MSD_TOP50_TAGS"]

#: MagnaTagATune's 50 most frequent tags in the official code's output order: ascending
#: popularity over all 25,863 clips (specification §1.1). The order matters only for the released
#: Keras weights; ROC-AUC does not depend on it.
MTAT_TOP50_TAGS: tuple[str, ...] = (
    "choral", "female voice", "metal", "country", "weird", "no voice", "cello", "harp",
    "beats", "female vocal", "male voice", "dance", "new age", "voice", "choir", "classic",
    "man", "solo", "sitar", "soft", "pop", "no vocal", "male vocal", "woman", "flute",
    "quiet", "loud", "harpsichord", "no vocals", "vocals", "singing", "male", "opera",
    "indian", "female", "synth", "vocal", "violin", "beat", "ambient", "piano", "fast",
    "rock", "electronic", "drums", "strings", "techno", "slow", "classical", "guitar",
)  # fmt: skip

#: The Million Song Dataset's 50 Last.fm tags of Choi's split, in its order (specification §1.2).
MSD_TOP50_TAGS: tuple[str, ...] = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
    "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s",
    "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic",
    "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
    "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock",
    "60s", "rnb", "indie pop", "sad", "House", "happy",
)  # fmt: skip

assert len(MTAT_TOP50_TAGS) == 50 and len(set(MTAT_TOP50_TAGS)) == 50
assert len(MSD_TOP50_TAGS) == 50 and len(set(MSD_TOP50_TAGS)) == 50
