"""Sample traffic for `make demo` (`python -m devkit demo`): the project's own sentences (none are taken from a
data set), one group per domain of the default model, some out-of-scope ones, and malformed
messages that must land in the dead-letter topic.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from devkit.toolkit import Outbound, produce
from worker.config import Settings

QUERIES: dict[str, list[str]] = {
    "banking": [
        "how much money is left in my checking account",
        "move two hundred dollars from savings into checking",
        "someone took money from my account without asking",
        "when do I have to pay the electricity bill",
        "show me what I spent on groceries last month",
        "please lock my bank account right away",
        "what is the routing number of my bank",
        "I want to order a new book of paper checks",
    ],
    "credit_cards": [
        "my visa card got declined at the pharmacy",
        "how do I get a higher limit on my credit card",
        "I dropped my credit card somewhere downtown",
        "how many reward points have I collected on my card",
        "what interest rate does my credit card charge",
        "when does my mastercard expire",
        "does this card charge a fee when I pay abroad",
        "how long until the replacement card arrives",
    ],
    "kitchen_and_dining": [
        "how long should I roast a whole chicken",
        "what can I use in place of buttermilk in pancakes",
        "get me a table for four at an italian place tonight",
        "how many calories are in a slice of cheesecake",
        "suggest something quick to cook for dinner",
        "are the reviews of the thai restaurant on main street good",
        "how long does cooked rice keep in the fridge",
        "cancel my dinner reservation for friday",
    ],
    "home": [
        "add paper towels to my shopping list",
        "remind me to water the plants at six",
        "play some relaxing jazz in the living room",
        "turn off the lights in the bedroom",
        "what is on my calendar for tomorrow morning",
        "skip to the next track please",
        "where is my package from the online order",
        "put call the plumber on my to do list",
    ],
    "auto_and_commute": [
        "when is my hatchback due for its next oil change",
        "how bad is traffic on the way to work",
        "what tire pressure should my sedan have",
        "how do I jump start a car with a dead battery",
        "get me an uber to the train station",
        "how many miles per gallon does my pickup get",
        "which gas should I put in my truck",
        "give me directions to the nearest hardware store",
    ],
    "travel": [
        "is my flight to denver on time",
        "do I need a visa to visit brazil",
        "what plug adapter do I need in italy",
        "book a hotel room in chicago for next weekend",
        "my suitcase never showed up at the airport",
        "how many dollars is one euro right now",
        "which shots do I need before going to kenya",
        "let my bank know I will be traveling to japan",
    ],
    "utility": [
        "what will the weather be like this afternoon",
        "set a timer for fifteen minutes",
        "wake me up at six thirty tomorrow",
        "what time is it in sydney",
        "flip a coin to settle this",
        "how many ounces are in a liter",
        "how do you spell necessary",
        "what does the word ephemeral mean",
    ],
    "work": [
        "how many vacation days do I still have this year",
        "when is the next company holiday",
        "set up a meeting with the design team on thursday",
        "when is payday this month",
        "where can I download this year's w2 form",
        "I want to change my health insurance plan",
        "request time off for the last week of july",
        "how do I roll over my old 401k",
    ],
    "small_talk": [
        "tell me a joke about penguins",
        "by what name should I address you",
        "am I chatting with a real person or a bot",
        "thanks a lot for your help",
        "what do you enjoy doing when nobody is asking you things",
        "good morning how are you",
        "which company built you",
        "tell me something interesting",
    ],
    "meta": [
        "please talk a bit slower",
        "turn the volume up a notch",
        "switch your language to spanish",
        "can you say that again",
        "call me alex from now on",
        "reset all your settings",
        "yes, that is exactly right",
        "never mind, cancel that request",
    ],
}

OUT_OF_SCOPE = [
    "how do black holes form",
    "what is the best strategy in chess openings",
    "who won the world cup in 1966",
    "write a haiku about autumn leaves",
    "how do I fix a leaking faucet washer",
    "what programming language should I learn first",
    "how tall is the tallest tree on earth",
    "explain how vaccines train the immune system",
    "what is the plot of hamlet",
    "how do I repot an orchid",
    "recommend a good science fiction novel",
    "why do zebras have stripes",
]

#: Prefixes that vary the sentences, the way real users phrase the same request.
PREFIXES = ("", "hey, ", "quick question: ")

MALFORMED: list[tuple[bytes | None, str]] = [
    (b"not json at all", "invalid_json"),
    (b'{"text": "unterminated', "invalid_json"),
    (b'["a", "list"]', "not_an_object"),
    (b'{"query": "wrong field name"}', "schema"),
    (b'{"text": 12345}', "schema"),
    (b'{"text": "   "}', "empty_text"),
    (b'{"text": "caf\xe9 latte"}', "encoding"),
    (None, "null_value"),
]


@dataclass(frozen=True)
class DemoMessage:
    key: bytes
    value: bytes | None
    expected: str  # a domain, "fallback", or "dlq:<reason>"


def messages() -> list[DemoMessage]:
    """276 valid messages and 8 malformed ones, in a fixed shuffled order (every run is the same)."""
    out: list[DemoMessage] = []
    rows = [(q, d) for d, qs in QUERIES.items() for q in qs] + [(q, "fallback") for q in OUT_OF_SCOPE]
    for round_, prefix in enumerate(PREFIXES):
        for i, (text, expected) in enumerate(rows):
            ident = f"demo-{round_}-{i:03d}"
            body = {"id": ident, "text": prefix + text, "meta": {"source": "demo"}}
            out.append(DemoMessage(ident.encode(), json.dumps(body).encode(), expected))
    out += [DemoMessage(f"demo-bad-{i}".encode(), v, f"dlq:{reason}") for i, (v, reason) in enumerate(MALFORMED)]
    random.Random(7).shuffle(out)
    return out


def sample_stream() -> Iterator[Outbound]:
    """The sample messages, cycled forever; each cycle's ids get a suffix so keys stay unique."""
    sample = messages()
    for cycle in itertools.count():
        for msg in sample:
            key = f"{msg.key.decode()}-{cycle}".encode()
            value = msg.value
            if value is not None and not msg.expected.startswith("dlq:"):
                value = json.dumps({**json.loads(value), "id": key.decode()}).encode()
            yield key, value, []


def produce_forever(settings: Settings, rate_per_s: float, count: int, should_stop: Callable[[], bool]) -> int:
    """Cycle through the sample messages at a fixed rate (docker-compose's producer service)."""
    stream = itertools.islice(sample_stream(), count or None)
    config = settings.librdkafka_admin()
    return produce(
        settings.kafka.bootstrap_servers,
        settings.topics.input,
        stream,
        rate_per_s=rate_per_s,
        should_stop=should_stop,
        config=config,
    ).count
