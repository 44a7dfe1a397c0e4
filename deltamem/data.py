"""Generated memory conversations: training episodes and a held-out split in LoCoMo format.

Two people chat; some turns state facts about the speaker (a pet's name, the city they live
in, their job, a birthday, a planned trip ...), later turns may override a fact, and the rest
is chatter. A question asks for a fact's current value. Values are drawn at random from
pools, so the backbone cannot guess them: only the memory can carry them to the question.

The "train" and "heldout" splits draw from disjoint pools (person names, values, statement,
update and question templates, chatter) and from different seed streams, so a held-out score
measures a memory that generalises, not one that memorised the training values.

Everything here is pure Python (no torch), deterministic given (split, seed, index).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "heldout")

# The system message of every episode (write pass and read pass). The evaluator should send
# the same one, since the adapter learned to answer under it.
SYSTEM_PROMPT = ("You are a helpful assistant with a memory of the conversation so far. "
                 "Answer the question with just the answer.")

# LoCoMo-style categories of the held-out questions.
CATEGORY_SINGLE = 1  # a fact stated once
CATEGORY_UPDATED = 2  # a fact stated, then overridden: the answer is the latest value
CATEGORY_DISTRACTOR = 3  # the other speaker stated a fact of the same kind (binding needed)
CATEGORY_NAMES = {CATEGORY_SINGLE: "single fact", CATEGORY_UPDATED: "updated fact",
                  CATEGORY_DISTRACTOR: "fact with a same-kind distractor"}

# --- pools -----------------------------------------------------------------------------------
# Each pool is split by alternating index (even -> train, odd -> heldout), so the two splits
# share the kind of value but no value.

PERSON_NAMES = """Alice Bob Carmen Dmitri Elena Farid Greta Hiro Ingrid Jamal Keiko Lars Maya
Nikolai Olga Pavel Quinn Rosa Samir Tanya Ulrich Vera Walter Ximena Yusuf Zelda Anton Beatriz
Cyrus Daria Emil Fiona Gustav Hana Ivan Jonas Kira Leon Mira Nils Oscar Petra Rafael Sigrid
Tobias Ursula Viktor Wanda Xavier Yara Zoran Agnes Bruno Clara Dante Edith Felix Gloria Hugo
Irene Jasper Klara Lukas Marta Nadia Otto Pia Ruben Selma Theo Uma Vince Wilma Yannick Zoe
Arjun Bianca Cosmo Delia Enzo Flora Gideon Helga Ismael Juno Kasimir Lena Matteo Noor Orla
Priya Raul Saskia Timur Ulla Vito Wren Yuki Zeno""".split()

PET_NAMES = """Biscuit Pepper Mango Noodle Ziggy Waffles Pickles Oreo Tofu Nacho Pretzel Muffin
Gizmo Bingo Rocket Sprout Turnip Peanut Marble Cricket Dumpling Jellybean Pumpkin Basil
Pistachio Nugget Sushi Fig Clover Wasabi Truffle Juniper Mochi Olive Paprika Bagel Cinnamon
Tango Domino Comet Pebble Radish Kiwi Sorbet Toffee Meatball Chutney Brisket Poppy Fudge Walnut
Hazel Sesame Mocha Kale Quokka Gumbo Churro Falafel Ravioli Cobalt Zucchini""".split()

CITIES = """Lisbon Porto Seville Valencia Bilbao Lyon Marseille Nantes Bordeaux Ghent Utrecht
Rotterdam Hamburg Leipzig Dresden Munich Salzburg Graz Zurich Basel Geneva Turin Bologna
Naples Palermo Verona Trieste Ljubljana Zagreb Split Krakow Gdansk Wroclaw Prague Brno Vienna
Budapest Bratislava Tallinn Riga Vilnius Helsinki Tampere Bergen Trondheim Uppsala Malmo Aarhus
Odense Dublin Cork Galway Edinburgh Glasgow Leeds Bristol Cardiff Belfast Reykjavik Oslo Quebec
Montreal Halifax Calgary Denver Austin Portland Seattle Boston Chicago Memphis Nashville Tucson
Phoenix Omaha Detroit Oaxaca Cusco Quito Bogota Santiago Valparaiso Montevideo Osaka Kyoto
Sapporo Busan Hanoi Jakarta Manila Auckland Hobart Perth Adelaide Brisbane Nairobi Accra Dakar
Tunis Casablanca Izmir Tbilisi Yerevan Almaty""".split()

COUNTRIES = """Portugal Morocco Iceland Norway Peru Chile Japan Vietnam Kenya Ghana Greece
Croatia Estonia Finland Mexico Canada Ireland Scotland Austria Hungary Georgia Armenia Nepal
Mongolia Jordan Egypt Tunisia Senegal Brazil Argentina Colombia Ecuador Cuba Jamaica Malta
Cyprus Slovenia Latvia Poland Romania Bulgaria Albania Laos Cambodia Indonesia Malaysia
Tasmania Namibia Botswana Uganda Madagascar Bolivia Uruguay Panama""".split()

JOBS = """nurse plumber architect pharmacist carpenter librarian dentist electrician
accountant florist baker translator pilot veterinarian geologist chef journalist paramedic
firefighter locksmith surveyor welder optician tailor beekeeper mechanic cartographer
sommelier jeweler blacksmith lifeguard archivist potter glazier upholsterer astronomer
chemist zookeeper notary economist brewer barista violinist photographer therapist
biologist surgeon gardener tutor""".split()

FOODS = """lasagna ramen paella sushi tacos curry risotto dumplings falafel goulash pierogi
ceviche moussaka pho bibimbap gnocchi shakshuka burritos enchiladas kimchi couscous biryani
ratatouille gumbo jambalaya tiramisu baklava churros crepes waffles pancakes cheesecake
brownies hummus tapas fondue raclette schnitzel strudel empanadas arepas pozole laksa rendang
satay gazpacho polenta tortellini""".split()

HOBBIES = """pottery knitting archery fencing climbing surfing sailing birdwatching calligraphy
origami woodworking beekeeping bouldering kayaking juggling chess gardening astronomy fishing
skateboarding snowboarding embroidery painting sculpting photography baking cycling running
rowing salsa tango yoga karate judo boxing quilting podcasting geocaching""".split()

INSTRUMENTS = """cello violin harp banjo ukulele saxophone trumpet clarinet flute oboe
accordion mandolin harmonica trombone bassoon piano drums sitar tuba xylophone bagpipes
marimba""".split()

EVENTS = ["a jazz concert", "a pottery workshop", "a wine tasting", "a chess tournament",
          "a poetry reading", "a film festival", "a salsa class", "a charity run",
          "a book fair", "a comedy show", "a cooking class", "a science fair",
          "a flea market", "an opera", "a robotics meetup", "a ballet", "a rodeo",
          "a lantern festival", "a puppet show", "a magic show", "a boat race",
          "a baking contest", "a quiz night", "a drone race", "a beer festival",
          "a kite festival", "a craft fair", "a rock concert", "a yoga retreat",
          "a tango night", "an art auction", "a hackathon"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
# Birthdays: (month, day) pairs; split by alternating index over a fixed order.
DATES = [f"{m} {d}" for m in MONTHS for d in range(1, 29)]

# Slots: (value pool, statement templates, update templates, question templates).
# {v} is the value, {p} the person asked about. Templates are split like the pools.
SLOTS: dict[str, dict] = {
    "pet": dict(
        pool=PET_NAMES,
        state=["My dog is called {v}.", "We adopted a puppy and named him {v}.",
               "Our new cat is called {v}.", "I got a dog last week, his name is {v}.",
               "My puppy {v} chewed my shoes again.", "We named our kitten {v}."],
        update=["We decided to rename the dog, he is {v} now.",
                "Actually the kids renamed our pet to {v}.",
                "Funny thing, our pet is called {v} now, the old name never stuck.",
                "We changed the pet's name, it is {v} now."],
        question=["What is the name of {p}'s pet?", "What is {p}'s pet called?",
                  "What name does {p}'s pet have?", "How is {p}'s pet named?"]),
    "city": dict(
        pool=CITIES,
        state=["I live in {v} now.", "I just moved to {v}.", "We settled down in {v}.",
               "My new flat is in {v}.", "I have been living in {v} for a year.",
               "Home for me is {v} these days."],
        update=["Big news, I moved again, I live in {v} now.",
                "We relocated, home is {v} now.",
                "I left that place, now I live in {v}.",
                "Change of address: I am in {v} now."],
        question=["Which city does {p} live in?", "Where does {p} live?",
                  "In which city is {p}'s home?", "What city is {p} living in?"]),
    "job": dict(
        pool=JOBS,
        state=["I work as a {v}.", "I started a job as a {v}.", "My job? I am a {v}.",
               "I have been a {v} for years.", "These days I earn my living as a {v}.",
               "I trained to be a {v} and love it."],
        update=["I switched careers, I am a {v} now.", "New job: I work as a {v} now.",
                "I quit and became a {v}.", "I changed jobs, now I am a {v}."],
        question=["What is {p}'s job?", "What does {p} do for work?",
                  "What is {p}'s profession?", "What does {p} work as?"]),
    "food": dict(
        pool=FOODS,
        state=["My favourite food is {v}.", "I could eat {v} every day.",
               "Nothing beats {v} for me.", "I love {v} more than anything.",
               "My favourite dish has always been {v}.", "I am obsessed with {v}."],
        update=["I changed my mind, my favourite food is {v} now.",
                "These days my favourite is {v}.",
                "Forget what I said, {v} is my favourite now.",
                "My new favourite food is {v}."],
        question=["What is {p}'s favourite food?", "Which food does {p} love most?",
                  "What dish does {p} like best?", "What food is {p}'s favourite?"]),
    "hobby": dict(
        pool=HOBBIES,
        state=["I have been getting into {v} lately.", "My new hobby is {v}.",
               "I spend my weekends on {v}.", "I picked up {v} this spring.",
               "I joined a club for {v}.", "I am hooked on {v}."],
        update=["I dropped my old hobby, I do {v} now.",
                "My hobby these days is {v}.",
                "I gave that up and switched to {v}.",
                "Now I spend my free time on {v} instead."],
        question=["What hobby is {p} into?", "What is {p}'s hobby?",
                  "What does {p} do as a hobby?", "Which hobby did {p} pick up?"]),
    "instrument": dict(
        pool=INSTRUMENTS,
        state=["I am learning to play the {v}.", "I bought a {v} and take lessons.",
               "I practise the {v} every evening.", "I started {v} lessons.",
               "I have played the {v} since school.", "My teacher says my {v} is improving."],
        update=["I switched instruments, I play the {v} now.",
                "I sold my old instrument and learn the {v} now.",
                "Now I am learning the {v} instead.",
                "New instrument for me: the {v}."],
        question=["Which instrument is {p} learning?", "What instrument does {p} play?",
                  "What instrument is {p} practising?", "Which instrument does {p} play?"]),
    "trip": dict(
        pool=COUNTRIES,
        state=["I am planning a trip to {v} next month.", "I booked a holiday in {v}.",
               "We are flying to {v} in the summer.", "My next trip is to {v}.",
               "I am saving up to travel to {v}.", "We will visit {v} in the autumn."],
        update=["Change of plans, the trip is to {v} instead.",
                "We cancelled and booked {v} instead.",
                "The trip changed, we go to {v} now.",
                "New plan: we are going to {v}."],
        question=["Where is {p} planning to travel?", "Which country is {p} going to visit?",
                  "Where is {p}'s next trip?", "What country will {p} travel to?"]),
    "birthday": dict(
        pool=DATES,
        state=["My birthday is on {v}.", "I was born on {v}.", "I celebrate my birthday on {v}.",
               "Do not forget, my birthday is {v}.", "My birthday falls on {v}.",
               "Save the date: {v} is my birthday."],
        update=[],  # birthdays do not change
        question=["When is {p}'s birthday?", "On what date is {p}'s birthday?",
                  "What date is {p}'s birthday?", "When was {p} born?"]),
    "sibling": dict(
        pool=PERSON_NAMES,
        state=["My sister's name is {v}.", "My sister {v} is visiting.",
               "My sister is called {v}.", "I had lunch with my sister {v}.",
               "My older sister {v} called me.", "My sister {v} just got married."],
        update=[],
        question=["What is the name of {p}'s sister?", "What is {p}'s sister called?",
                  "Who is {p}'s sister?", "What is {p}'s sister's name?"]),
    "event": dict(
        pool=EVENTS,
        state=["I went to {v} last weekend.", "Last Saturday I was at {v}.",
               "I finally made it to {v}.", "We spent Sunday at {v}.",
               "I volunteered at {v} last week.", "I got tickets for {v} and loved it."],
        update=[],
        question=["What event did {p} go to?", "Which event did {p} attend?",
                  "Where did {p} go last weekend?", "What did {p} attend recently?"]),
}

CHATTER = [
    "How was your week?", "The weather has been awful lately.", "Did you watch the game?",
    "I am so tired today.", "Work has been really busy.", "That sounds nice.",
    "I need more coffee.", "Have you seen any good films?", "My phone battery died again.",
    "Traffic was terrible this morning.", "I slept badly last night.", "Haha, true.",
    "I should really clean my kitchen.", "What are you up to tonight?", "Same here.",
    "I cannot believe it is already Friday.", "The train was late again.", "Oh, really?",
    "I made soup yesterday, it was fine.", "My neighbour is so loud.", "Good to hear.",
    "I keep forgetting my umbrella.", "The shop downstairs closed.", "That is funny.",
    "I have a headache.", "The internet was down all day.", "I know what you mean.",
    "It rained the whole weekend.", "I watched a documentary about bees.", "Nice!",
    "My laptop is so slow.", "I need a holiday.", "Anyway, enough about me.", "Oh wow.",
    "I finished a long book.", "We had a meeting that could have been an email.",
    "The park was crowded.", "I tried a new recipe, it failed.", "Long day.", "Right.",
    "I am thinking about painting my room.", "Did you sleep well?", "Sounds good.",
    "My back hurts from sitting.", "The bus driver was rude.", "Let me think.",
    "I bought new socks, exciting stuff.", "The supermarket was out of bread.", "Cool.",
    "I finally fixed the leaky tap.", "I am trying to drink more water.", "Agreed.",
    "How is your family?", "I should go to bed earlier.", "Lucky you.",
    "My plants are dying.", "The coffee machine at work broke.", "No way!",
    "I binge-watched a whole series.", "I need to call the bank.", "Fair enough.",
    "The neighbours have a new car.", "I am cooking pasta tonight.", "Really?",
    "There was a fire drill at work.", "I lost my keys again.", "Ha, classic.",
    "The mornings are getting darker.", "I went for a walk in the rain.", "Totally.",
    "I cleaned out my wardrobe.", "My sister sends her regards.", "Oh nice.",
    "I signed up for a newsletter by mistake.", "The printer jammed twice.", "Wow.",
]

REACTIONS = ["Oh, nice!", "Cool.", "That is great.", "Really? Nice.", "Good for you!",
             "Interesting.", "Oh wow.", "Ha, lovely.", "Sounds fun.", "Nice to hear.",
             "Congrats!", "Oh, cool!", "How lovely.", "I did not know that.", "Awesome.",
             "Tell me more.", "Amazing.", "Oh, fun!"]


def _split_list(items: list, split: str) -> list:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(items[0::2] if split == "train" else items[1::2])


@dataclass(frozen=True)
class Pools:
    """Everything one split draws from."""

    names: list[str]
    values: dict[str, list[str]]
    state: dict[str, list[str]]
    update: dict[str, list[str]]
    question: dict[str, list[str]]
    chatter: list[str]
    reactions: list[str]


def pools(split: str) -> Pools:
    return Pools(
        names=_split_list(PERSON_NAMES, split),
        values={s: _split_list(d["pool"], split) for s, d in SLOTS.items()},
        state={s: _split_list(d["state"], split) for s, d in SLOTS.items()},
        update={s: _split_list(d["update"], split) for s, d in SLOTS.items()},
        question={s: _split_list(d["question"], split) for s, d in SLOTS.items()},
        chatter=_split_list(CHATTER, split),
        reactions=_split_list(REACTIONS, split),
    )


# --- conversations ---------------------------------------------------------------------------


@dataclass
class Turn:
    speaker: str
    text: str
    session: int = 1


@dataclass
class Fact:
    person: str
    slot: str
    value: str  # the current value (after updates)
    turn: int  # index of the turn that states the current value
    history: list[str] = field(default_factory=list)  # earlier, overridden values
    distractor: bool = False  # the other speaker has a fact of the same slot

    @property
    def category(self) -> int:
        if self.history:
            return CATEGORY_UPDATED
        return CATEGORY_DISTRACTOR if self.distractor else CATEGORY_SINGLE


@dataclass
class Conversation:
    speaker_a: str
    speaker_b: str
    turns: list[Turn]
    facts: list[Fact]
    session_dates: list[str]


@dataclass
class Difficulty:
    """Knobs of one curriculum stage."""

    n_facts: tuple[int, int] = (1, 1)  # facts stated (min, max)
    n_chatter: tuple[int, int] = (0, 2)  # chatter turns (min, max)
    p_update: float = 0.0  # chance that a fact (of an updatable slot) is overridden later
    p_distractor: float = 0.0  # chance that a fact's slot is also stated by the other speaker
    p_reaction: float = 0.3  # chance the other speaker reacts to a fact
    n_sessions: int = 1
    value_subset: int = 0  # > 0: values only from the first N of each pool, no copy words
    # Training in this stage (the probe setting of docs/training.md): no re-sent window, no written
    # question, no general-ability episodes; the state is the only thing learned.
    state_only: bool = False


def _date(rng: random.Random) -> str:
    hour = rng.randint(1, 12)
    return (f"{hour}:{rng.randint(0, 59):02d} {rng.choice(['am', 'pm'])} on "
            f"{rng.randint(1, 28)} {rng.choice(MONTHS)}, {rng.randint(2021, 2024)}")


# Slots whose values are open-class words; copy_words (see make_episode) replaces their values
# with words of this case ("phrase": "a <word> <word>", the shape of an event).
COPY_CASE = {"pet": "cap", "city": "cap", "trip": "cap", "sibling": "cap",
             "job": "low", "food": "low", "hobby": "low", "instrument": "low",
             "event": "phrase"}


@functools.cache
def _heldout_values() -> frozenset[str]:
    return frozenset(v for vals in pools("heldout").values.values() for v in vals)


def copy_value(rng: random.Random, words: dict[str, list[str]], case: str,
               p_multi: float) -> str:
    """A random value of a copy slot: a vocabulary word, with chance p_multi made a
    multi-token pseudo-word by one or two word pieces ("Pelican" + "ora"), since most
    held-out values (names, foods, events) are several tokens and the state must learn to
    carry more than one."""
    if case == "phrase":
        return f"a {copy_value(rng, words, 'low', p_multi)} {rng.choice(words['low'])}"
    w = rng.choice(words[case])
    if rng.random() < p_multi:
        w += "".join(rng.choice(words["piece"]) for _ in range(rng.randint(1, 2)))
    return w


def generate_conversation(rng: random.Random, pool: Pools, diff: Difficulty,
                          copy_words: dict[str, list[str]] | None = None,
                          p_copy: float = 0.0, p_multi: float = 0.0) -> Conversation:
    a, b = rng.sample(pool.names, 2)
    n_facts = rng.randint(*diff.n_facts)
    # (person, slot) pairs with distinct slots per person; a distractor adds the same slot
    # for the other person.
    slots = rng.sample(list(SLOTS), min(n_facts, len(SLOTS)))
    planned: list[tuple[str, str]] = []
    for slot in slots:
        person = rng.choice((a, b))
        planned.append((person, slot))
        if rng.random() < diff.p_distractor:
            planned.append((b if person == a else a, slot))
    used: dict[str, set[str]] = {s: set() for s in SLOTS}

    def fresh(slot: str, exclude: set[str]) -> str:
        pool_v = pool.values[slot][:diff.value_subset or None]
        if (not diff.value_subset and copy_words and p_copy > 0 and slot in COPY_CASE
                and (slot != "event" or p_multi > 0) and rng.random() < p_copy):
            v = copy_value(rng, copy_words, COPY_CASE[slot], p_multi)
            while v in used[slot] or v in exclude or v in _heldout_values():
                v = copy_value(rng, copy_words, COPY_CASE[slot], p_multi)
            used[slot].add(v)
            return v
        choices = [v for v in pool_v if v not in used[slot] and v not in exclude]
        v = rng.choice(choices)
        used[slot].add(v)
        return v

    # Events in time order: ("fact", idx), ("update", idx), ("chatter", None).
    facts: list[Fact] = []
    events: list[tuple[str, int | None]] = []
    for person, slot in planned:
        facts.append(Fact(person, slot, fresh(slot, {a, b}), turn=-1))
        events.append(("fact", len(facts) - 1))
    rng.shuffle(events)
    for i, f in enumerate(facts):
        if pool.update[f.slot] and rng.random() < diff.p_update:
            # The update goes somewhere after the original statement.
            pos = next(j for j, e in enumerate(events) if e == ("fact", i))
            events.insert(rng.randint(pos + 1, len(events)), ("update", i))
    for _ in range(rng.randint(*diff.n_chatter)):
        events.insert(rng.randint(0, len(events)), ("chatter", None))
    by_slot: dict[str, set[str]] = {}
    for f in facts:
        by_slot.setdefault(f.slot, set()).add(f.person)
    for f in facts:
        f.distractor = len(by_slot[f.slot]) > 1

    n_sessions = max(1, diff.n_sessions)
    # Session boundaries at random event positions.
    cuts = sorted(rng.sample(range(1, len(events)), min(n_sessions - 1, len(events) - 1))
                  ) if len(events) > 1 else []
    turns: list[Turn] = []
    session = 1
    for j, (kind, idx) in enumerate(events):
        while cuts and j == cuts[0]:
            cuts.pop(0)
            session += 1
        if kind == "chatter":
            turns.append(Turn(rng.choice((a, b)), rng.choice(pool.chatter), session))
            continue
        f = facts[idx]
        if kind == "fact":
            text = rng.choice(pool.state[f.slot]).format(v=f.value)
        else:
            f.history.append(f.value)
            f.value = fresh(f.slot, {a, b, *f.history})
            text = rng.choice(pool.update[f.slot]).format(v=f.value)
        f.turn = len(turns)
        turns.append(Turn(f.person, text, session))
        if rng.random() < diff.p_reaction:
            other = b if f.person == a else a
            turns.append(Turn(other, rng.choice(pool.reactions), session))
    dates = [_date(rng) for _ in range(session)]
    return Conversation(a, b, turns, facts, dates)


def question_for(fact: Fact, pool: Pools, rng: random.Random) -> str:
    return rng.choice(pool.question[fact.slot]).format(p=fact.person)


def conversation_messages(conv: Conversation, system_prompt: str | None = SYSTEM_PROMPT,
                          session_headers: bool | None = None) -> list[dict]:
    """Chat messages of a conversation, the way training feeds it: one user message per turn,
    "Speaker: text"; a session header message before each session when there are several."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    headers = len(conv.session_dates) > 1 if session_headers is None else session_headers
    session = 0
    for t in conv.turns:
        if headers and t.session != session:
            session = t.session
            msgs.append({"role": "user", "content":
                         f"[Session {session}, {conv.session_dates[session - 1]}]"})
        msgs.append({"role": "user", "content": f"{t.speaker}: {t.text}"})
    return msgs


