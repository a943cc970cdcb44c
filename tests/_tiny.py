"""A tiny random Llama and three small, clearly different topics, for tests that train experts.

The tiny model itself comes from :func:`tests._helpers.make_tiny_llama` (64 hidden, 2 layers, a byte-level
BPE tokenizer trained offline, EOS ``</s>``), the same model the ``tiny_base`` session fixture and the local
Hub serve, so trained experts fit every other test. This module adds topics big enough to train on:
a dozen sentences each (the first five are :data:`tests._helpers.TOPIC_TEXTS`).
"""

from __future__ import annotations

from tests._helpers import TOPIC_TEXTS as _BASE_TEXTS
from tests._helpers import make_tiny_llama

_MORE_TEXTS: dict[str, list[str]] = {
    "cooking": [
        "Chop the onions finely and fry them in butter until they turn golden.",
        "Let the dough rise in a warm kitchen for an hour before you bake it.",
        "Stir the risotto often and add the hot stock one ladle at a time.",
        "Marinate the beef overnight in soy sauce, ginger and a little honey.",
        "Melt the chocolate gently over a pan of simmering water.",
        "Grate the cheese over the pasta and bake it until the top is brown.",
        "Slice the potatoes thinly and layer them with cream and garlic.",
    ],
    "football": [
        "The winger crossed the ball and the captain headed it into the net.",
        "Both teams pressed high and the midfield battle decided the derby.",
        "The defender cleared the ball off the line just before half time.",
        "After extra time the final went to a penalty shootout.",
        "The club signed a young forward during the summer transfer window.",
        "An offside flag cancelled the goal and the home fans booed the linesman.",
        "The manager praised his players for their pressing and their passing.",
    ],
    "astronomy": [
        "A comet grows a bright tail of gas and dust as it nears the Sun.",
        "The Moon always shows the same face to the Earth because of tidal locking.",
        "Neutron stars are so dense that a spoonful would weigh a billion tons.",
        "Saturn's rings are made of countless pieces of ice and rock.",
        "The space telescope found water vapour in the atmosphere of an exoplanet.",
        "A black hole bends the light of the stars behind it.",
        "Mars has the tallest volcano in the solar system, Olympus Mons.",
    ],
}

#: Three clearly different topics (cooking, football, astronomy), twelve sentences each.
TOPIC_TEXTS: dict[str, list[str]] = {topic: [*_BASE_TEXTS[topic], *_MORE_TEXTS[topic]] for topic in _BASE_TEXTS}

__all__ = ["TOPIC_TEXTS", "make_tiny_llama"]
