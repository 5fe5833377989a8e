"""A closed-class lexicon of English function words, for the word-class probe.

Function words are a closed class: a few hundred words, listed once, cover them. Everything
else that is made of letters is an open-class (content) word. No tagger and no download: the
word class of a token follows from its word's spelling alone, which is what lets the probes
label any corpus the tokenizer can read.
"""
from __future__ import annotations

DETERMINERS = frozenset("""
a an the this that these those each every either neither some any no all both another such
what which whatever whichever much many more most few fewer less least several enough
""".split())

PRONOUNS = frozenset("""
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
it its itself we us our ours ourselves they them their theirs themselves one oneself who whom
whose whoever someone somebody something anyone anybody anything everyone everybody everything
nobody nothing none
""".split())

PREPOSITIONS = frozenset("""
of in on at by for with from to into onto upon about above across after against along among
around as before behind below beneath beside besides between beyond despite during except
inside near off out outside over past per since than through throughout till toward towards
under underneath unlike until up via within without
""".split())

CONJUNCTIONS = frozenset("""
and or but nor so yet if unless because although though while whereas whether when whenever
where wherever then else otherwise once how why
""".split())

AUXILIARIES = frozenset("""
be am is are was were been being have has had having do does did done doing will would shall
should can could may might must ought
""".split())

PARTICLES = frozenset("""
not also only just too very there here now even still already again ever never
""".split())

FUNCTION_WORDS = DETERMINERS | PRONOUNS | PREPOSITIONS | CONJUNCTIONS | AUXILIARIES | PARTICLES


def is_function_word(word: str) -> bool:
    """Whether ``word`` (any case) is in the closed-class lexicon."""
    return word.lower() in FUNCTION_WORDS
