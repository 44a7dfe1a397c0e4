"""Generated conversations that look like real ones: two people's lives over dated sessions.

`deltamem.data` generates fact-recall chats: facts stated in one line among filler, each asked
back as a short value. Real conversations (LoCoMo's, a user's with an assistant) are not like
that: what happens in people's lives (a pet adopted, a new job, a move, a trip planned and
then changed, a class taken up, family news) is told in natural turns of varied length, over
sessions weeks apart, mentioned again later, changed and contradicted; the questions are of
LoCoMo's kinds and their answers run from a few words to a sentence.

Each conversation here weaves a few such *threads* per person through 4-8 dated sessions,
among greetings, small talk and reactions. Every thread is a list of beats (a few
consecutive turns, in sessions in order) and the questions it can answer, with the beats
that hold the evidence. Questions use LoCoMo's categories and numbering:

    1 multi-hop    an answer gathered from several beats ("Biscuit, Mango"; the job before)
    2 temporal     a date worked out from a session's date ("7 May 2023", "the week
                   before 8 May 2023"), as LoCoMo's annotators wrote them
    3 open-domain  an inference, answered "Yes; <why>" (scored on the part before ';')
    4 single-hop   one beat's fact, in a few words
    5 adversarial  the question names the wrong person; `adversarial_answer` holds what the
                   right person's answer would have been, and the right reply is that the
                   conversation does not say

The "train" and "heldout" splits draw from disjoint pools: names, places, pets, jobs,
hobbies, events, titles, and every template (beats, filler, questions) are split by
alternating index, so a held-out score measures a memory that carries over to unseen people
and wordings. Everything is pure Python, deterministic given (split, seed, index).

    python -m deltamem.dialogues OUT.json -n 12 --seed 1234     # LoCoMo-format held-out set
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .data import SPLITS, Episode, locomo_messages, write_samples

MULTI_HOP, TEMPORAL, OPEN_DOMAIN, SINGLE_HOP, ADVERSARIAL = 1, 2, 3, 4, 5

# --- pools -----------------------------------------------------------------------------------
# Every list is split by alternating index (even -> train, odd -> heldout).

WOMEN = """Abigail Bella Camila Daphne Eliza Frida Gemma Harriet Isla Joanna Kendra Leah
Miriam Nora Octavia Paloma Rebecca Sofia Tessa Valeria Winona Yasmin Adele Brenda Celeste
Dolores Esme Francesca Georgia Hannah Imogen Julia Lorena Maeve Natalie Ophelia Phoebe
Rosalind Sabrina Teresa""".split()
MEN = """Aaron Benedict Caleb Desmond Elliot Franco Gabriel Harvey Isaac Joel Kieran Lionel
Malcolm Nathan Oliver Patrick Reuben Silas Thomas Victor Warren Yosef Adrian Bernard Conrad
Dominic Ezra Fletcher Graham Henry Ignacio Jerome Kenneth Leonard Marcus Neil Owen Preston
Roland Simon""".split()
RELATIVES_F = ["sister", "cousin", "aunt", "niece", "grandmother", "best friend"]
RELATIVES_M = ["brother", "cousin", "uncle", "nephew", "grandfather", "best friend"]
CITIES = """Lisbon Denver Kyoto Glasgow Montreal Seville Melbourne Austin Gothenburg Hamburg
Portland Valencia Edinburgh Vancouver Nashville Marseille Auckland Pittsburgh Toulouse Dublin
Minneapolis Antwerp Sacramento Bologna Halifax Rotterdam Savannah Krakow Tucson Bergen Boise
Leipzig""".split()
COUNTRIES = ["Portugal", "Iceland", "Japan", "Peru", "Greece", "Vietnam", "Morocco", "Norway",
             "Croatia", "Chile", "Kenya", "Scotland", "Mexico", "Thailand", "Ireland",
             "Argentina", "Turkey", "Canada", "Egypt", "Italy", "Costa Rica", "Nepal", "Spain",
             "Jordan"]
PET_KINDS = ["dog", "cat", "rabbit", "parrot", "puppy", "kitten", "hamster", "tortoise"]
PET_NAMES = """Biscuit Luna Pepper Milo Maple Otis Clementine Rufus Pumpkin Ziggy Hazel
Bruno Nutmeg Gus Willow Scout Poppy Moose Juniper Toby Olive Ringo Pippa Archie Daisy Bowie
Mabel Theo Ginger Frankie""".split()
JOBS = ["nurse", "graphic designer", "teacher", "software engineer", "pharmacist",
        "physical therapist", "accountant", "chef", "architect", "journalist", "electrician",
        "librarian", "paramedic", "marketing manager", "veterinary technician", "barista",
        "social worker", "lab technician", "real estate agent", "pastry chef"]
WORKPLACES = ["a hospital", "a small design studio", "an elementary school", "a startup",
              "a pharmacy downtown", "a rehab clinic", "an accounting firm", "an Italian restaurant",
              "a big architecture firm", "the local newspaper", "a construction company",
              "the public library", "the city ambulance service", "an ad agency",
              "an animal hospital", "a coffee shop", "a family services center",
              "a university lab", "a real estate office", "a French bakery"]
HOBBIES = ["pottery", "salsa dancing", "rock climbing", "watercolor painting", "guitar",
           "yoga", "photography", "baking", "tennis", "woodworking", "swimming", "chess",
           "gardening", "kickboxing", "knitting", "piano", "surfing", "calligraphy"]
EVENTS = ["a jazz concert", "a food festival", "a charity run", "a comedy show",
          "a farmers market", "a film festival", "a board game night", "an art exhibition",
          "a wine tasting", "a book fair", "a baseball game", "a street parade",
          "a science museum opening", "a poetry reading", "a craft fair", "a music festival"]
# A race and its plausible finishing times in minutes.
RACES = {"a 10K": (48, 75), "a half marathon": (100, 160), "a marathon": (210, 320),
         "a sprint triathlon": (75, 120), "a 5K trail race": (24, 45),
         "a charity bike ride": (120, 240), "a 5K": (22, 38), "an obstacle race": (45, 95)}
NEWS = ["got engaged", "had a baby girl", "started college", "got a promotion",
        "bought a house", "had a baby boy", "opened a bakery", "graduated from nursing school",
        "moved abroad", "adopted a puppy"]
ADJECTIVES = ["Silent", "Golden", "Hidden", "Last", "Broken", "Distant", "Painted",
              "Endless", "Quiet", "Crimson", "Lonely", "Secret", "Winter", "Burning"]
NOUNS = ["Garden", "River", "Lighthouse", "Orchard", "Letters", "Harbor", "Kingdom",
         "Forest", "Island", "Daughter", "Summer", "Mountain", "Library", "Sky"]
MEDIA = ["book", "novel", "show", "podcast", "documentary", "movie"]
FEELINGS = ["so excited", "a little nervous", "really happy about it", "still in shock",
            "over the moon", "kind of overwhelmed", "thrilled", "relieved, honestly"]
TRICKS = ["sit on command", "open the fridge", "fetch the newspaper", "high-five",
          "ring a bell when it wants food", "roll over", "wave hello", "hide under the bed"]


def _half(items: list, split: str) -> list:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(items[0::2] if split == "train" else items[1::2])


# --- time ------------------------------------------------------------------------------------

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def day_text(d: dt.date) -> str:
    """A date as LoCoMo's answers write it: "7 May 2023"."""
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def session_stamp(t: dt.datetime) -> str:
    """A session's date as LoCoMo writes it: "1:56 pm on 8 May, 2023"."""
    hour = t.hour % 12 or 12
    return (f"{hour}:{t.minute:02d} {'am' if t.hour < 12 else 'pm'} on {t.day} "
            f"{MONTHS[t.month - 1]}, {t.year}")