# --- training episodes -----------------------------------------------------------------------


@dataclass
class Episode:
    history: list[dict]  # chat messages written into the state (system message first)
    question: str
    answer: str
    category: int
    slot: str
    # Indices into `dialogue` of the messages that hold the answer, where the generator
    # knows them (deltamem.dialogues); None: the last message stating the answer.
    evidence: tuple[int, ...] | None = None

    @property
    def dialogue(self) -> list[dict]:
        """The history's messages without the system message: what a window is cut from."""
        return [m for m in self.history if m["role"] != "system"]


# Curriculum: stage -> difficulty. Stage 0 is the probe setting of docs/training.md (one fact, a few
# values per kind: the state learns to hold anything at all); stage 1 opens the value pools;
# later ones add more facts, chatter, updates and same-kind distractors.
STAGES: list[Difficulty] = [
    Difficulty(n_facts=(1, 1), n_chatter=(0, 0), p_reaction=0.0, value_subset=6,
               state_only=True),
    Difficulty(n_facts=(1, 1), n_chatter=(0, 1), p_reaction=0.2),
    Difficulty(n_facts=(1, 2), n_chatter=(1, 3), p_update=0.15, p_distractor=0.15),
    Difficulty(n_facts=(2, 3), n_chatter=(2, 4), p_update=0.3, p_distractor=0.3),
    Difficulty(n_facts=(2, 4), n_chatter=(3, 6), p_update=0.35, p_distractor=0.35,
               n_sessions=2),
    Difficulty(n_facts=(3, 5), n_chatter=(6, 12), p_update=0.35, p_distractor=0.3,
               p_reaction=0.4, n_sessions=3),
]


