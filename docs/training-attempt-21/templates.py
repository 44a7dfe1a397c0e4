"""Attempt 21: more ways to state, update and ask about each fact, for the train split of the
addressing fit only. Attempt 20's keys and queries reached 0.5-0.7 retrieval on train chats and
0.35-0.50 on held-out ones: with 3 statement, 2 update and 6 question templates a kind, they
learn the templates' words. None of these is a held-out template (checked in `train_pool`);
the held-out split and the evaluation are unchanged. A one-off (not project code).
"""

import dataclasses

import program_memory as P

from deltamem import data as D

EXTRA_STATE = {
    "pet": ["Our dog {v} is the sweetest.", "I walk {v}, my dog, every morning.",
            "Meet my cat, her name is {v}.", "We have a puppy now, {v}.",
            "The new pet at our place is named {v}.", "I call my hamster {v}."],
    "city": ["I am based in {v} these days.", "Our family lives in {v}.",
             "I rent a small place in {v}.", "My home town now is {v}.",
             "These days you will find me in {v}.", "I bought a house in {v}."],
    "job": ["I make my living as a {v}.", "At work I am a {v}.",
            "My profession is {v}.", "I got hired as a {v}.",
            "For work, I am a {v}.", "By day I am a {v}."],
    "food": ["I really love {v}.", "{v} is my absolute favourite.",
             "If I could pick one dish, it would be {v}.", "I order {v} whenever I can.",
             "My comfort food is {v}.", "Honestly, {v} is the best food there is."],
    "hobby": ["In my free time I do {v}.", "I have taken up {v}.",
              "These days my favourite pastime is {v}.", "I practise {v} twice a week.",
              "I recently got into {v}.", "{v} is my thing now."],
    "instrument": ["I play the {v} in a band.", "I have been taking {v} lessons.",
                   "My instrument is the {v}.", "I got a {v} for my birthday and play daily.",
                   "I am teaching myself the {v}.", "Every night I practise on my {v}."],
    "trip": ["We are going to {v} soon.", "I just booked flights to {v}.",
             "Our holiday this year is in {v}.", "I will travel to {v} next spring.",
             "I have a trip to {v} coming up.", "We plan to spend two weeks in {v}."],
    "birthday": ["I turn a year older on {v}.", "{v} is my birthday.",
                 "My birthday is coming up on {v}.", "Mark it: my birthday is {v}.",
                 "I always throw a party on {v}, my birthday.", "My date of birth is {v}."],
    "sibling": ["My sister is named {v}.", "I visited my sister {v} yesterday.",
                "{v}, my sister, says hi.", "My little sister {v} moved in with me.",
                "I went shopping with my sister {v}.", "My sister {v} has a new job."],
    "event": ["I was at {v} on Saturday.", "We checked out {v} last weekend.",
              "I attended {v} and it was great.", "On Sunday I went to {v}.",
              "I had fun at {v} last week.", "My weekend highlight was {v}."],
}
EXTRA_UPDATE = {
    "pet": ["Update: the pet's name is {v} now.", "We call our pet {v} these days."],
    "city": ["I have moved, I now live in {v}.", "New home: {v}."],
    "job": ["I have a new job, I am a {v} now.", "Career change: I am now a {v}."],
    "food": ["Actually, my favourite food is {v} now.", "I like {v} best now."],
    "hobby": ["I have a new hobby now: {v}.", "These days I do {v} instead."],
    "instrument": ["I now play the {v} instead.", "I switched to the {v}."],
    "trip": ["Our plans changed, we are going to {v}.", "The trip is now to {v}."],
}
EXTRA_QUESTIONS = {
    "pet": ["What is the pet of {p} called?", "Which name did {p} give the pet?"],
    "city": ["Where is {p}'s home now?", "Which city is {p} in?"],
    "job": ["What job does {p} have?", "What does {p} do for a living?"],
    "food": ["What is the favourite dish of {p}?", "What food does {p} like best?"],
    "hobby": ["What hobby does {p} have?", "What does {p} do in free time?"],
    "instrument": ["What is {p}'s instrument?", "Which instrument is {p} playing?"],
    "trip": ["Where is {p} travelling to?", "Which country is {p}'s trip to?"],
    "birthday": ["What is the date of {p}'s birthday?", "When does {p} have a birthday?"],
    "sibling": ["Who is the sister of {p}, by name?", "What name does {p}'s sister have?"],
    "event": ["What was {p} at last weekend?", "What event was {p} at?"],
}


def train_questions(slot: str) -> list[str]:
    """The train split's own questions, attempt 18's paraphrases and these."""
    return D.pools("train").question[slot] + P.EXTRA_QUESTIONS[slot] + EXTRA_QUESTIONS[slot]


def train_pool() -> D.Pools:
    """The train split's pool with the extra statements and updates."""
    pool = D.pools("train")
    held = D.pools("heldout")
    norm = str.lower
    held_templates = {norm(t) for d in (held.state, held.update, held.question)
                      for ts in d.values() for t in ts}
    for d in (EXTRA_STATE, EXTRA_UPDATE, EXTRA_QUESTIONS, P.EXTRA_QUESTIONS):
        for ts in d.values():
            clash = held_templates & {norm(t) for t in ts}
            assert not clash, f"held-out templates among the extra ones: {clash}"
    return dataclasses.replace(
        pool,
        state={s: pool.state[s] + EXTRA_STATE[s] for s in pool.state},
        update={s: pool.update[s] + (EXTRA_UPDATE.get(s, []) if pool.update[s] else [])
                for s in pool.update})
