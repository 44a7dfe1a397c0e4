"""Load test for the δ-mem server (locust).

Two kinds of users, both with think time between requests (1-3 s):

- `SessionUser` (3 of 4 users): opens a session (a unique `session_id`) and talks for several
  turns, some of them streamed; half of these users re-send the whole history each turn, as
  OpenAI-style clients do, the other half send only the new message. At the end of a
  conversation it reads the session back (version and turns must match), deletes it and opens
  a new one.
- `SessionlessUser` (1 of 4): one-shot questions without a session.

Every answer is checked: HTTP 200, `choices[0].message.content` a non-empty string, a finish
reason, `usage` consistent, and for session turns `session.version` one more than the turn
before. Streamed turns must be well-formed SSE: `data: ` lines of JSON chunks, one final chunk
with the finish reason and the session, a usage chunk, then `data: [DONE]`. Anything else is a
failure in locust's statistics (and `python -m deploy.load` exits non-zero).

Run it with `python -m deploy.load --host URL` (or `make load`), or with locust directly:
`locust -f deploy/locustfile.py --host http://127.0.0.1:8000`. Tuning by environment:
DELTAMEM_LOAD_MAX_TOKENS (48), DELTAMEM_LOAD_TURNS (turns per conversation, 5),
DELTAMEM_LOAD_STREAM_SHARE (share of streamed turns, 0.3), DELTAMEM_LOAD_TEMPERATURE (0),
DELTAMEM_LOAD_API_KEY (sent as a bearer token when set), DELTAMEM_LOAD_TIMEOUT (s, 120).
"""

from __future__ import annotations

import os
import random
import time
import uuid

from locust import HttpUser, between, task

try:
    from deploy.checks import Malformed, check_completion, parse_sse
except ImportError:  # run from elsewhere: locust puts this file's folder on sys.path
    from checks import Malformed, check_completion, parse_sse

MAX_TOKENS = int(os.environ.get("DELTAMEM_LOAD_MAX_TOKENS", "48"))
TURNS = int(os.environ.get("DELTAMEM_LOAD_TURNS", "5"))
STREAM_SHARE = float(os.environ.get("DELTAMEM_LOAD_STREAM_SHARE", "0.3"))
TEMPERATURE = float(os.environ.get("DELTAMEM_LOAD_TEMPERATURE", "0"))
API_KEY = os.environ.get("DELTAMEM_LOAD_API_KEY", "")
TIMEOUT = float(os.environ.get("DELTAMEM_LOAD_TIMEOUT", "120"))

CHAT = "/v1/chat/completions"

# Conversations: a user tells things about themselves, then asks about them.
CONVERSATIONS = [
    ["Hi! My name is Alice and I live in Lisbon.",
     "I work as a nurse at the city hospital, mostly night shifts.",
     "My dog is a beagle called Rex; he is four years old.",
     "Can you suggest a quiet weekend activity for me and Rex?",
     "What is my dog's name, and where do I live?",
     "Thanks! Remind me what my job is."],
    ["I'm planning a trip to Japan in April with my sister Maya.",
     "We land in Osaka and want to see Kyoto and Nara too.",
     "Maya is vegetarian, and I can't eat peanuts.",
     "Which city should we visit first?",
     "Any tips for finding food that suits both of us?",
     "Where do we land, and who am I travelling with?"],
    ["I'm learning to play the cello. I started three months ago.",
     "My teacher is called Mr. Novak and lessons are on Tuesdays.",
     "I practise about twenty minutes a day, which feels too short.",
     "How could I make my practice more effective?",
     "What instrument am I learning, and who teaches me?",
     "On which day are my lessons?"],
    ["My favourite colour is green and I collect old maps.",
     "I have a map of Lisbon from 1856, my most precious one.",
     "I keep the maps in flat drawers away from the light.",
     "How should I store a map that is starting to tear?",
     "What do I collect, and what is my favourite colour?",
     "From which year is my most precious map?"],
]

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain in two sentences what a hash table is.",
    "Write a haiku about autumn rain.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
    "How many legs does a spider have?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
]


class ChatUser(HttpUser):
    abstract = True
    wait_time = between(1, 3)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self.model = None
        with self.client.get("/v1/models", catch_response=True, timeout=TIMEOUT) as r:
            try:
                self.model = r.json()["data"][0]["id"]
            except Exception as e:  # noqa: BLE001 - any shape error is a failure
                r.failure(f"/v1/models: {type(e).__name__}: {e}")

    def chat(self, messages, session_id: str | None, version: int | None, stream: bool,
             name: str) -> str | None:
        """One chat completion, checked; returns the answer (None when it failed)."""
        body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": TEMPERATURE}
        if self.model:
            body["model"] = self.model
        if session_id is not None:
            body["session_id"] = session_id
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        with self.client.post(CHAT, json=body, name=name, stream=stream, catch_response=True,
                              timeout=TIMEOUT) as r:
            try:
                if r.status_code != 200:
                    raise Malformed(f"HTTP {r.status_code}: {(r.text or '')[:300]}")
                if stream:
                    text = parse_sse(r.iter_lines(), session_id, version)
                    # locust timed the headers only: report the whole stream.
                    r.request_meta["response_time"] = (time.perf_counter() - t0) * 1000
                    r.request_meta["response_length"] = len(text.encode())
                else:
                    text = check_completion(r.json(), session_id, version)
            except Exception as e:  # noqa: BLE001 - every problem is a failed request
                r.failure(f"{type(e).__name__}: {e}")
                return None
            r.success()
            return text


class SessionUser(ChatUser):
    """Opens a session and talks for several turns, then checks and deletes it."""

    weight = 3

    def on_start(self) -> None:
        super().on_start()
        self.new_conversation()

    def new_conversation(self) -> None:
        self.session_id = f"load-{uuid.uuid4().hex[:16]}"
        self.version = 0
        self.script = random.choice(CONVERSATIONS)
        self.history: list[dict] = []
        self.resend_history = random.random() < 0.5

    @task
    def turn(self) -> None:
        if self.version >= min(TURNS, len(self.script)):
            self.finish_conversation()
            return
        user = {"role": "user", "content": self.script[self.version]}
        messages = [*self.history, user] if self.resend_history else [user]
        stream = random.random() < STREAM_SHARE
        name = f"{CHAT} [session{', stream' if stream else ''}]"
        text = self.chat(messages, self.session_id, self.version + 1, stream, name)
        if text is None:  # the session may be anywhere now: start a fresh one
            self.new_conversation()
            return
        self.version += 1
        self.history += [user, {"role": "assistant", "content": text}]

    def finish_conversation(self) -> None:
        path = f"/v1/sessions/{self.session_id}"
        with self.client.get(path, name="/v1/sessions/[id]", catch_response=True,
                             timeout=TIMEOUT) as r:
            try:
                v = r.json()
                if r.status_code != 200 or v.get("version") != self.version or \
                        v.get("turns") != self.version:
                    raise Malformed(f"HTTP {r.status_code}: {str(v)[:300]}")
            except Exception as e:  # noqa: BLE001
                r.failure(f"{type(e).__name__}: {e} (expected version {self.version})")
        with self.client.delete(path, name="/v1/sessions/[id]", catch_response=True,
                                timeout=TIMEOUT) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:300]}")
        self.new_conversation()


class SessionlessUser(ChatUser):
    """One-shot questions, no session."""

    weight = 1

    @task
    def ask(self) -> None:
        stream = random.random() < STREAM_SHARE
        name = f"{CHAT} [no session{', stream' if stream else ''}]"
        self.chat([{"role": "user", "content": random.choice(QUESTIONS)}], None, None, stream,
                  name)