def make_episode(split: str, seed: int, index: int, stage: int | Difficulty = 0,
                 copy_words: dict[str, list[str]] | None = None, p_copy: float = 0.0,
                 p_multi: float = 0.0) -> Episode:
    """Episode `index` of a (split, seed) stream: deterministic, independent of other indices.

    copy_words ({"cap": [...], "low": [...]}) with p_copy: the chance that a value of an
    open-class slot is a random word of that list instead of the pool's. With thousands of
    such words, no value repeats often enough to be memorised: the state has to carry the
    value itself, which is what held-out values (never seen in training) need. p_multi: the
    chance that such a value is a multi-token pseudo-word (see copy_value); with p_multi > 0
    events become copy phrases too."""
    diff = stage if isinstance(stage, Difficulty) else STAGES[stage]
    rng = random.Random(f"deltamem-episode:{split}:{seed}:{index}")
    pool = pools(split)
    conv = generate_conversation(rng, pool, diff, copy_words, p_copy, p_multi)
    fact = rng.choice(conv.facts)
    return Episode(conversation_messages(conv), question_for(fact, pool, rng), fact.value,
                   fact.category, fact.slot)


# The trained answer starts with a space: then its tokens are the very tokens the value had in
# the history ("is called Gumbo" -> "ĠGum","bo"; a bare "Gumbo" -> "G","umbo"), so the state
# only has to carry tokens, not re-spell them. Evaluators strip it.
ANSWER_PREFIX = " "


