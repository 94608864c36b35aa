"""The demo tasks and the tiny base's pre-training corpus, generated deterministically.

Both demo tasks read the same kind of input, a templated English request about a small database
(`how many users have age above 42?`), and answer it in a different way:

- ``sql``: the SQL query (`SELECT COUNT(*) FROM users WHERE age > 42;`);
- ``pirate``: the request restated in pirate speak (`Arr, count me users with age over 42, matey!`).

So one prompt sent to the base, `demo-a` (sql) and `demo-b` (pirate) gives three visibly different answers,
and exact match tells them apart: each adapter scores on its own held-out set, the base and the other
adapter score zero. Held-out requests are chosen by a hash of the request text, never seen in training.

The tiny base (`adapters.tiny`) is pre-trained on `base_corpus`: the same domain, *unpaired* (requests,
SQL and pirate lines each on their own) plus three instructed chat skills that teach it to read a
request and copy its values: `extract: <request>` -> `table users, column age, value 40` (in request order),
`json: <request>` -> `{"table": "users", "column": "age", "value": 40}`, and `repeat: <line>`. It
never sees a request paired with its SQL or pirate answer, nor a request without an instruction in
front: answering a bare request is what the adapters learn.

`write_demo_datasets(folder)` writes the JSONL files shipped in `adapters/datasets/`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

TABLES = ("users", "orders", "products", "customers", "employees", "books", "cities", "tickets")
COLUMNS = ("age", "price", "salary", "score", "year", "amount", "rating", "stock")
#: Values are round tens: a 2-layer base copies a value from the prompt reliably when a slot has a handful of
#: values (tables, columns: 8 each), not 90 (issue 4's probe: the misses were copied numbers).
NUMBERS = range(10, 100, 10)
TASKS = ("sql", "pirate")

#: Default dataset sizes (distinct requests per split).
TRAIN_SIZE = 2000
HELD_OUT_SIZE = 100
SEED = 20240


@dataclass(frozen=True)
class Template:
    request: str
    sql: str
    pirate: str


TEMPLATES = (
    Template("how many {t} are there?", "SELECT COUNT(*) FROM {t};", "Arr, count me {t}, matey!"),
    Template("list all {t}.", "SELECT * FROM {t};", "Arr, bring me every one of the {t}!"),
    Template("show the {c} of all {t}.", "SELECT {c} FROM {t};", "Arr, show me the {c} of them {t}!"),
    Template(
        "how many {t} have {c} above {n}?",
        "SELECT COUNT(*) FROM {t} WHERE {c} > {n};",
        "Arr, count me {t} with {c} over {n}, matey!",
    ),
    Template(
        "list {t} with {c} below {n}.",
        "SELECT * FROM {t} WHERE {c} < {n};",
        "Arr, bring me {t} with {c} under {n}!",
    ),
    Template(
        "what is the average {c} of {t}?",
        "SELECT AVG({c}) FROM {t};",
        "Arr, what be the average {c} of them {t}?",
    ),
    Template(
        "show the top {n} {t} by {c}.",
        "SELECT * FROM {t} ORDER BY {c} DESC LIMIT {n};",
        "Arr, show me the best {n} {t} by {c}!",
    ),
    Template(
        "list the first {n} {t}.",
        "SELECT * FROM {t} LIMIT {n};",
        "Arr, bring me the first {n} {t}!",
    ),
    Template(
        "what is the highest {c} among {t}?",
        "SELECT MAX({c}) FROM {t};",
        "Arr, what be the biggest {c} among them {t}?",
    ),
    Template(
        "find {t} whose {c} equals {n}.",
        "SELECT * FROM {t} WHERE {c} = {n};",
        "Arr, find me {t} with {c} of exactly {n}!",
    ),
)


@dataclass(frozen=True)
class Request:
    template: int
    t: str
    c: str
    n: int

    def render(self, field: str) -> str:
        text = getattr(TEMPLATES[self.template], field)
        return text.format(t=self.t, c=self.c, n=self.n)

    @property
    def text(self) -> str:
        return self.render("request")

    def values(self) -> dict[str, str | int]:
        """The request's slot values, in the order they appear in it."""
        raw = TEMPLATES[self.template].request
        slots = {"{t}": ("table", self.t), "{c}": ("column", self.c), "{n}": ("value", self.n)}
        present = sorted((raw.index(key), name, value) for key, (name, value) in slots.items() if key in raw)
        return {name: value for _, name, value in present}

    def extraction(self) -> str:
        """The base's `extract:` skill: `table users, column age, value 30`."""
        return ", ".join(f"{key} {value}" for key, value in self.values().items())

    def as_json(self) -> str:
        """The base's `json:` skill: `{"table": "users", "column": "age", "value": 30}` (values unspaced)."""
        return json.dumps(self.values())


def random_request(rng: random.Random) -> Request:
    return Request(
        rng.randrange(len(TEMPLATES)),
        rng.choice(TABLES),
        rng.choice(COLUMNS),
        rng.choice(NUMBERS),
    )


def is_held_out(text: str) -> bool:
    """One request in ten belongs to the held-out pool, by a stable hash of its text."""
    return hashlib.sha256(text.encode()).digest()[0] % 10 == 0