# A past time said relative to the session, and how LoCoMo's answers resolve it.
WHEN: dict[str, Callable[[dt.date], str]] = {
    "yesterday": lambda d: day_text(d - dt.timedelta(days=1)),
    "two days ago": lambda d: day_text(d - dt.timedelta(days=2)),
    "last weekend": lambda d: f"the weekend before {day_text(d)}",
    "last week": lambda d: f"the week before {day_text(d)}",
    "this morning": day_text,
    "last month": lambda d: (f"{MONTHS[(d.month - 2) % 12]} "
                             f"{d.year - (d.month == 1)}"),
}


# --- conversations ---------------------------------------------------------------------------


@dataclass
class Person:
    name: str
    she: bool

    @property
    def pron(self) -> str:
        return "she" if self.she else "he"

    @property
    def poss(self) -> str:
        return "her" if self.she else "his"


@dataclass
class Beat:
    """Turns one thread adds in one session: (speaker, text) with speaker 0 the thread's
    owner and 1 the other person; `gap` sessions after the thread's previous beat (at least).
    A beat's relative times ("last week") are resolved by its questions' answers, against
    the date of the session the beat lands in."""

    turns: list[tuple[int, str]]
    gap: int = 1


@dataclass
class Question:
    text: str
    answer: str | Callable[[list[dt.date]], str]  # callable: gets each beat's session date
    beats: list[int]  # indices into the thread's beats: the evidence
    category: int
    adversarial_answer: str | None = None


@dataclass
class Thread:
    kind: str
    beats: list[Beat]
    questions: list[Question] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)  # for multi-hop questions across threads


@dataclass(frozen=True)
class Shape:
    """How long a conversation is: sessions, threads per person, filler turns a session."""

    sessions: tuple[int, int] = (5, 7)
    threads: tuple[int, int] = (2, 3)
    filler: tuple[int, int] = (3, 6)
    days_between: tuple[int, int] = (4, 24)


SHAPES = {"short": Shape(sessions=(3, 4), threads=(1, 2), filler=(2, 4)),
          "standard": Shape(),
          "long": Shape(sessions=(8, 10), threads=(3, 4), filler=(5, 9))}