def messages_after_fact(ep: Episode) -> int:
    """How many history messages (system message aside) follow the last one that states the
    answer: the largest window that leaves the asked fact out, so that only the state can
    answer, as with a served question whose fact lies before the window."""
    hist = ep.dialogue
    stated = [i for i, m in enumerate(hist) if ep.answer in m["content"]]
    if not stated:
        raise ValueError(f"the answer {ep.answer!r} is stated nowhere in the history")
    return len(hist) - 1 - stated[-1]


def answer_in_window(ep: Episode, context: int) -> bool:
    """Whether a read pass re-sending the last `context` history messages shows the answer's
    evidence, so that the backbone could answer from the window alone."""
    n = len(ep.dialogue)
    if ep.evidence is not None:
        return all(i >= n - context for i in ep.evidence)
    try:
        return messages_after_fact(ep) < context
    except ValueError:  # the answer is stated nowhere as such (a temporal answer, say)
        return False


def read_messages(ep: Episode, system_prompt: str = SYSTEM_PROMPT, context: int = 0
                  ) -> list[dict]:
    """The read pass: the system message, the last `context` messages of the history (the
    re-sent window of a served turn; 0: none, the state only), the question and the answer."""
    hist = ep.dialogue
    window = hist[len(hist) - min(context, len(hist)):]
    return [{"role": "system", "content": system_prompt}, *window,
            {"role": "user", "content": ep.question},
            {"role": "assistant", "content": ANSWER_PREFIX + ep.answer}]


