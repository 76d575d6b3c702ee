"""The ten language communities queries are written in (VideoSafety-R1's benchmark spans ten; its
paper does not list them, so these are the project's choice).

Chosen for reach and for spread: the most-spoken languages by total speakers, seven scripts (Latin,
Han, Devanagari, Arabic, Bengali, Cyrillic, Japanese kana and kanji), languages written with and
without spaces between words, and lower-resource languages for safety training (Hindi, Bengali),
where multilingual jailbreak studies found more unsafe output than in English (Deng et al. 2024,
"Multilingual Jailbreak Challenges in Large Language Models", ICLR). Code → English name, which an
endpoint writer's prompt names.
"""
LANGUAGES = {
    "en": "English",
    "zh": "Mandarin Chinese (simplified script)",
    "hi": "Hindi",
    "es": "Spanish",
    "fr": "French",
    "ar": "Arabic",
    "bn": "Bengali",
    "pt": "Portuguese",
    "ru": "Russian",
    "ja": "Japanese",
}