class _Draw:
    """Random draws from one split's pools, never the same value twice in a conversation."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split, self.used = rng, split, set()

    def pick(self, items: list, exclude=()) -> str:
        choices = [x for x in _half(items, self.split)
                   if x not in self.used and x not in exclude]
        x = self.rng.choice(choices)
        self.used.add(x)
        return x

    def say(self, templates: list[str], **kw) -> str:
        return self.rng.choice(_half(templates, self.split)).format(**kw)

    def title(self) -> str:
        while True:
            t = (f"The {self.rng.choice(_half(ADJECTIVES, self.split))} "
                 f"{self.rng.choice(_half(NOUNS, self.split))}")
            if t not in self.used:
                self.used.add(t)
                return t


# Templates. Placeholders: {o} owner's name, {x} the other's, {p}/{P} owner's pronoun
# (lower/capitalised), {her} owner's possessive, {when}, and each thread's own values.

PET_NEW = [
    "Guess what, I adopted a {kind} {when}! {Her} name is {name}. I'm {feel}.",
    "Big news on my side: we brought home a {kind} {when}. We named {him} {name}.",
    "So {when} I finally did it and adopted a little {kind} called {name}. The apartment "
    "is chaos now, but I'm {feel}.",
    "I have someone new at home! A {kind} named {name}, we got {him} from the shelter {when}.",
    "You won't believe it, I went to the shelter just to look and came home with a {kind}. "
    "That was {when}. {Her} name is {name}.",
    "We adopted a {kind} {when}, {name}. {Her} first night was rough, but {he} is settling in.",
]
PET_REACT = [
    "Aww, {name} is such a cute name! You have to send me pictures.",
    "Congrats! How is {name} getting along with everyone?",
    "That's amazing, I've always wanted a {kind}.",
    "Oh wow, a {kind}! I bet {name} keeps you busy.",
    "No way! I need to meet {name} soon.",
    "That's so sweet. Shelter animals are the best.",
]
PET_LATER = [
    "{name} learned to {trick} this week, I was so proud.",
    "Quick {name} update: {he} finally learned to {trick}. Smartest {kind} ever.",
    "{name} is doing great by the way. {He} can {trick} now, can you believe it?",
    "Life with {name} is wonderful. {He} figured out how to {trick}, which is both cute and a "
    "problem.",
]
JOB_OLD = [
    "Work has been intense. Being a {job} at {place} is a lot some weeks.",
    "I'm so tired, we were short-staffed at {place} again. That's the life of a {job}, I guess.",
    "Honestly I love being a {job}, but {place} is wearing me out lately.",
    "I had a long shift at {place} today. Some days I wonder how long I can keep being a {job}.",
]
JOB_NEW = [
    "I finally did it: I quit {place} and accepted an offer as a {job2} at {place2}! "
    "I start next week.",
    "Career news! I'm leaving my {job} job. I got hired as a {job2} at {place2}.",
    "So I have a new job: {job2} at {place2}. It's a big change from being a {job}, "
    "but I'm {feel}.",
    "Remember how unhappy I was at {place}? I'm out! Starting as a {job2} at {place2} "
    "on Monday.",
]
TRIP_REACT = [
    "Oh, that sounds amazing! Have you been before?",
    "Lucky you! I'd love to go there someday.",
    "That's going to be such a good trip.",
    "Wow! You'll have to tell me everything.",
]
MOVE_REACT = [
    "Wow, that's a big change! Good luck with the move.",
    "Oh, I'll miss having you nearby, but that's exciting.",
    "That's huge news. Do you need help packing?",
    "Exciting! New city, new start.",
]
RACE_REACT = [
    "Wow, good luck with the training!",
    "That's ambitious! I could never.",
    "You've got this. I'll come cheer for you.",
    "Amazing, have you done one before?",
]
HOBBY_REACT = [
    "That sounds like so much fun!",
    "Oh nice, I've always wanted to try that.",
    "Good for you, it's great to learn something new.",
    "Ooh, you'll have to show me what you make.",
]
JOB_REACT = [
    "Congratulations! That's a huge step.",
    "Wow, good for you! You deserve something better.",
    "That's great news, I'm really happy for you.",
    "Amazing! How did the interview go?",
]
MOVE_PLAN = [
    "We've decided to move. We're leaving {city} and going to {city2} in a couple of months.",
    "Some news: I'm moving to {city2}! I've lived in {city} my whole adult life, so it's scary.",
    "We signed a lease in {city2}. Saying goodbye to {city} is going to be hard.",
    "I'm finally leaving {city}. The plan is {city2}, closer to my family.",
]
MOVE_DONE = [
    "We're all moved in! {city2} is lovely, and our new place gets so much light.",
    "Writing to you from {city2}! The boxes are everywhere, but we made it.",
    "The move to {city2} is done. I already found a great bakery around the corner.",
    "I've been in {city2} for a few weeks now and I already feel at home.",
]
TRIP_PLAN = [
    "We're planning a trip to {country} in {month}. I've wanted to go there for years.",
    "I booked flights! {country} in {month}, can you believe it?",
    "Thinking about {country} for our vacation in {month}. Any tips?",
    "Our big trip this year is going to be {country}, sometime in {month}.",
]
TRIP_CHANGE = [
    "Change of plans: the flights to {country} got way too expensive, so we're going to "
    "{country2} instead.",
    "So {country} is off. We switched to {country2} because of the weather there.",
    "Update on the trip: we're doing {country2} instead of {country} now. Long story.",
    "We cancelled {country}. We're going to {country2} instead, my partner found a great deal.",
]
TRIP_BACK = [
    "We just got back from {country2} {when}. The food was incredible and I'm exhausted.",
    "Back from {country2}! We landed {when}. I already miss it.",
    "Home again, we got back from {country2} {when}. I took about a thousand photos.",
    "I got back from {country2} {when}. Best trip I've ever taken.",
]
HOBBY_START = [
    "I signed up for a {hobby} class {when}! Our teacher, {teacher}, is really patient.",
    "I started taking {hobby} lessons {when}. My instructor is called {teacher}.",
    "New hobby alert: {hobby}. I had my first class {when} with a teacher named {teacher}.",
    "I finally joined that {hobby} class {when}. {teacher} runs it and {tp} is great.",
]
HOBBY_LATER = [
    "{Hobby} is going so well. {teacher} said I'm one of the fastest learners {tp} has had.",
    "I'm still doing {hobby} every week, it's the best part of my week.",
    "I can't stop thinking about {hobby}. I even practice on my lunch break now.",
    "My {hobby} class had a little showcase and {teacher} asked me to go first!",
]
EVENT_WENT = [
    "I went to {event} {when} with my {rel} {relname}. It was so much fun.",
    "{when_cap} {relname}, my {rel}, dragged me to {event}, and I actually loved it.",
    "Did I tell you? {when_cap} I went to {event} with {relname}, my {rel}.",
    "Me and my {rel} {relname} went to {event} {when}. We stayed until the very end.",
]
EVENT_REACT = [
    "That sounds like a great time!",
    "Oh fun, I've always wanted to go to one of those.",
    "Nice, it's good to get out of the house.",
    "How was it? Was it crowded?",
]
NEWS_TOLD = [
    "Family news: my {rel} {relname} {news}! We're all {feel}.",
    "My {rel} {relname} {news} {when}. I'm so proud.",
    "Guess who {news}? My {rel}, {relname}! I found out {when}.",
    "I have to tell someone: {relname}, my {rel}, just {news}.",
]
NEWS_REACT = [
    "Please tell {relname} congratulations from me!",
    "That's wonderful news for your family.",
    "Wow, what a year for {relname}!",
    "Oh how lovely, you must be so happy.",
]
RACE_PLAN = [
    "I signed up for {race} in {month}. Training starts now, wish me luck.",
    "I'm training for {race} in {month}. My knees are already complaining.",
    "Crazy idea maybe, but I registered for {race} this {month}.",
    "I've been running every morning, I'm doing {race} in {month}.",
]
RACE_DONE = [
    "I did it! I finished {race} in {time}. My legs are jelly.",
    "{race_cap} done: {time}. Not fast, but I finished.",
    "I ran {race} and finished in {time}! Already thinking about the next one.",
    "Finished {race} {when} in {time}. I cried a little at the finish line.",
]
RECOMMEND = [
    "You have to check out the {media} \"{title}\". I think you'd love it.",
    "Have you heard of \"{title}\"? It's a {media} I just finished, so good.",
    "My recommendation of the month: \"{title}\". Best {media} I've seen in ages.",
    "If you need something new, try \"{title}\". It's a {media} and it's wonderful.",
]
RECOMMEND_BACK = [
    "I finally got to \"{title}\" like you said. You were right, I loved it.",
    "Thanks for recommending \"{title}\"! I finished it in two days.",
    "I started \"{title}\". I'm hooked, thank you.",
    "\"{title}\" was so good. I've already told my friends about it.",
]

GREETINGS = [
    "Hey {x}! How have you been?",
    "Hi {x}, long time no talk! What's new?",
    "Good to hear from you, {x}. How's everything?",
    "Hey! Sorry I've been quiet, it's been a crazy couple of weeks.",
    "Hi {x}! I was just thinking about you.",
    "Hello! How was your week?",
    "Hey {x}, do you have a minute to chat?",
    "Hi! I hope you're doing well.",
]
REPLIES = [
    "Hey! I'm good, busy but good. You?",
    "Hi! Doing well, thanks. A lot has happened actually.",
    "Oh hi! Things are fine here, just tired.",
    "Hey {x}! Great to hear from you.",
    "Not bad at all! What about you?",
    "Hi! It's been a while, I was hoping you'd message.",
]
# Small talk: (text, tone); the other person answers in the tone's way.
SMALL_TALK = [
    ("The weather has been so gray lately, I can't wait for some sun.", "bad"),
    ("I've been trying to cook more at home, mostly soups so far.", "good"),
    ("I binge-watched a whole season of something terrible last night, no regrets.", "fun"),
    ("My neighbors are renovating and the drilling starts at 7 am every day.", "bad"),
    ("I've been sleeping so badly this week.", "bad"),
    ("I tried that new cafe near the park, the pastries are unreal.", "good"),
    ("Work is the same as always, nothing exciting there.", "meh"),
    ("I finally cleaned out my closet. Three bags of clothes to donate!", "good"),
    ("Traffic this week was a nightmare, I was late twice.", "bad"),
    ("I've been reading before bed instead of scrolling, it really helps.", "good"),
    ("We had friends over on Saturday and played cards until 2 am.", "fun"),
    ("I need a vacation, even just a long weekend.", "bad"),
    ("My phone screen cracked again. Third time this year.", "bad"),
    ("I've been going on walks at lunch, it clears my head.", "good"),
    ("Did you see the storm last night? Our power went out for an hour.", "bad"),
    ("I'm trying to drink less coffee, it's not going well.", "fun"),
    ("I spent the whole Sunday doing laundry and meal prep. Very glamorous.", "fun"),
    ("My car made a weird noise all week, and of course it stopped at the mechanic's.", "bad"),
    ("I bought a plant for the kitchen and it's somehow still alive.", "fun"),
    ("It's been a quiet week, which honestly I needed.", "meh"),
    ("My back has been hurting from sitting all day, I need a better chair.", "bad"),
    ("I found an old photo album at my parents' place, so many memories.", "good"),
    ("I've started making my own bread on weekends. The first loaf was a brick.", "fun"),
    ("My internet was down for two days, I didn't know what to do with myself.", "bad"),
    ("We tried a new Thai place downtown, the curry was perfect.", "good"),
    ("I keep meaning to call my mom more often.", "meh"),
    ("I finally fixed the leaky faucet myself! I watched like ten videos first.", "good"),
    ("The grocery prices these days are unbelievable.", "bad"),
    ("I reorganized my whole desk this weekend and now I can't find anything.", "fun"),
    ("My friend roped me into karaoke on Friday. I was terrible and it was great.", "fun"),
    ("I've been so busy that I forgot my own dentist appointment.", "bad"),
    ("The sunsets this time of year are so pretty from my window.", "good"),
]
REACT = {
    "bad": ["Oh no, that sounds annoying.", "Ugh, I'm sorry.", "Hang in there!",
            "That's rough. I hope it gets better soon.", "I know the feeling, honestly.",
            "Oof. That would drive me crazy."],
    "good": ["That's nice, I should do that too.", "Oh, that sounds lovely.",
             "Good for you!", "Ooh, I want to try that.", "Nice, that's great to hear.",
             "I love that."],
    "fun": ["Haha, classic.", "Ha, I love it.", "That's the best kind of weekend.",
            "Haha, that sounds like me.", "No shame in that!", "Ha! Same."],
    "meh": ["Same here, honestly.", "Fair enough.", "Sometimes boring is good.",
            "I hear you.", "Yeah, it's been like that for me too.", "Makes sense."],
}
THANKS = ["Ooh, thanks, I'll check it out!", "Adding it to my list right now.",
          "I've heard good things about that one.", "Thanks! I needed something new."]
PROMPTS = ["Anyway, what's new with you?", "So tell me, anything new?",
           "How about you, what have you been up to?", "Enough about me. How are things?",
           "What's going on in your life these days?", "Any news on your side?",
           "And you? Anything exciting?", "How's life treating you?"]
GOODBYES = [
    "I have to run, talk soon!",
    "Okay, I'll let you go. Take care!",
    "Great catching up, bye for now!",
    "Let's talk again soon. Say hi to everyone for me.",
    "Gotta go make dinner. Bye!",
    "Talk to you later!",
]

# Questions, per thread kind. {o}: the owner's name.
Q_PET_NAME = ["What is the name of {o}'s {kind}?", "What did {o} name {her} {kind}?",
              "What is {o}'s {kind} called?", "What name did {o} give the {kind}?"]
Q_PET_WHEN = ["When did {o} adopt {name}?", "When did {o} get {her} {kind}?"]
Q_PET_TRICK = ["What trick did {o}'s {kind} learn?", "What can {name} do now?"]
Q_JOB_NOW = ["What is {o}'s new job?", "What does {o} work as now?",
             "What job did {o} take?", "What is {o} working as after changing jobs?"]
Q_JOB_BEFORE = ["What did {o} work as before becoming a {job2}?",
                "What was {o}'s job before the {job2} position?"]
Q_JOB_WHERE = ["Where does {o} work now?", "Where did {o} get a job as a {job2}?"]
Q_CITY_NEW = ["Which city is {o} moving to?", "Where did {o} move?",
              "What city does {o} live in now?", "Which city did {o} move to?"]
Q_CITIES = ["Which cities has {o} lived in?", "In which cities has {o} lived?"]
Q_TRIP = ["Where did {o} go on vacation?", "Which country did {o} visit in {month}?",
          "Where did {o} travel in {month}?", "What country did {o} end up visiting?"]
Q_TRIP_WHEN = ["When did {o} get back from {country2}?", "When did {o} return from {country2}?"]
Q_TRIP_FIRST = ["Where did {o} first plan to travel before changing plans?",
                "Which country did {o} originally plan to visit?"]
Q_HOBBY = ["What class did {o} sign up for?", "What hobby did {o} take up?",
           "What new activity did {o} start?", "What lessons is {o} taking?"]
Q_TEACHER = ["Who is {o}'s {hobby} teacher?", "What is the name of {o}'s {hobby} instructor?"]
Q_HOBBY_WHEN = ["When did {o} start {hobby}?", "When was {o}'s first {hobby} class?"]
Q_HOBBY_LIKE = ["Would {o} enjoy a gift related to {hobby}?",
                "Is {o} likely to spend free time on {hobby}?"]
Q_EVENT_WHO = ["Who did {o} go to {event} with?", "Who went to {event} with {o}?"]
Q_EVENT_WHEN = ["When did {o} go to {event}?", "When did {o} attend {event}?"]
Q_NEWS = ["What news did {o} share about {her} {rel}?", "What happened with {o}'s {rel}?"]
Q_NEWS_WHO = ["Which relative of {o} {news}?", "Who in {o}'s family {news}?"]
Q_RACE = ["What race did {o} train for?", "What race did {o} sign up for?"]
Q_RACE_TIME = ["How long did it take {o} to finish {race}?", "What was {o}'s time in {race}?"]
Q_RACE_FIT = ["Is {o} into fitness?", "Would {o} likely sign up for another race?"]
Q_RECOMMEND = ["What {media} did {x} recommend to {o}?",
               "Which {media} did {o} get recommended by {x}?",
               "What was the {media} {x} told {o} to check out?",
               "Which {media} did {x} suggest to {o}?"]


def _pet(d: _Draw, o: Person, x: Person) -> Thread:
    kind, name = d.pick(PET_KINDS), d.pick(PET_NAMES)
    she = d.rng.random() < 0.5
    pet = {"kind": kind, "name": name, "feel": d.pick(FEELINGS), "trick": d.pick(TRICKS),
           "Her": "Her" if she else "His", "him": "her" if she else "him",
           "he": "she" if she else "he", "He": "She" if she else "He"}
    when = d.rng.choice(["yesterday", "two days ago", "last weekend", "last week"])
    beats = [Beat([(0, d.say(PET_NEW, **pet, when=when)), (1, d.say(PET_REACT, **pet))]),
             Beat([(0, d.say(PET_LATER, **pet))], gap=d.rng.randint(1, 3))]
    qs = [Question(d.say(Q_PET_NAME, o=o.name, her=o.poss, kind=kind), name, [0], SINGLE_HOP),
          Question(d.say(Q_PET_WHEN, o=o.name, her=o.poss, kind=kind, name=name),
                   lambda dates, w=when: WHEN[w](dates[0]), [0], TEMPORAL),
          Question(d.say(Q_PET_TRICK, o=o.name, kind=kind, name=name),
                   f"to {pet['trick']}", [1], SINGLE_HOP),
          Question(d.say(Q_PET_NAME, o=x.name, her=x.poss, kind=kind), "", [0], ADVERSARIAL,
                   adversarial_answer=name)]
    return Thread("pet", beats, qs, {"pet": name})


def _job(d: _Draw, o: Person, x: Person) -> Thread:
    i, j = d.rng.sample(range(len(_half(JOBS, d.split))), 2)
    job, job2 = _half(JOBS, d.split)[i], _half(JOBS, d.split)[j]
    place, place2 = _half(WORKPLACES, d.split)[i], _half(WORKPLACES, d.split)[j]
    kw = {"job": job, "job2": job2, "place": place, "place2": place2, "feel": d.pick(FEELINGS)}
    beats = [Beat([(0, d.say(JOB_OLD, **kw)), (1, d.say(REACT["bad"]))]),
             Beat([(0, d.say(JOB_NEW, **kw)), (1, d.say(JOB_REACT))], gap=d.rng.randint(1, 3))]
    qs = [Question(d.say(Q_JOB_NOW, o=o.name), f"a {job2}" if job2[0] not in "aeiou"
                   else f"an {job2}", [1], SINGLE_HOP),
          Question(d.say(Q_JOB_BEFORE, o=o.name, job2=job2), job, [0, 1], MULTI_HOP),
          Question(d.say(Q_JOB_WHERE, o=o.name, job2=job2), place2, [1], SINGLE_HOP),
          Question(d.say(Q_JOB_NOW, o=x.name), "", [1], ADVERSARIAL, adversarial_answer=job2)]
    return Thread("job", beats, qs)


def _move(d: _Draw, o: Person, x: Person) -> Thread:
    city, city2 = d.pick(CITIES), d.pick(CITIES)
    kw = {"city": city, "city2": city2}
    beats = [Beat([(0, d.say(MOVE_PLAN, **kw)), (1, d.say(MOVE_REACT))]),
             Beat([(0, d.say(MOVE_DONE, **kw)), (1, d.say(REACT["good"]))],
                  gap=d.rng.randint(1, 2))]
    qs = [Question(d.say(Q_CITY_NEW, o=o.name), city2, [0], SINGLE_HOP),
          Question(d.say(Q_CITIES, o=o.name), f"{city}, {city2}", [0, 1], MULTI_HOP),
          Question(d.say(Q_CITY_NEW, o=x.name), "", [0], ADVERSARIAL, adversarial_answer=city2)]
    return Thread("move", beats, qs)


def _trip(d: _Draw, o: Person, x: Person) -> Thread:
    country, country2 = d.pick(COUNTRIES), d.pick(COUNTRIES)
    month = d.rng.choice(MONTHS)
    when = d.rng.choice(["yesterday", "two days ago", "last weekend", "last week"])
    kw = {"country": country, "country2": country2, "month": month, "when": when}
    beats = [Beat([(0, d.say(TRIP_PLAN, **kw)), (1, d.say(TRIP_REACT))]),
             Beat([(0, d.say(TRIP_CHANGE, **kw))], gap=d.rng.randint(1, 2)),
             Beat([(0, d.say(TRIP_BACK, **kw)), (1, d.say(REACT["good"]))], gap=1)]
    qs = [Question(d.say(Q_TRIP, o=o.name, month=month), country2, [1, 2], SINGLE_HOP),
          Question(d.say(Q_TRIP_WHEN, o=o.name, country2=country2),
                   lambda dates, w=when: WHEN[w](dates[2]), [2], TEMPORAL),
          Question(d.say(Q_TRIP_FIRST, o=o.name), country, [0, 1], MULTI_HOP),
          Question(d.say(Q_TRIP, o=x.name, month=month), "", [2], ADVERSARIAL,
                   adversarial_answer=country2)]
    return Thread("trip", beats, qs)


def _hobby(d: _Draw, o: Person, x: Person) -> Thread:
    hobby = d.pick(HOBBIES)
    she = d.rng.random() < 0.5
    teacher = d.pick(WOMEN if she else MEN)
    when = d.rng.choice(["yesterday", "two days ago", "last week", "this morning"])
    kw = {"hobby": hobby, "Hobby": hobby[0].upper() + hobby[1:], "teacher": teacher,
          "tp": "she" if she else "he"}
    beats = [Beat([(0, d.say(HOBBY_START, **kw, when=when)), (1, d.say(HOBBY_REACT))]),
             Beat([(0, d.say(HOBBY_LATER, **kw))], gap=d.rng.randint(1, 3))]
    qs = [Question(d.say(Q_HOBBY, o=o.name), hobby, [0], SINGLE_HOP),
          Question(d.say(Q_TEACHER, o=o.name, hobby=hobby), teacher, [0], SINGLE_HOP),
          Question(d.say(Q_HOBBY_WHEN, o=o.name, hobby=hobby),
                   lambda dates, w=when: WHEN[w](dates[0]), [0], TEMPORAL),
          Question(d.say(Q_HOBBY_LIKE, o=o.name, hobby=hobby),
                   f"Yes; {o.pron} takes {hobby} classes", [0, 1], OPEN_DOMAIN),
          Question(d.say(Q_TEACHER, o=x.name, hobby=hobby), "", [0], ADVERSARIAL,
                   adversarial_answer=teacher)]
    return Thread("hobby", beats, qs, {"hobby": hobby})


def _relative(d: _Draw) -> tuple[str, str]:
    she = d.rng.random() < 0.5
    return d.pick(RELATIVES_F if she else RELATIVES_M), d.pick(WOMEN if she else MEN)


def _event(d: _Draw, o: Person, x: Person) -> Thread:
    event = d.pick(EVENTS)
    rel, relname = _relative(d)
    when = d.rng.choice(["yesterday", "two days ago", "last weekend", "last week"])
    kw = {"event": event, "rel": rel, "relname": relname, "when": when,
          "when_cap": when[0].upper() + when[1:]}
    beats = [Beat([(0, d.say(EVENT_WENT, **kw)), (1, d.say(EVENT_REACT))])]
    qs = [Question(d.say(Q_EVENT_WHO, o=o.name, event=event), f"{o.poss} {rel} {relname}",
                   [0], SINGLE_HOP),
          Question(d.say(Q_EVENT_WHEN, o=o.name, event=event),
                   lambda dates, w=when: WHEN[w](dates[0]), [0], TEMPORAL),
          Question(d.say(Q_EVENT_WHO, o=x.name, event=event), "", [0], ADVERSARIAL,
                   adversarial_answer=relname)]
    return Thread("event", beats, qs)


def _news(d: _Draw, o: Person, x: Person) -> Thread:
    rel, relname = _relative(d)
    news = d.pick(NEWS)
    when = d.rng.choice(["yesterday", "last week", "two days ago"])
    kw = {"rel": rel, "relname": relname, "news": news, "when": when, "feel": d.pick(FEELINGS)}
    beats = [Beat([(0, d.say(NEWS_TOLD, **kw)), (1, d.say(NEWS_REACT, **kw))])]
    qs = [Question(d.say(Q_NEWS, o=o.name, her=o.poss, rel=rel), f"{relname} {news}", [0],
                   SINGLE_HOP),
          Question(d.say(Q_NEWS_WHO, o=o.name, news=news), f"{o.poss} {rel} {relname}", [0],
                   SINGLE_HOP)]
    return Thread("news", beats, qs)


def _race(d: _Draw, o: Person, x: Person) -> Thread:
    race, month = d.pick(list(RACES)), d.rng.choice(MONTHS)
    hours, minutes = divmod(d.rng.randint(*RACES[race]), 60)
    time = (f"{hours} hour{'s' * (hours > 1)} and {minutes} minutes" if hours
            else f"{minutes} minutes")
    when = d.rng.choice(["yesterday", "last weekend", "two days ago"])
    kw = {"race": race, "race_cap": race[0].upper() + race[1:], "month": month, "time": time,
          "when": when}
    beats = [Beat([(0, d.say(RACE_PLAN, **kw)), (1, d.say(RACE_REACT))]),
             Beat([(0, d.say(RACE_DONE, **kw)), (1, d.say(JOB_REACT))],
                  gap=d.rng.randint(1, 3))]
    qs = [Question(d.say(Q_RACE, o=o.name), race, [0], SINGLE_HOP),
          Question(d.say(Q_RACE_TIME, o=o.name, race=race), time, [1], SINGLE_HOP),
          Question(d.say(Q_RACE_FIT, o=o.name), f"Yes; {o.pron} trained for and ran {race}",
                   [0, 1], OPEN_DOMAIN)]
    return Thread("race", beats, qs)


def _recommend(d: _Draw, o: Person, x: Person) -> Thread:
    # The other person recommends; the owner comes back to it later.
    title, media = d.title(), d.pick(MEDIA)
    kw = {"title": title, "media": media}
    beats = [Beat([(1, d.say(RECOMMEND, **kw)), (0, d.say(THANKS))]),
             Beat([(0, d.say(RECOMMEND_BACK, **kw))], gap=d.rng.randint(1, 2))]
    q = d.say(Q_RECOMMEND, o=o.name, x=x.name, media=media)
    return Thread("recommend", beats, [Question(q, title, [0], SINGLE_HOP)])


THREADS: dict[str, Callable[[_Draw, Person, Person], Thread]] = {
    "pet": _pet, "job": _job, "move": _move, "trip": _trip, "hobby": _hobby,
    "event": _event, "news": _news, "race": _race, "recommend": _recommend}


@dataclass
class Dialogue:
    people: tuple[Person, Person]
    dates: list[dt.datetime]  # each session's
    sessions: list[list[tuple[int, str, str | None]]]  # (speaker, text, evidence key)
    questions: list[dict]  # LoCoMo qa items (evidence as dia_ids)


def _pick_people(d: _Draw) -> tuple[Person, Person]:
    people = []
    for _ in range(2):
        she = d.rng.random() < 0.5
        people.append(Person(d.pick(WOMEN if she else MEN), she))
    return people[0], people[1]


def generate(rng: random.Random, split: str, shape: Shape = SHAPES["standard"]) -> Dialogue:
    """One conversation: threads scheduled over dated sessions among filler turns, and the
    questions whose evidence made it into the conversation."""
    d = _Draw(rng, split)
    people = _pick_people(d)
    n_sessions = rng.randint(*shape.sessions)
    start = dt.datetime(rng.randint(2022, 2024), rng.randint(1, 12), rng.randint(1, 28),
                        rng.randint(8, 21), rng.randint(0, 59))
    dates = [start]
    for _ in range(n_sessions - 1):
        dates.append(dates[-1] + dt.timedelta(days=rng.randint(*shape.days_between),
                                              minutes=rng.randint(-300, 300)))
    # Threads: each person gets a few kinds (no kind twice for one person).
    threads: list[tuple[Thread, int]] = []  # (thread, the owner's index in `people`)
    for who in (0, 1):
        kinds = rng.sample(sorted(THREADS), rng.randint(*shape.threads))
        for kind in kinds:
            threads.append((THREADS[kind](d, people[who], people[1 - who]), who))
    # Schedule each thread's beats into sessions, in order, dropping what does not fit.
    slots: list[list[tuple[int, list[tuple[int, str]], str]]] = [[] for _ in dates]
    placed: dict[tuple[int, int], int] = {}  # (thread, beat) -> session
    for ti, (th, _) in enumerate(threads):
        last = n_sessions - 1 - sum(b.gap for b in th.beats[1:])
        s = rng.randint(0, max(0, last))
        for bi, beat in enumerate(th.beats):
            if bi:
                s += beat.gap
            if s >= n_sessions:
                break
            placed[(ti, bi)] = s
            slots[s].append((ti, beat.turns, f"t{ti}b{bi}"))
    talk = _half(SMALL_TALK, split)
    rng.shuffle(talk)  # no small talk twice in a conversation until all was said
    sessions = []
    for beats in slots:
        rng.shuffle(beats)
        blocks: list[list[tuple[int, str, str | None]]] = []
        for ti, beat_turns, key in beats:
            owner = threads[ti][1]
            blocks.append([(owner if sp == 0 else 1 - owner, text, key)
                           for sp, text in beat_turns])
        for _ in range(rng.randint(*shape.filler)):
            text, tone = talk.pop() if talk else rng.choice(_half(SMALL_TALK, split))
            # speaker -1: whoever did not speak last, -2: the other one (set below)
            blocks.insert(rng.randint(0, len(blocks)),
                          [(-1, text, None), (-2, d.say(REACT[tone]), None)])
        # A greeting and its reply, the blocks (the other asks what is new when a block
        # would make someone speak twice in a row), a goodbye.
        first = rng.randrange(2)
        turns: list[tuple[int, str, str | None]] = [
            (first, d.say(GREETINGS, x=people[1 - first].name), None),
            (1 - first, d.say(REPLIES, x=people[first].name), None)]
        for b in blocks:
            if b[0][0] < 0:
                who = 1 - turns[-1][0]
                b = [(who if sp == -1 else 1 - who, text, key) for sp, text, key in b]
            elif b[0][0] == turns[-1][0]:
                turns.append((1 - b[0][0], d.say(PROMPTS), None))
            turns.extend(b)
        turns.append((1 - turns[-1][0], d.say(GOODBYES), None))
        sessions.append(turns)
    # dia_ids, and questions whose evidence beats were all placed.
    dia: dict[str, list[str]] = {}
    for s, turns in enumerate(sessions):
        for i, (_, _, key) in enumerate(turns):
            if key:
                dia.setdefault(key, []).append(f"D{s + 1}:{i + 1}")
    questions = []
    kinds_of = [{th.kind for th, w in threads if w == who} for who in (0, 1)]
    for ti, (th, who) in enumerate(threads):
        for q in th.questions:
            if not all((ti, b) in placed for b in q.beats):
                continue
            if q.category == ADVERSARIAL and th.kind in kinds_of[1 - who]:
                continue  # the other person has one too: the question has a real answer
            beat_dates = [dates[placed[(ti, b)]].date() if (ti, b) in placed else None
                          for b in range(len(th.beats))]
            evidence = [i for b in q.beats for i in dia[f"t{ti}b{b}"][:1]]
            item = {"question": q.text, "evidence": evidence, "category": q.category}
            if q.category == ADVERSARIAL:
                item["adversarial_answer"] = q.adversarial_answer
            else:
                item["answer"] = q.answer(beat_dates) if callable(q.answer) else q.answer
            questions.append(item)
    _add_cross_thread(questions, threads, placed, dia, people, d)
    return Dialogue(people, dates, sessions, questions)


def _add_cross_thread(questions, threads, placed, dia, people, d: _Draw) -> None:
    """Multi-hop questions over two threads of one person: "Biscuit and rock climbing"."""
    for who in (0, 1):
        own = [(ti, th) for ti, (th, w) in enumerate(threads) if w == who and (ti, 0) in placed]
        pet = next(((ti, th) for ti, th in own if "pet" in th.facts), None)
        hobby = next(((ti, th) for ti, th in own if "hobby" in th.facts), None)
        if pet and hobby:
            o = people[who]
            questions.append({
                "question": d.say(["What is {o}'s pet called, and what class did {p} join?",
                                   "Name {o}'s pet and the class {p} signed up for."],
                                  o=o.name, p=o.pron),
                "answer": f"{pet[1].facts['pet']}, {hobby[1].facts['hobby']}",
                "evidence": [dia[f"t{pet[0]}b0"][0], dia[f"t{hobby[0]}b0"][0]],
                "category": MULTI_HOP})


# --- LoCoMo export and training episodes -----------------------------------------------------


def locomo_sample(dialogue: Dialogue, sample_id: str) -> dict:
    """A conversation in LoCoMo's layout: speakers, sessions of {speaker, dia_id, text} with
    their date_time, and the qa list."""
    a, b = dialogue.people
    conv: dict = {"speaker_a": a.name, "speaker_b": b.name}
    for s, (turns, date) in enumerate(zip(dialogue.sessions, dialogue.dates, strict=True), 1):
        conv[f"session_{s}_date_time"] = session_stamp(date)
        conv[f"session_{s}"] = [{"speaker": dialogue.people[sp].name, "dia_id": f"D{s}:{i}",
                                 "text": text} for i, (sp, text, _) in enumerate(turns, 1)]
    return {"sample_id": sample_id, "conversation": conv, "qa": dialogue.questions}


def locomo_dialogue(split: str, seed: int, index: int, shape: str = "standard") -> dict:
    """Conversation `index` of the (split, seed) stream, in LoCoMo's layout."""
    rng = random.Random(f"deltamem-dialogue:{split}:{seed}:{index}")
    return locomo_sample(generate(rng, split, SHAPES[shape]),
                         f"dialogue-{split}-{seed}-{index}")