def copy_word_lists(vocab: list[str], space_marker: str = "Ġ") -> dict[str, list[str]]:
    """Single-token words of a tokenizer's vocabulary (pass its token strings), for
    make_episode's copy_words: "cap" (Capitalised) and "low" (lower case), 5 to 10 letters,
    with every value, name and template word of the held-out split left out, so held-out
    values stay unseen in training; and "piece", word-inner tokens of 2 to 4 lower-case
    letters, which copy_value appends to make multi-token pseudo-words."""
    held = pools("heldout")
    banned: set[str] = set(held.names)
    for vals in held.values.values():
        for v in vals:
            banned.update(v.split())
    for group in (held.state, held.update, held.question):
        for temps in group.values():
            for t in temps:
                banned.update(w.strip(".,?!'") for w in t.split())
    out: dict[str, list[str]] = {"cap": [], "low": [], "piece": []}
    for t in vocab:
        if not t.startswith(space_marker):
            if 2 <= len(t) <= 4 and t.isascii() and t.isalpha() and t.islower():
                out["piece"].append(t)
            continue
        w = t[len(space_marker):]
        if not (5 <= len(w) <= 10 and w.isascii() and w.isalpha()) or w in banned:
            continue
        if w[0].isupper() and w[1:].islower():
            out["cap"].append(w)
        elif w.islower():
            out["low"].append(w)
    for k in out:
        out[k].sort()
    return out


