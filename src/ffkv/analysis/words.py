"""English function words: the stop words of the paper's Fig 8 analysis, and the words the explainer does not
take as content words (category members, subject words)."""

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours yourself yourselves
""".split())

WORD_CLASSES = {
    "a determiner": frozenset("""a an the this that these those each every some any no its their his her our my
        your whose another either neither""".split()),
    "a preposition": frozenset("""of in on at by for with from to into onto upon about above below under over
        between among through during before after against without within across behind beyond near since until
        toward towards via per like despite throughout along around beside besides inside outside underneath
        amid except""".split()),
    "a conjunction": frozenset("""and or but nor yet so although though because while whereas unless if whether
        than as once whilst""".split()),
    "an auxiliary verb": frozenset("""is are was were be been being am has have had having do does did will would
        shall should can could may might must""".split()),
    "a pronoun": frozenset("""he she it they we i you him them us me who whom which itself themselves himself
        herself myself ourselves one""".split()),
}
"""Closed word classes a reader names at a glance ("the marked word is a preposition"): a shallow, surface kind
of token, tested like a token (the least likely class shared by three different words)."""