def write_locomo_json(path: str | Path, n: int, split: str = "heldout", seed: int = 1234,
                      shape: str = "standard") -> Path:
    """Write `n` generated conversations as a LoCoMo-format JSON list."""
    return write_samples(path, [locomo_dialogue(split, seed, i, shape) for i in range(n)])


def make_episode(split: str, seed: int, index: int, shape: str = "standard",
                 rng: random.Random | None = None) -> Episode:
    """A training episode: the conversation as history and one of its answerable questions
    (category 5 left out: it has no answer to learn), in `deltamem.data.Episode`'s shape."""
    sample = locomo_dialogue(split, seed, index, shape)
    rng = rng or random.Random(f"deltamem-dialogue-question:{split}:{seed}:{index}")
    q = rng.choice([q for q in sample["qa"] if q["category"] != ADVERSARIAL])
    history = locomo_messages(sample)  # a header before each session, a message a turn
    # dia_id -> index among the history's non-system messages (session headers included)
    place, i, s = {}, 0, 1
    conv = sample["conversation"]
    while f"session_{s}" in conv:
        i += 1  # the session's header
        for t in conv[f"session_{s}"]:
            place[t["dia_id"]] = i
            i += 1
        s += 1
    return Episode(history, q["question"], q["answer"], q["category"], "dialogue",
                   evidence=tuple(place[e] for e in q["evidence"]))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m deltamem.dialogues",
        description="Write generated real-style conversations in LoCoMo format (the "
                    "held-out split by default; evaluate them with `deltamem eval --data`).")
    p.add_argument("path", type=Path, help="output JSON file")
    p.add_argument("-n", type=int, default=12, help="conversations (default 12)")
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--shape", choices=sorted(SHAPES), default="standard",
                   help="conversation length (default standard: 5-7 sessions)")
    a = p.parse_args(argv)
    out = write_locomo_json(a.path, a.n, a.split, a.seed, a.shape)
    data = json.loads(out.read_text())
    n_q = sum(len(s["qa"]) for s in data)
    print(f"{out}: {len(data)} conversations, {n_q} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