# Questions the backbone answers on its own, for the general-ability episodes of training
# (their targets are the backbone's own answers). Disjoint from the evaluator's set.
GENERAL_TRAIN = [
    "What is the capital of England?", "What is the capital of Russia?",
    "What is the capital of Canada?", "What is the capital of Egypt?",
    "What is the capital of China?", "What is the capital of Greece?",
    "What colour is snow?", "What colour is a banana?", "What colour is a ripe tomato?",
    "How many hours are in a day?", "How many months are in a year?",
    "How many legs does a dog have?", "How many wheels does a bicycle have?",
    "What is 3 plus 5?", "What is 10 minus 4?", "What is 6 times 2?",
    "Which planet do we live on?", "What is the largest planet in our solar system?",
    "What is the closest star to Earth?", "What do bees make?", "What do cows drink?",
    "What is frozen water called?", "What is the boiling point of water in Celsius?",
    "Who painted the Mona Lisa?", "Who was the first president of the United States?",
    "What is the opposite of up?", "What is the opposite of big?",
    "What animal says meow?", "What animal is the largest mammal?",
    "What language is spoken in France?", "What language is spoken in Germany?",
    "What is the chemical symbol for water?", "What is the chemical symbol for oxygen?",
    "How many sides does a triangle have?", "How many minutes are in an hour?",
    "What do we call a baby cat?", "What do we call a baby dog?",
    "Which season comes after winter?", "What is the tallest mountain in the world?",
    "What is the longest river in Africa?", "Give me a synonym for happy.",
    "Write one sentence about the sea.", "Name a fruit that is yellow.",
    "What instrument has 88 keys?", "In which country are the pyramids of Giza?",
    "What is the main ingredient of guacamole?", "What do plants need to grow?",
    "Translate 'thank you' into Spanish.",
]