def split_requests(
    seed: int = SEED, train: int = TRAIN_SIZE, held_out: int = HELD_OUT_SIZE
) -> dict[str, list[Request]]:
    """Distinct requests for training and for evaluation (disjoint by construction)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[Request]] = {"train": [], "held_out": []}
    for _ in range(200 * (train + held_out)):
        if len(out["train"]) >= train and len(out["held_out"]) >= held_out:
            break
        request = random_request(rng)
        if request.text in seen:
            continue
        seen.add(request.text)
        split = "held_out" if is_held_out(request.text) else "train"
        if len(out[split]) < (held_out if split == "held_out" else train):
            out[split].append(request)
    return out


def chat_row(request: Request, task: str) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "user", "content": request.text},
            {"role": "assistant", "content": request.render(task)},
        ]
    }


def preference_rows(requests: list[Request], seed: int = SEED) -> list[dict[str, str]]:
    """A tiny DPO example: the right SQL preferred over SQL naming the wrong table."""
    rng = random.Random(seed + 1)
    rows = []
    for request in requests:
        wrong = Request(
            request.template,
            rng.choice([t for t in TABLES if t != request.t]),
            request.c,
            request.n,
        )
        rows.append(
            {"prompt": request.text, "chosen": request.render("sql"), "rejected": wrong.render("sql")}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def write_demo_datasets(folder: Path, seed: int = SEED) -> dict[str, Path]:
    """Write `<task>/train.jsonl`, `<task>/held_out.jsonl` and `dpo/preference.jsonl` under `folder`."""
    folder = Path(folder)
    splits = split_requests(seed)
    out: dict[str, Path] = {}
    for task in TASKS:
        for split, requests in splits.items():
            out[f"{task}/{split}"] = write_jsonl(
                folder / task / f"{split}.jsonl", [chat_row(r, task) for r in requests]
            )
    out["dpo/preference"] = write_jsonl(
        folder / "dpo" / "preference.jsonl", preference_rows(splits["train"][:64], seed)
    )
    return out


def shipped_datasets_dir() -> Path:
    """The generated datasets committed with the package."""
    return Path(__file__).parent / "datasets"


# --------------------------------------------------------------------------- the base's corpus


_FILLER = [
    "the",
    "a",
    "of",
    "to",
    "in",
    "for",
    "on",
    "with",
    "by",
    "from",
    "at",
    "is",
    "are",
    "was",
    "be",
    "this",
    "that",
    "it",
    "and",
    "or",
    "not",
    "all",
    "any",
    "show",
    "list",
    "find",
    "count",
    "how",
    "many",
    "what",
    "which",
    "who",
    "where",
    "when",
    "give",
    "me",
    "please",
    "name",
    "total",
    "id",
    "status",
    "date",
    "top",
    "first",
    "last",
    "order",
    "group",
    "hello",
    "world",
    "reply",
    "answer",
    "question",
    "yes",
    "no",
    "thanks",
    "ship",
    "sea",
    "captain",
    "gold",
    "treasure",
    "wind",
    "sail",
]


def filler_line(rng: random.Random) -> str:
    vocab = [*_FILLER, *TABLES, *COLUMNS, *(str(n) for n in NUMBERS)]
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 10)))


#: Pre-training mix of the tiny base (relative weights; see `base_corpus`).
BASE_MIX = {"request": 1, "sql": 1, "pirate": 1, "extract": 3, "json": 3, "echo": 1}


def _chat(user: str, assistant: str) -> tuple[str, object]:
    return ("chat", [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


def base_corpus(n: int, seed: int, mix: dict[str, float] | None = None) -> list[tuple[str, object]]:
    """`n` pre-training documents, ("text", str) or ("chat", [messages]).

    Kinds: `request`, `sql`, `pirate` (one line of the domain, unpaired); `extract` and `json` (chat:
    `extract: <request>` -> its values as text or JSON); `echo` (chat: `repeat: <line>` -> the line).
    """
    mix = mix or BASE_MIX
    kinds, weights = zip(*mix.items(), strict=True)
    rng = random.Random(seed)
    docs: list[tuple[str, object]] = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        request = random_request(rng)
        if kind in ("request", "sql", "pirate"):
            docs.append(("text", request.text if kind == "request" else request.render(kind)))
        elif kind == "extract":
            docs.append(_chat(f"extract: {request.text}", request.extraction()))
        elif kind == "json":
            docs.append(_chat(f"json: {request.text}", request.as_json()))
        elif kind == "echo":
            line = filler_line(rng)
            docs.append(_chat(f"repeat: {line}", line))
        else:
            raise ValueError(f"unknown corpus kind {kind!r}")
    return docs


def tokenizer_corpus(n: int, seed: int) -> list[str]:
    """Text to train the tokenizer on: every domain word and number occurs often enough to be one token."""
    rng = random.Random(seed)
    lines = [" ".join(str(x) for x in NUMBERS)] * 20
    for _ in range(n):
        request = random_request(rng)
        lines += [
            request.text,
            request.render("sql"),
            request.render("pirate"),
            request.as_json(),
            filler_line(rng),
        ]
    return lines