_GENERAL_TEMPLATES = {
    "country": ["What is the capital of {x}?", "Tell me one fact about {x}.",
                "What language do people speak in {x}?", "On which continent is {x}?"],
    "food": ["What is {x}?", "Which country is {x} from?", "How do you make {x}?"],
    "hobby": ["Describe {x} in one sentence.", "What do you need to start {x}?"],
    "job": ["What does a {x} do?", "What skills does a {x} need?"],
    "instrument": ["What kind of instrument is the {x}?", "How do you play the {x}?"],
    "city": ["Where is {x}?", "What is {x} known for?"],
}


def general_prompts(n: int, seed: int = 0) -> list[str]:
    """GENERAL_TRAIN plus `n` templated prompts (questions about countries, foods, jobs ...,
    and arithmetic), for the general-ability episodes. Their targets are the backbone's own
    answers, so any prompt serves; what matters is variety: with only GENERAL_TRAIN, a long run
    fits those 48 and drifts on every other question. Topics come from the train split's
    pools, so held-out values stay unseen (the trainer also leaves out the evaluator's
    general questions)."""
    rng = random.Random(f"deltamem-general:{seed}")
    train = pools("train").values
    topics = {"country": train["trip"], "food": train["food"], "hobby": train["hobby"],
              "job": train["job"], "instrument": train["instrument"], "city": train["city"]}
    seen = set(GENERAL_TRAIN)
    out = list(GENERAL_TRAIN)
    for _ in range(50 * n):
        if len(out) >= len(GENERAL_TRAIN) + n:
            break
        if rng.random() < 0.15:
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            q = rng.choice([f"What is {a} plus {b}?", f"What is {a} times {b}?",
                            f"Is {a} bigger than {b}?"])
        else:
            kind = rng.choice(sorted(topics))
            q = rng.choice(_GENERAL_TEMPLATES[kind]).format(x=rng.choice(topics[kind]))
        if q not in seen:
            seen.add(q)
            out.append(q)
    return out


# --- LoCoMo export ---------------------------------------------------------------------------

HELDOUT_LOCOMO = Difficulty(n_facts=(4, 6), n_chatter=(10, 16), p_update=0.35,
                            p_distractor=0.3, p_reaction=0.4, n_sessions=3)
# Named difficulties for evaluators: "train-like" matches the hardest training stage the
# shipped adapter saw; "standard" is longer, with more facts than it was trained to hold.
LOCOMO_PRESETS = {
    "single": Difficulty(n_facts=(1, 1), n_chatter=(4, 8), p_reaction=0.3),
    "train-like": Difficulty(n_facts=(2, 3), n_chatter=(2, 4), p_update=0.3, p_distractor=0.3),
    "standard": HELDOUT_LOCOMO,
}


def locomo_layout(conv: Conversation) -> tuple[dict, list[str]]:
    """A conversation's LoCoMo `conversation` dict, and each turn's dia_id."""
    doc: dict = {"speaker_a": conv.speaker_a, "speaker_b": conv.speaker_b}
    dia_ids: list[str] = []
    counters: dict[int, int] = {}
    for t in conv.turns:
        counters[t.session] = counters.get(t.session, 0) + 1
        dia_id = f"D{t.session}:{counters[t.session]}"
        dia_ids.append(dia_id)
        doc.setdefault(f"session_{t.session}", []).append(
            {"speaker": t.speaker, "dia_id": dia_id, "text": t.text})
    for s, date in enumerate(conv.session_dates, start=1):
        doc.setdefault(f"session_{s}", [])
        doc[f"session_{s}_date_time"] = date
    return doc, dia_ids


def locomo_conversation(split: str, seed: int, index: int,
                        diff: Difficulty = HELDOUT_LOCOMO) -> dict:
    """One conversation in the LoCoMo layout, with one question per fact."""
    rng = random.Random(f"deltamem-locomo:{split}:{seed}:{index}")
    pool = pools(split)
    conv = generate_conversation(rng, pool, diff)
    doc, dia_ids = locomo_layout(conv)
    qa = [{"question": question_for(f, pool, rng), "answer": f.value,
           "evidence": [dia_ids[f.turn]], "category": f.category} for f in conv.facts]
    return {"sample_id": f"deltamem-{split}-{seed}-{index}", "conversation": doc, "qa": qa}


def write_locomo_json(path: str | Path, n: int, split: str = "heldout", seed: int = 1234,
                      diff: Difficulty = HELDOUT_LOCOMO) -> Path:
    """Write `n` generated conversations as a LoCoMo-format JSON list."""
    return write_samples(path, [locomo_conversation(split, seed, i, diff) for i in range(n)])


def write_samples(path: str | Path, samples: list[dict]) -> Path:
    """LoCoMo-format samples as one JSON list (the layout LoCoMo's own file has)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(samples, indent=1, ensure_ascii=False))
    return path


def locomo_messages(sample: dict, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Messages of a LoCoMo conversation in the training layout (for evaluators that want the
    same format the adapter learned on)."""
    conv = sample["conversation"]
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    n = 1
    sessions = []
    while f"session_{n}" in conv:
        sessions.append(n)
        n += 1
    for s in sessions:
        if len(sessions) > 1:
            msgs.append({"role": "user",
                         "content": f"[Session {s}, {conv.get(f'session_{s}_date_time', '')}]"})
        for t in conv[f"session_{s}"]:
            msgs.append({"role": "user", "content": f"{t['speaker']}: {t['text']}"})
    return msgs


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m deltamem.data",
                                description="Write generated conversations in LoCoMo format.")
    p.add_argument("path", type=Path)
    p.add_argument("-n", type=int, default=50, help="conversations (default 50)")
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--preset", choices=sorted(LOCOMO_PRESETS), default="standard")
    a = p.parse_args(argv)
    print(write_locomo_json(a.path, a.n, a.split, a.seed, LOCOMO_PRESETS[a.preset]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
